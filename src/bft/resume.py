"""Resume: what earlier attempts of a run already wrote, and what is left to do.

Every row is identified by where it came from, ``<source file>#<row number>`` (ids are
not unique across a crawl: the same page appears in several shards), and a segment of a
long document by ``<source file>#<row number>/<segment>``. A stage has
*finished* a row once the row is in one of its durable outputs: its own directory
(kept) or ``dropped/<stage>-*`` (dropped). Stage files appear whole or not at all (see
``Storage.write_bytes``), so "in a file" means "done".

Re-running a run id therefore needs no log and no checkpoint of its own:

- an input file is read again unless every row of it is finished by ``read`` (dropped
  there) or ``filter``; rows already finished are skipped as they are read;
- rows kept by stage S but not finished by the stage after it enter the pipeline right
  there, read back from S's Parquet;
- nothing finished is processed again, so nothing is written twice.

Keys are held as sorted 64-bit hashes (8 bytes per row and stage, shared read-only
through Ray's object store); a false "already done" needs a hash collision, about one
chance in 10^7 at 10^6 rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from bft.config import BftConfig
from bft.redaction import mask
from bft.schema import row_key
from bft.stages import FOLDERS, LLM_STAGES, ORDER, PREVIOUS
from bft.steps.read import read_stats
from bft.storage import Storage, join
from bft.writers.parquet import DROPPED_DIR, parquet_files

RUN_RECORD = "_run/config.json"
# Fields that change how a run is scheduled or reported, not what it produces: they may
# differ between attempts of one run (e.g. resume on a bigger cluster).
SCHEDULING_FIELDS = {"ray", "storage", "report", "engine", "train", "input.rows_per_block", "filters.dedup_shards",
                     "output.lease_ttl_s",
                     "filters.near_dedup.shards",
                     *(f"{stage}.{name}" for stage in LLM_STAGES
                       for name in ("replicas", "batch_size", "max_concurrent_batches", "resources", "env_vars"))}
_EMPTY = np.zeros(0, dtype=np.uint64)


def hash_keys(keys: Iterable[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little") for k in keys], dtype=np.uint64)


def rows_hashes(sources: list[str], rows: list[int], segments: list[int | None] | None = None) -> np.ndarray:
    segments = segments if segments is not None else [None] * len(sources)
    return hash_keys(row_key(s, r, g) for s, r, g in zip(sources, rows, segments))


def row_hashes(rows: list[dict]) -> np.ndarray:
    return rows_hashes([r["source"] for r in rows], [r["source_row"] for r in rows],
                       [r.get("segment") for r in rows])


def contains(sorted_hashes: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``hashes`` are in ``sorted_hashes``."""
    if not len(sorted_hashes) or not len(hashes):
        return np.zeros(len(hashes), dtype=bool)
    idx = np.searchsorted(sorted_hashes, hashes).clip(max=len(sorted_hashes) - 1)
    return sorted_hashes[idx] == hashes


@dataclass
class FinishedRows:
    """Per stage, the (hashed) keys of rows that stage has finished. Picklable."""

    by_stage: dict[str, np.ndarray] = field(default_factory=dict)

    def mask(self, stage: str, sources: list[str], rows: list[int],
             segments: list[int | None] | None = None) -> np.ndarray:
        return contains(self.by_stage.get(stage, _EMPTY), rows_hashes(sources, rows, segments))

    def mask_rows(self, stage: str, rows: list[dict]) -> np.ndarray:
        """Which of ``rows`` (dicts) ``stage`` has finished."""
        return contains(self.by_stage.get(stage, _EMPTY), row_hashes(rows))

    def count(self, stage: str) -> int:
        return len(self.by_stage.get(stage, _EMPTY))


@dataclass
class RunState:
    """The durable state of a run folder, as far as resuming needs it."""

    finished: FinishedRows
    # Kept-output files of each stage, with the row-key hashes each holds.
    kept_files: dict[str, dict[str, np.ndarray]]
    # Rows of each input file finished by read (dropped) or filter (kept or dropped), not
    # counting segments of long documents.
    finished_per_source: Counter
    # Rows seen in each input file whose read completed.
    rows_seen: dict[str, int]
    # Input files with documents cut into segments: whether all of a document's segments
    # are finished shows only by cutting it again, so such a file is read again (its
    # finished rows and segments are skipped as they come).
    segmented_sources: set[str] = field(default_factory=set)

    def input_done(self, source: str) -> bool:
        """True when every row of ``source`` is finished by read or filter."""
        return (source in self.rows_seen and source not in self.segmented_sources
                and self.finished_per_source[source] >= self.rows_seen[source])

    def unfinished(self, stage: str) -> dict[str, int]:
        """Files of the stage before ``stage`` holding rows ``stage`` has not finished,
        with how many such rows each holds."""
        done = self.finished.by_stage.get(stage, _EMPTY)
        counts = {uri: int((~contains(done, hashes)).sum())
                  for uri, hashes in self.kept_files.get(PREVIOUS[stage], {}).items()}
        return {uri: n for uri, n in counts.items() if n}


