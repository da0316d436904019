"""What a report reads from a run: its manifest and per-stage Parquet.

Files are read one at a time and only the columns a measure needs, so a report over
millions of rows holds numbers for every row but text only for a random sample of the
final pairs (reservoir-sampled, seeded: the same run gives the same sample).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bft.schema import STAGE_DIRS
from bft.storage import Storage, join
from bft.writers.manifest import MANIFEST_NAME, tally_run
from bft.writers.parquet import DROPPED_DIR, parquet_files

log = logging.getLogger(__name__)

# Columns of a final pair kept in the sample (rewritten/ holds the document text too).
PAIR_COLUMNS = ["id", "url", "text", "instruction", "score", "response"]
# Curate drops that carry no readable score.
UNPARSEABLE_SCORE = "unparseable_score"
OUT_OF_RANGE_SCORE = "score_out_of_range"


class ReportError(RuntimeError):
    """The run cannot be reported on (nothing there, not a run folder)."""


@dataclass
class RunData:
    run_uri: str
    manifest: dict[str, Any] | None
    tallies: dict[str, Any]  # writers.manifest tallies: counts from the files themselves
    doc_chars: list[int] = field(default_factory=list)  # filtered/: documents sent to the models
    doc_tokens: list[int] = field(default_factory=list)
    instruction_chars: list[int] = field(default_factory=list)  # generated/
    instruction_tokens: list[int] = field(default_factory=list)
    scores: list[int] = field(default_factory=list)  # every readable curate score, kept or not
    score_doc_chars: list[int] = field(default_factory=list)  # the length of each scored document
    unparseable_scores: int = 0
    out_of_range_scores: int = 0
    response_chars: list[int] = field(default_factory=list)  # rewritten/
    response_tokens: list[int] = field(default_factory=list)
    final_pairs: int = 0  # rows in rewritten/, the pairs the SFT set is built from
    sample: list[dict[str, Any]] = field(default_factory=list)  # random final pairs, with text


def _tables(storage: Storage, folder: str, columns: list[str]) -> Iterator[pa.Table]:
    for uri in parquet_files(storage, folder):
        with storage.open(uri, "rb") as fh:
            try:
                yield pq.read_table(fh, columns=columns)
            except (pa.ArrowInvalid, KeyError) as exc:
                raise ReportError(f"{uri}: cannot read columns {columns}: {exc}") from None


def _ints(table: pa.Table, column: str) -> list[int]:
    return [v for v in table.column(column).to_pylist() if v is not None]


def read_manifest(storage: Storage, run_uri: str) -> dict[str, Any] | None:
    """The run's manifest, or ``None`` when the run has none (still running, or killed)."""
    uri = join(run_uri.rstrip("/"), MANIFEST_NAME)
    if not storage.exists(uri):
        log.warning("%s: no manifest (run unfinished?); throughput and the counts check are left out", uri)
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{uri}: not valid JSON ({exc})") from None


class _Reservoir:
    """Uniform random sample of a stream of unknown length (Algorithm R)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seen = 0
        self.items: list[dict[str, Any]] = []
        self._rng = random.Random(seed)

    def offer(self, item: dict[str, Any]) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.size:
            self.items[slot] = item


def check_run_folder(storage: Storage, run_uri: str) -> None:
    if not storage.exists(run_uri):
        raise ReportError(f"{run_uri}: no run there (nothing found at that path)")


def load_run(storage: Storage, run_uri: str, manifest: dict[str, Any] | None, sample_size: int, seed: int,
             count_tokens: Callable[[list[str]], list[int]] | None = None) -> RunData:
    """Everything the report measures, from the run's files. ``count_tokens`` (texts to
    token counts) measures instructions and responses; without it only documents have
    token lengths (recorded at filtering)."""
    run_uri = run_uri.rstrip("/")
    tallies = tally_run(storage, run_uri)
    if not any(t.out or t.dropped or t.rows_in for t in tallies.values()):
        raise ReportError(f"{run_uri}: not a bft run folder (no stage outputs, no read records)")
    data = RunData(run_uri=run_uri, manifest=manifest, tallies=tallies)

    log.info("report: reading %s", run_uri)
    for table in _tables(storage, join(run_uri, STAGE_DIRS["filter"]), ["n_chars", "n_tokens"]):
        data.doc_chars += _ints(table, "n_chars")
        data.doc_tokens += _ints(table, "n_tokens")
    for table in _tables(storage, join(run_uri, STAGE_DIRS["generate"]), ["instruction"]):
        instructions = [t for t in table.column("instruction").to_pylist() if t is not None]
        data.instruction_chars += [len(t) for t in instructions]
        if count_tokens:
            data.instruction_tokens += count_tokens(instructions)
    for table in _tables(storage, join(run_uri, STAGE_DIRS["curate"]), ["score", "n_chars"]):
        data.scores += table.column("score").to_pylist()
        data.score_doc_chars += table.column("n_chars").to_pylist()
    for table in _tables(storage, join(run_uri, DROPPED_DIR), ["stage", "reason", "score", "text"]):
        curate = table.filter(pc.equal(table["stage"], "curate"))
        if not curate.num_rows:
            continue
        reasons = curate.column("reason").to_pylist()
        data.unparseable_scores += reasons.count(UNPARSEABLE_SCORE)
        data.out_of_range_scores += reasons.count(OUT_OF_RANGE_SCORE)
        lengths = pc.utf8_length(curate["text"]).to_pylist()
        for score, n_chars in zip(curate.column("score").to_pylist(), lengths):
            if score is not None:  # below the threshold: scored, then dropped
                data.scores.append(score)
                data.score_doc_chars.append(n_chars)

    reservoir = _Reservoir(sample_size, seed)
    for table in _tables(storage, join(run_uri, STAGE_DIRS["rewrite"]), PAIR_COLUMNS):
        responses = [t for t in table.column("response").to_pylist() if t is not None]
        data.response_chars += [len(t) for t in responses]
        if count_tokens:
            data.response_tokens += count_tokens(responses)
        for row in table.to_pylist():
            reservoir.offer(row)
    data.final_pairs = reservoir.seen
    data.sample = reservoir.items
    log.info("report: %d final pairs, %d in the text sample", data.final_pairs, len(data.sample))
    return data
