"""Per-stage Parquet writing from inside streaming Ray tasks.

Each batch a stage finishes is written as one Parquet file under ``<run>/<stage dir>/``
(kept rows) and one under ``<run>/dropped/`` (dropped rows), so stage outputs stream to
storage as the run goes and no stage is ever held in memory whole. Both files of a batch
are named after the identities (``source``, ``source_row``, ``segment``) of all the rows the batch
finished, kept or dropped: a batch that runs again (a retried task, a replica replaced)
writes the same two names whatever its new split, so it replaces what it wrote before
instead of adding to it. Files appear atomically (see :meth:`Storage.write_bytes`).
"""

from __future__ import annotations

import hashlib
import io
import time

import pyarrow as pa
import pyarrow.parquet as pq

from bft.schema import identity, row_key, to_table
from bft.stages import COLUMNS, DROPPED_COLUMNS, FOLDERS
from bft.storage import Storage, join

STARTED_KEY = b"bft.started_at"
FINISHED_KEY = b"bft.finished_at"
DROPPED_DIR = "dropped"
# The seed pairs of the final dataset (output.seed_mix), next to its web-derived files.
SEED_PAIRS_FILE = "seed-pairs.parquet"
# In the names of drop files of failed batches' rows: ``dropped/<stage>-failed-<digest>.parquet``.
FAILED_TAG = "-failed-"


def parquet_files(storage: Storage, folder: str) -> list[str]:
    """The stage files under ``folder`` (of rows that came through the pipeline: the seed
    pairs' file in ``sft/`` is not one; see :func:`seed_pairs_uri`)."""
    return [f for f in storage.list_files(folder)
            if f.endswith(".parquet") and f.rsplit("/", 1)[-1] != SEED_PAIRS_FILE]


def seed_pairs_uri(run_uri: str) -> str:
    return join(run_uri, FOLDERS["sft"], SEED_PAIRS_FILE)


def dropped_files(storage: Storage, run_uri: str, stage: str) -> list[str]:
    """The files of ``dropped/`` holding ``stage``'s drops: each holds one stage's rows
    and is named after it (:meth:`StageWriter.dropped_uri`), so no other file is read."""
    prefix = f"{stage}-"
    return [f for f in parquet_files(storage, join(run_uri, DROPPED_DIR)) if f.rsplit("/", 1)[-1].startswith(prefix)]


def failed_batch_files(storage: Storage, run_uri: str) -> list[str]:
    """The drop files of rows whose batches failed every retry (:meth:`StageWriter.write_failed`):
    the only ones a resume removes, so that those rows are tried again."""
    return [f for f in parquet_files(storage, join(run_uri, DROPPED_DIR)) if FAILED_TAG in f.rsplit("/", 1)[-1]]


def batch_name(stage: str, rows: list[dict]) -> str:
    """The name of a batch's files: a digest of the stage and its rows' identities."""
    h = hashlib.sha1(stage.encode())
    for key in sorted(row_key(*identity(r)) for r in rows):
        h.update(b"\0" + key.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:20]


def identities(rows: list[dict]) -> set[tuple[str, int, int | None]]:
    """The rows' (source, source_row, segment): what names a batch, whatever its split."""
    return {identity(r) for r in rows}


class StageWriter:
    """Writes (and reads back) one stage's kept and dropped rows for one run."""

    def __init__(self, storage: Storage, run_uri: str):
        self.storage = storage
        self.run_uri = run_uri

    def _write(self, uri: str, table: pa.Table, started_at: float) -> None:
        meta = dict(table.schema.metadata or {})
        meta[STARTED_KEY] = repr(started_at).encode()
        meta[FINISHED_KEY] = repr(time.time()).encode()
        table = table.replace_schema_metadata(meta)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.storage.write_bytes(uri, buf.getvalue())

    def kept_uri(self, stage: str, name: str) -> str:
        return join(self.run_uri, FOLDERS[stage], f"part-{name}.parquet")

    def dropped_uri(self, stage: str, name: str) -> str:
        return join(self.run_uri, DROPPED_DIR, f"{stage}-{name}.parquet")

    def write(self, stage: str, kept: list[dict], dropped: list[dict], started_at: float,
              replace: bool = True) -> None:
        """Write a finished batch of ``stage``. An empty side writes nothing and removes
        that side's file from an earlier run of the batch (which may have split its rows
        otherwise: sampling, near-dedup claims); ``replace=False`` skips that look, for a
        batch known to run for the first time."""
        name = batch_name(stage, kept + dropped)
        if dropped:
            dropped = [{**row, "stage": stage} for row in dropped]
            self._write(self.dropped_uri(stage, name), to_table(dropped, DROPPED_COLUMNS), started_at)
        elif replace:
            self.storage.remove([self.dropped_uri(stage, name)], missing_ok=True)
        if kept:
            self._write(self.kept_uri(stage, name), to_table(kept, COLUMNS[stage]), started_at)
        elif replace and stage in FOLDERS:  # read keeps no rows of its own
            self.storage.remove([self.kept_uri(stage, name)], missing_ok=True)

    def write_failed(self, stage: str, dropped: list[dict], started_at: float) -> None:
        """Drops of rows whose batches failed every retry, in a file of their own (see
        :func:`failed_batch_files`)."""
        name = batch_name(stage, dropped)
        rows = [{**row, "stage": stage} for row in dropped]
        self._write(join(self.run_uri, DROPPED_DIR, f"{stage}{FAILED_TAG}{name}.parquet"),
                    to_table(rows, DROPPED_COLUMNS), started_at)

    def write_seed_pairs(self, rows: list[dict]) -> None:
        """The seed pairs of the final dataset (``output.seed_mix``): one file, rewritten
        whole by every attempt of the run."""
        self._write(seed_pairs_uri(self.run_uri), to_table(rows, COLUMNS["sft"]), time.time())

    def read_batch(self, stage: str, rows: list[dict]) -> tuple[list[dict] | None, list[dict] | None]:
        """What an earlier run of the batch of ``rows`` wrote at ``stage``: its kept and
        its dropped rows (``None`` for a file that is not there)."""
        name = batch_name(stage, rows)
        found = []
        for uri in (self.kept_uri(stage, name), self.dropped_uri(stage, name)):
            data = self.storage.read_if_exists(uri)
            found.append(None if data is None else pq.read_table(pa.BufferReader(data)).to_pylist())
        return found[0], found[1]
