"""How far a run has got, from its files alone: what the live progress view shows and what
``bft status`` reports, for a run that is going on or one that ended, local or on S3.

Every number comes from what the run wrote (stage files' Parquet footers and a few small
columns, the read records, the attempt record, the lease, the manifest), so another
terminal, or another machine, sees the same as the driver. Files are read once: a
:class:`FileTallies` keeps each file's tally by name and size, so polling a long run costs
one listing plus the files written since the last look.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from bft.lease import LEASE_FILE, lease_uri, stale_reason
from bft.stages import FINAL, FOLDERS, LLM_STAGES, ORDER
from bft.steps.read import STATS_DIR, read_stats
from bft.storage import Storage, is_remote, join
from bft.writers.manifest import MANIFEST_NAME, parquet_times
from bft.writers.parquet import DROPPED_DIR, SEED_PAIRS_FILE, parquet_files

# Written by the driver when an attempt starts (pipeline.py): when, which input files
# (with their sizes) the run covers, and how many rows earlier attempts had finished.
ATTEMPT_FILE = "_run/attempt.json"


@dataclass
class FileTally:
    """One written file's share of the counts."""

    stage: str | None = None  # the stage whose output (or drops) the file holds
    rows: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> rows (drop files)
    tokens: int = 0  # prompt + completion tokens of the rows (LLM stages)
    started: float | None = None
    finished: float | None = None
    read_record: dict[str, Any] | None = None  # an input file's read record
    # filter: the documents (source, source_row) of the segment rows in this file; the
    # rows cutting added are counted over all files (a document's segments may be split
    # between a kept and a drop file)
    segment_docs: list[tuple[str, int]] = field(default_factory=list)


def _segment_docs(pf: pq.ParquetFile) -> list[tuple[str, int]]:
    """The document of each segment row of a filter file."""
    if "segment" not in pf.schema_arrow.names:
        return []
    table = pf.read(columns=["source", "source_row", "segment"])
    return [(src, row) for src, row, seg in zip(*(table.column(c).to_pylist() for c in ("source", "source_row",
                                                                                         "segment")))
            if seg is not None]


def _sum(table: Any, *columns: str) -> int:
    return int(sum(v for c in columns if c in table.column_names for v in table.column(c).to_pylist() if v))


def run_folder(run_uri: str) -> str:
    """``run_uri`` as listings name it: local paths absolute (``out/r1``, ``./out/r1``,
    ``file://...``), no trailing slash."""
    if not is_remote(run_uri):
        run_uri = os.path.abspath(run_uri.removeprefix("file://"))
    return run_uri.rstrip("/")


class FileTallies:
    """Per-file tallies of one run, kept between polls (by file name and size)."""

    def __init__(self, storage: Storage, run_uri: str):
        self.storage, self.run_uri = storage, run_folder(run_uri)
        self.cache: dict[str, tuple[int, FileTally]] = {}
        self.stage_of_folder = {folder: stage for stage, folder in FOLDERS.items()}

    def scan(self) -> tuple[list[FileTally], dict[str, int]]:
        """The tallies of every stage file, drop file and read record now in the run
        folder, and the sizes of the run's other files (by path below the run)."""
        sizes = self.storage.list_sizes(self.run_uri)
        tallies, others = [], {}
        for uri, size in sizes.items():
            below = uri[len(self.run_uri) + 1:]
            folder = below.split("/", 1)[0]
            is_stats = below.startswith(STATS_DIR + "/") and below.endswith(".json")
            is_stage = below.endswith(".parquet") and (folder in self.stage_of_folder or folder == DROPPED_DIR) \
                and below.rsplit("/", 1)[-1] != SEED_PAIRS_FILE
            if not (is_stats or is_stage):
                others[below] = size
                continue
            cached = self.cache.get(uri)
            if cached is None or cached[0] != size:
                try:
                    cached = (size, self._tally(uri, folder, is_stats))
                except (FileNotFoundError, OSError, ValueError):  # replaced or removed mid-look
                    continue
                self.cache[uri] = cached
            tallies.append(cached[1])
        return tallies, others

    def _tally(self, uri: str, folder: str, is_stats: bool) -> FileTally:
        if is_stats:
            record = json.loads(self.storage.read_bytes(uri))
            return FileTally(stage="read", rows=int(record.get("rows_seen", 0)), read_record=record,
                             started=record.get("started_at"), finished=record.get("finished_at"))
        with self.storage.open(uri, "rb") as fh:
            pf = pq.ParquetFile(fh)
            started, finished = parquet_times(pf.schema_arrow.metadata)
            names = pf.schema_arrow.names
            if folder == DROPPED_DIR:
                # one stage's rows per drop file (writers/parquet.py names it after the stage)
                table = pf.read(columns=[c for c in ("stage", "reason", "prompt_tokens", "completion_tokens")
                                         if c in names])
                stages = set(table.column("stage").to_pylist())
                stage = stages.pop() if len(stages) == 1 else None
                return FileTally(stage=stage, rows=table.num_rows,
                                 dropped=Counter(table.column("reason").to_pylist()),
                                 tokens=_sum(table, "prompt_tokens", "completion_tokens"),
                                 started=started, finished=finished,
                                 segment_docs=_segment_docs(pf) if stage == "filter" else [])
            stage = self.stage_of_folder[folder]
            tokens = 0
            if stage in LLM_STAGES:
                columns = [c for c in (f"{stage}_prompt_tokens", f"{stage}_completion_tokens") if c in names]
                tokens = _sum(pf.read(columns=columns), *columns) if columns else 0
            return FileTally(stage=stage, rows=pf.metadata.num_rows, tokens=tokens, started=started,
                             finished=finished, segment_docs=_segment_docs(pf) if stage == "filter" else [])


