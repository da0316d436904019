"""Read: one Ray task per input file, streaming its documents in blocks."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from typing import Iterator

import pyarrow as pa

from bft.context import RunContext
from bft.readers import ColumnMapping, read_file
from bft.schema import DOC_COLUMNS, to_table
from bft.storage import join

STATS_DIR = "_stats/read"


def stats_uri(run_uri: str, source: str) -> str:
    return join(run_uri, STATS_DIR, hashlib.sha1(source.encode()).hexdigest()[:20] + ".json")


def read_files(batch: pa.Table, ctx: RunContext) -> Iterator[pa.Table]:
    """``batch`` holds file URIs in column ``path``; yields document blocks.

    Unusable rows go to ``dropped/`` (stage ``read``); per-file counts go to
    ``_stats/read/`` so the manifest can check that every row is accounted for.
    """
    cfg = ctx.config.input
    mapping = ColumnMapping.from_config(cfg)
    writer = ctx.writer
    for uri in batch.column("path").to_pylist():
        started = time.time()
        stats = None
        for docs, drops, stats in read_file(ctx.storage, uri, cfg.format, mapping, cfg.rows_per_block):
            writer.write("read", [], drops, started)
            if docs:
                yield to_table(docs, DOC_COLUMNS)
        if stats is not None:
            record = {**asdict(stats), "started_at": started, "finished_at": time.time()}
            ctx.storage.write_bytes(stats_uri(ctx.run_uri, uri), json.dumps(record).encode())
