"""Read: one Ray task per input file, streaming its documents in blocks."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bft.context import RunContext
from bft.readers import ColumnMapping, ReadLimits, read_file
from bft.schema import DOC_COLUMNS, to_table
from bft.storage import Storage, join

STATS_DIR = "_stats/read"


def stats_uri(run_uri: str, source: str) -> str:
    return join(run_uri, STATS_DIR, hashlib.sha1(source.encode()).hexdigest()[:20] + ".json")


def read_stats(storage: Storage, run_uri: str) -> list[dict]:
    """The per-file read records of a run."""
    return storage.read_json_files(join(run_uri, STATS_DIR))


def unfinished(rows: list[dict], stage: str, finished: Any) -> list[dict]:
    """Rows an earlier attempt of this run has not finished at ``stage`` (all, on a first
    attempt: ``finished`` is a ``resume.FinishedRows`` or ``None``)."""
    if not rows or finished is None or not finished.count(stage):
        return rows
    done = finished.mask_rows(stage, rows)
    return [row for row, skip in zip(rows, done) if not skip]


def read_files(batch: pa.Table, ctx: RunContext) -> Iterator[pa.Table]:
    """``batch`` holds file URIs in column ``path``; yields document blocks.

    Unusable rows go to ``dropped/`` (stage ``read``); per-file counts go to
    ``_stats/read/`` so the manifest can check that every row is accounted for. When
    resuming, rows an earlier attempt already finished are counted but not passed on.
    """
    cfg = ctx.config.input
    mapping = ColumnMapping.from_config(cfg)
    writer = ctx.writer
    finished = ctx.finished_rows()
    for uri in batch.column("path").to_pylist():
        started = time.time()
        stats = None
        skipped = 0
        for docs, drops, stats in read_file(ctx.storage, uri, cfg.format, mapping, cfg.rows_per_block,
                                            cfg.on_bad_file, ReadLimits.from_config(cfg)):
            new_drops, new_docs = unfinished(drops, "read", finished), unfinished(docs, "filter", finished)
            skipped += len(docs) + len(drops) - len(new_docs) - len(new_drops)
            writer.write("read", [], new_drops, started)
            if new_docs:
                yield to_table(new_docs, DOC_COLUMNS)
        if stats is not None:
            record = {**asdict(stats), "rows_already_done": skipped,
                      "started_at": started, "finished_at": time.time()}
            ctx.storage.write_bytes(stats_uri(ctx.run_uri, uri), json.dumps(record).encode())


def read_stage_outputs(batch: pa.Table, ctx: RunContext, stage: str,
                       columns: dict[str, pa.DataType]) -> Iterator[pa.Table]:
    """Stream rows of an earlier stage's Parquet (column ``path``) back in, to enter the
    pipeline at ``stage`` (``--from-stage``, or resume); rows ``stage`` already finished
    in an earlier attempt are left out. A column the file lacks (written by an older bft,
    e.g. before ``*_cached_tokens``) comes back null."""
    finished = ctx.finished_rows()
    for uri in batch.column("path").to_pylist():
        with ctx.storage.open(uri, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            present = [name for name in columns if name in parquet.schema_arrow.names]
            for record_batch in parquet.iter_batches(columns=present):
                table = pa.Table.from_batches([record_batch])
                for i, (name, dtype) in enumerate(columns.items()):
                    if name not in present:
                        table = table.add_column(i, pa.field(name, dtype), pa.nulls(table.num_rows, dtype))
                if finished is not None and finished.count(stage):
                    done = finished.mask(stage, table.column("source").to_pylist(),
                                         table.column("source_row").to_pylist(),
                                         table.column("segment").to_pylist())
                    table = table.filter(pa.array(~done))
                if table.num_rows:
                    yield table