@dataclass
class StageProgress:
    out: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    tokens: int = 0

    @property
    def done(self) -> int:
        return self.out + sum(self.dropped.values())


@dataclass
class RunProgress:
    run_uri: str
    state: str  # running | finished | failed | unreconciled | stopped | not started
    detail: str  # who runs it, or how it ended
    stages: dict[str, StageProgress]
    files_total: int | None
    files_read: int
    rows_read: int
    expected_rows: int | None  # an estimate while input files are still being read
    rows_done: int  # rows that reached the end: in the final dataset or dropped
    rows_done_before: int  # of those, finished by earlier attempts
    elapsed_s: float
    tokens_per_s: float | None
    eta_s: float | None
    dropped_by_reason: Counter[str]

    @property
    def final_rows(self) -> int:
        return self.stages[FINAL].out

    @property
    def fraction(self) -> float | None:
        if self.state in ("finished", "failed", "unreconciled"):
            return 1.0
        if not self.expected_rows:
            return None
        # Cutting long documents adds rows, so the count can pass the estimate: an
        # unfinished run never shows 100%.
        return min(self.rows_done / self.expected_rows, 0.99)

    @property
    def rows_per_s(self) -> float | None:
        done_now = self.rows_done - self.rows_done_before
        return done_now / self.elapsed_s if self.elapsed_s > 0 and done_now > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"run_uri": self.run_uri, "state": self.state, "detail": self.detail,
                "stages": {name: {"done": s.done, "out": s.out, "dropped": dict(s.dropped), "tokens": s.tokens}
                           for name, s in self.stages.items()},
                "input_files": {"total": self.files_total, "read": self.files_read}, "rows_read": self.rows_read,
                "expected_rows": self.expected_rows, "rows_done": self.rows_done, "final_rows": self.final_rows,
                "fraction": self.fraction, "elapsed_s": round(self.elapsed_s, 1),
                "rows_per_s": self.rows_per_s, "tokens_per_s": self.tokens_per_s, "eta_s": self.eta_s,
                "dropped_by_reason": dict(sorted(self.dropped_by_reason.items()))}


def _json(storage: Storage, uri: str) -> dict[str, Any] | None:
    data = storage.read_if_exists(uri)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _state(storage: Storage, run_uri: str, others: dict[str, int], now: float) -> tuple[str, str]:
    lease = _json(storage, lease_uri(run_uri)) if LEASE_FILE in others else None
    if lease is not None and stale_reason(lease, 120, now) is None:
        return "running", f"driver {lease.get('host', '?')} pid {lease.get('pid', '?')} ({lease.get('command', 'bft run')})"
    manifest = _json(storage, join(run_uri, MANIFEST_NAME)) if MANIFEST_NAME in others else None
    if manifest is not None:
        failed = (manifest.get("batch_failures") or {}).get("failed")
        if failed:
            return "failed", f"batches that failed every retry cost {', '.join(failed)} too many rows"
        if not manifest.get("reconciled"):
            return "unreconciled", "; ".join(manifest.get("reconciliation_problems", []))[:300]
        return "finished", f"{manifest.get('final_rows', 0)} final rows in {manifest.get('wall_s', 0):.0f} s"
    if not others and lease is None:
        return "not started", "nothing written yet"
    return "stopped", "no live driver holds the run and it has no manifest: run the same command again to resume it"


