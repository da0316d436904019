"""Per-stage Parquet writing from inside streaming Ray tasks.

Each batch a stage finishes is written as one Parquet file under
``<run>/<stage dir>/`` (kept rows) and ``<run>/dropped/`` (dropped rows), so stage
outputs stream to storage as the run goes and no stage is ever held in memory whole.
File names are a digest of the rows they hold: a retried task rewrites the same file
instead of adding a duplicate. Files appear atomically (see :meth:`Storage.write_bytes`).
"""

from __future__ import annotations

import hashlib
import io
import time

import pyarrow as pa
import pyarrow.parquet as pq

from bft.schema import DROPPED_COLUMNS, STAGE_COLUMNS, STAGE_DIRS, to_table
from bft.storage import Storage, join

STARTED_KEY = b"bft.started_at"
FINISHED_KEY = b"bft.finished_at"
DROPPED_DIR = "dropped"


def parquet_files(storage: Storage, folder: str) -> list[str]:
    """The stage files under ``folder``."""
    return [f for f in storage.list_files(folder) if f.endswith(".parquet")]


def dropped_files(storage: Storage, run_uri: str, stage: str) -> list[str]:
    """The files of ``dropped/`` holding ``stage``'s drops: each holds one stage's rows
    and is named after it (:meth:`StageWriter.dropped_uri`), so no other file is read."""
    prefix = f"{stage}-"
    return [f for f in parquet_files(storage, join(run_uri, DROPPED_DIR)) if f.rsplit("/", 1)[-1].startswith(prefix)]


def _digest(stage: str, rows: list[dict]) -> str:
    h = hashlib.sha1(stage.encode())
    for row in rows:
        h.update(b"\0")
        h.update(str(row.get("id")).encode())
        h.update(hashlib.sha1((row.get("text") or "").encode("utf-8", "replace")).digest())
    return h.hexdigest()[:20]


class StageWriter:
    """Writes one stage's kept and dropped rows for one run."""

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

    def kept_uri(self, stage: str, rows: list[dict]) -> str:
        return join(self.run_uri, STAGE_DIRS[stage], f"part-{_digest(stage, rows)}.parquet")

    def dropped_uri(self, stage: str, rows: list[dict]) -> str:
        return join(self.run_uri, DROPPED_DIR, f"{stage}-{_digest(stage, rows)}.parquet")

    def write(self, stage: str, kept: list[dict], dropped: list[dict], started_at: float) -> None:
        """Write a finished batch of ``stage``; empty sides write nothing."""
        if kept:
            self._write(self.kept_uri(stage, kept), to_table(kept, STAGE_COLUMNS[stage]), started_at)
        if dropped:
            dropped = [{**row, "stage": stage} for row in dropped]
            self._write(self.dropped_uri(stage, dropped), to_table(dropped, DROPPED_COLUMNS), started_at)