def _read_columns(storage: Storage, uri: str, columns: list[str]) -> dict[str, list[Any]]:
    """``columns`` of a stage file; one it lacks (``segment``, in files of an older bft)
    comes back as nulls."""
    with storage.open(uri, "rb") as fh:
        pf = pq.ParquetFile(fh)
        table = pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])
    return {name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
            for name in columns}


def scan_run(storage: Storage, run_uri: str) -> RunState:
    """Read the keys of everything a run folder holds (two small columns per file)."""
    finished: dict[str, list[np.ndarray]] = {stage: [] for stage in ORDER}
    kept_files: dict[str, dict[str, np.ndarray]] = {}
    per_source: Counter = Counter()
    segmented: set[str] = set()

    def count_source(cols: dict[str, list[Any]]) -> None:
        for source, segment in zip(cols["source"], cols["segment"]):
            if segment is None:
                per_source[source] += 1
            else:
                segmented.add(source)

    for stage, folder in FOLDERS.items():
        kept_files[stage] = {}
        for uri in parquet_files(storage, join(run_uri, folder)):
            cols = _read_columns(storage, uri, ["source", "source_row", "segment"])
            hashes = rows_hashes(cols["source"], cols["source_row"], cols["segment"])
            kept_files[stage][uri] = hashes
            finished[stage].append(hashes)
            if stage == "filter":
                count_source(cols)

    for uri in parquet_files(storage, join(run_uri, DROPPED_DIR)):
        cols = _read_columns(storage, uri, ["stage", "source", "source_row", "segment"])
        stage = cols["stage"][0] if cols["stage"] else None
        if stage not in finished:
            continue
        finished[stage].append(rows_hashes(cols["source"], cols["source_row"], cols["segment"]))
        if stage in ("read", "filter"):
            count_source(cols)

    rows_seen = {stats["source"]: stats["rows_seen"] for stats in read_stats(storage, run_uri)}

    by_stage = {stage: np.unique(np.concatenate(parts)) if parts else _EMPTY
                for stage, parts in finished.items()}
    return RunState(FinishedRows(by_stage), kept_files, per_source, rows_seen, segmented)


# --- the run record: one config per run id ---------------------------------------------

def _content_fields(snapshot: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a config snapshot to dotted fields, leaving out scheduling fields."""
    flat: dict[str, Any] = {}
    for key, value in snapshot.items():
        dotted = f"{prefix}{key}"
        if dotted in SCHEDULING_FIELDS:
            continue
        # engine_kwargs is compared whole: its keys are free-form
        if isinstance(value, dict) and value and not dotted.endswith(".engine_kwargs"):
            flat.update(_content_fields(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def write_run_record(storage: Storage, run_uri: str, cfg: BftConfig, prompt_sha256: dict[str, str],
                     inputs_sha256: dict[str, str] | None = None) -> None:
    record = {"config": cfg.redacted(), "prompt_sha256": prompt_sha256, "inputs_sha256": inputs_sha256 or {}}
    storage.write_bytes(join(run_uri, RUN_RECORD), mask(json.dumps(record, indent=2)).encode())


def check_same_run(storage: Storage, run_uri: str, cfg: BftConfig, prompt_sha256: dict[str, str],
                   inputs_sha256: dict[str, str] | None = None) -> None:
    """A run id is resumed only with the config it started with (scheduling fields
    aside): mixing outputs of two configs in one dataset would be silent corruption."""
    uri = join(run_uri, RUN_RECORD)
    if not storage.exists(uri):
        raise ValueError(f"{run_uri} holds files but no {RUN_RECORD}: it is not a bft run "
                         f"(or predates resume); pick another --run-id")
    record = json.loads(storage.read_bytes(uri))
    before = {**_content_fields(record["config"]),
              **{f"prompt template of {k}": v for k, v in record.get("prompt_sha256", {}).items()},
              **{f"sha256 of {k}": v for k, v in record.get("inputs_sha256", {}).items()}}
    now = {**_content_fields(json.loads(mask(json.dumps(cfg.redacted())))),  # as write_run_record wrote it
           **{f"prompt template of {k}": v for k, v in prompt_sha256.items()},
           **{f"sha256 of {k}": v for k, v in (inputs_sha256 or {}).items()}}
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise ValueError(f"cannot resume {run_uri}: it was started with a different config ({shown}). "
                         f"Re-run with the original config, or use a new --run-id")