def snapshot(storage: Storage, run_uri: str, tallies: FileTallies | None = None,
             now: float | None = None) -> RunProgress:
    """Where ``run_uri`` stands now. Pass the same ``tallies`` to poll cheaply."""
    tallies = tallies or FileTallies(storage, run_uri)
    now = time.time() if now is None else now
    files, others = tallies.scan()
    attempt = _json(storage, join(run_uri, ATTEMPT_FILE)) if ATTEMPT_FILE in others else None
    state, detail = _state(storage, run_uri, others, now)

    stages = {name: StageProgress() for name in ORDER}
    dropped: Counter[str] = Counter()
    read_records = []
    attempt_started = float(attempt["started_at"]) if attempt else None
    tokens_this_attempt = 0
    segment_rows: list[tuple[str, int]] = []
    last_write = None
    for tally in files:
        segment_rows += tally.segment_docs
        if tally.read_record is not None:
            read_records.append(tally.read_record)
            stages["read"].out += int(tally.read_record.get("rows_ok", 0))
            continue
        if tally.stage not in stages:
            continue
        entry = stages[tally.stage]
        if tally.dropped:
            entry.dropped.update(tally.dropped)
            dropped.update(tally.dropped)
        else:
            entry.out += tally.rows
        entry.tokens += tally.tokens
        if tally.finished is not None:
            last_write = tally.finished if last_write is None else max(last_write, tally.finished)
            if attempt_started is not None and tally.finished >= attempt_started:
                tokens_this_attempt += tally.tokens
    # read's drops are in dropped/ like every stage's; its kept rows are in its records
    rows_read = sum(int(r.get("rows_seen", 0)) for r in read_records)
    sizes = (attempt or {}).get("input_files") or {}
    files_total = len(sizes) if attempt else None
    expected = _expected_rows(attempt, read_records, sizes)
    if expected is not None:  # rows that cutting long documents added: segments beyond one per document
        expected += len(segment_rows) - len(set(segment_rows))
    rows_done = sum(dropped.values()) + stages[FINAL].out
    before = int((attempt or {}).get("rows_done_before", 0))
    if attempt_started is None:
        elapsed = 0.0
    elif state == "running":
        elapsed = now - attempt_started
    else:  # ended: up to its last write
        elapsed = max((last_write or attempt_started) - attempt_started, 0.0)
    progress = RunProgress(run_uri=run_uri, state=state, detail=detail, stages=stages, files_total=files_total,
                           files_read=len(read_records), rows_read=rows_read, expected_rows=expected,
                           rows_done=rows_done, rows_done_before=before, elapsed_s=elapsed,
                           tokens_per_s=tokens_this_attempt / elapsed if elapsed > 0 and tokens_this_attempt else None,
                           eta_s=None, dropped_by_reason=dropped)
    # Early on, rows are still in flight through the stages and the rate says little.
    if state == "running" and expected and (rate := progress.rows_per_s) and rows_done >= 0.05 * expected:
        progress.eta_s = max(expected - rows_done, 0) / rate
    return progress


def _expected_rows(attempt: dict[str, Any] | None, read_records: list[dict], sizes: dict[str, int]) -> int | None:
    """Rows the run will have: exact once every input file is read; before that, the rows
    per byte of the files read so far times the bytes of the others."""
    if attempt is None:
        return None
    if attempt.get("rows_entering") is not None:  # restarted from another run's stage: no reading
        return int(attempt["rows_entering"])
    seen = {r["source"]: int(r.get("rows_seen", 0)) for r in read_records if "source" in r}
    rows = sum(seen.values())
    pending = [uri for uri in sizes if uri not in seen]
    if not pending:
        return rows
    read_bytes = sum(sizes.get(uri, 0) for uri in seen)
    if not read_bytes:
        return None
    return rows + round(rows / read_bytes * sum(sizes[uri] for uri in pending))


def write_attempt_record(storage: Storage, run_uri: str, input_uri: str | None, input_files: list[str],
                         started_at: float, rows_entering: int | None, resumed: bool) -> None:
    """What :func:`snapshot` needs to know of the attempt that starts now."""
    sources = {r.get("source") for r in read_stats(storage, run_uri)}
    wanted = set(input_files) | sources
    sizes = {}
    if input_uri and wanted:
        listed = storage.list_sizes(input_uri)
        sizes = {uri: listed.get(uri, 0) for uri in sorted(wanted) if uri}
    before = rows_done_by_footers(storage, run_uri) if resumed else 0
    storage.write_bytes(join(run_uri, ATTEMPT_FILE), json.dumps(
        {"started_at": started_at, "input_files": sizes, "rows_entering": rows_entering,
         "rows_done_before": before}).encode())


def rows_done_by_footers(storage: Storage, run_uri: str) -> int:
    """Rows earlier attempts took to the end (final or dropped), from Parquet footers only."""
    total = 0
    for folder in (DROPPED_DIR, FOLDERS[FINAL]):
        for uri in parquet_files(storage, join(run_uri, folder)):
            with storage.open(uri, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
    return total
