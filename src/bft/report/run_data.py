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

from bft.stages import FOLDERS
from bft.storage import Storage, join
from bft.writers.manifest import MANIFEST_NAME, tally_run
from bft.writers.parquet import dropped_files, parquet_files

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


def _read(storage: Storage, uri: str, columns: list[str]) -> pa.Table:
    with storage.open(uri, "rb") as fh:
        try:
            return pq.read_table(fh, columns=columns)
        except (pa.ArrowInvalid, KeyError) as exc:
            raise ReportError(f"{uri}: cannot read columns {columns}: {exc}") from None


def _tables(storage: Storage, folder: str, columns: list[str]) -> Iterator[pa.Table]:
    for uri in parquet_files(storage, folder):
        yield _read(storage, uri, columns)


def _ints(table: pa.Table, column: str) -> list[int]:
    return [v for v in table.column(column).to_pylist() if v is not None]


def _measure(column: pa.ChunkedArray, chars: list[int], tokens: list[int],
             count_tokens: Callable[[list[str]], list[int]] | None) -> None:
    """Append the character (and token) lengths of a text column's non-null values."""
    texts = [t for t in column.to_pylist() if t is not None]
    chars += [len(t) for t in texts]
    if count_tokens:
        tokens += count_tokens(texts)


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
    """Uniform random sample of a stream of unknown length (Algorithm R), offered a
    table at a time: only the rows it keeps are turned into Python dicts."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seen = 0
        self.items: list[dict[str, Any]] = []
        self._rng = random.Random(seed)

    def offer(self, table: pa.Table) -> None:
        chosen: dict[int, int] = {}  # slot -> row of this table (a later row replaces an earlier one)
        filled = len(self.items)
        for row in range(table.num_rows):
            self.seen += 1
            if filled < self.size:
                slot, filled = filled, filled + 1
            else:
                slot = self._rng.randrange(self.seen)
                if slot >= self.size:
                    continue
            chosen[slot] = row
        if not chosen:
            return
        # Slots that grow the sample come first and in order (the sample fills before
        # any replacement), so appending them in dict order puts each in its place.
        for slot, item in zip(chosen, table.take(list(chosen.values())).to_pylist()):
            if slot < len(self.items):
                self.items[slot] = item
            else:
                self.items.append(item)


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
    for table in _tables(storage, join(run_uri, FOLDERS["filter"]), ["n_chars", "n_tokens"]):
        data.doc_chars += _ints(table, "n_chars")
        data.doc_tokens += _ints(table, "n_tokens")
    for table in _tables(storage, join(run_uri, FOLDERS["generate"]), ["instruction"]):
        _measure(table.column("instruction"), data.instruction_chars, data.instruction_tokens, count_tokens)
    for table in _tables(storage, join(run_uri, FOLDERS["curate"]), ["score", "n_chars"]):
        data.scores += table.column("score").to_pylist()
        data.score_doc_chars += table.column("n_chars").to_pylist()
    # Only curate's drop files: the others (most of dropped/, filter's whole documents)
    # hold no scores.
    for uri in dropped_files(storage, run_uri, "curate"):
        curate = _read(storage, uri, ["reason", "score", "text"])
        reasons = curate.column("reason").to_pylist()
        data.unparseable_scores += reasons.count(UNPARSEABLE_SCORE)
        data.out_of_range_scores += reasons.count(OUT_OF_RANGE_SCORE)
        lengths = pc.utf8_length(curate["text"]).to_pylist()
        for score, n_chars in zip(curate.column("score").to_pylist(), lengths):
            if score is not None:  # below the threshold: scored, then dropped
                data.scores.append(score)
                data.score_doc_chars.append(n_chars)

    reservoir = _Reservoir(sample_size, seed)
    for table in _tables(storage, join(run_uri, FOLDERS["rewrite"]), PAIR_COLUMNS):
        _measure(table.column("response"), data.response_chars, data.response_tokens, count_tokens)
        reservoir.offer(table)
    data.final_pairs = reservoir.seen
    data.sample = reservoir.items
    log.info("report: %d final pairs, %d in the text sample", data.final_pairs, len(data.sample))
    return data
