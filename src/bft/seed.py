"""Seed pairs: the human-written (instruction, response) pairs the method starts from.

They are few-shot examples for generate (``generate.few_shot``), the training data of
``bft train`` and, with ``output.seed_mix``, part of the final dataset. Seed sets are
small (thousands of pairs), so they are read whole, on the driver, and travel with the
run context.

A row that cannot be used (no instruction, an empty response, a number where text belongs,
bad JSON) is reported with its file and row and counted (``SeedSet.problems``); the rest
are used. Only a seed set with no usable pair at all is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from bft.config.models import ConfigError, SeedConfig
from bft.readers.base import lookup
from bft.storage import Storage, detect_format

log = logging.getLogger("bft.seed")

# Problems listed in full in messages, manifests and training records; the rest are counted.
LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class SeedPair:
    id: str
    instruction: str
    response: str
    source: str
    source_row: int


@dataclass
class SeedSet:
    uri: str
    pairs: list[SeedPair]
    rows: int = 0
    """Rows read, usable or not."""
    problems: list[str] = field(default_factory=list)
    """One line per unusable row: ``<file>, row <n>: <why>``."""

    @property
    def sha256(self) -> str:
        """Digest of the usable pairs (ids and texts): what a training or a run used."""
        h = hashlib.sha256()
        for pair in self.pairs:
            h.update(json.dumps([pair.id, pair.instruction, pair.response]).encode())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """For the manifest and the training record."""
        return {"uri": self.uri, "rows": self.rows, "pairs": len(self.pairs), "unusable": len(self.problems),
                "problems": self.problems[:LISTED_PROBLEMS], "sha256": self.sha256}

    def by_id(self) -> dict[str, SeedPair]:
        return {pair.id: pair for pair in self.pairs}


def _text(record: dict[str, Any], column: str) -> tuple[str | None, str | None]:
    """(value, problem) of a text field."""
    value = lookup(record, column)
    if value is None:
        return None, f"no '{column}' field"
    if not isinstance(value, str):
        return None, f"'{column}' is {type(value).__name__}, not a string"
    if not value.strip():
        return None, f"'{column}' is empty"
    return value.strip(), None


def _from_messages(messages: Any, column: str) -> tuple[str | None, str | None, str | None]:
    """(instruction, response, problem) from the first user and first assistant turn."""
    if not isinstance(messages, list):
        return None, None, f"'{column}' is {type(messages).__name__}, not a list of turns"
    found: dict[str, Any] = {}
    for turn in messages:
        if isinstance(turn, dict) and turn.get("role") in ("user", "assistant"):
            found.setdefault(turn["role"], turn.get("content"))
    texts = []
    for role in ("user", "assistant"):
        content = found.get(role)
        if content is None:
            return None, None, f"'{column}' has no {role} turn"
        if not isinstance(content, str) or not content.strip():
            return None, None, f"the first {role} turn of '{column}' is empty or not text"
        texts.append(content.strip())
    return texts[0], texts[1], None


def to_pair(record: dict[str, Any], cfg: SeedConfig, source: str, row: int, name: str = "seed") -> SeedPair | str:
    """A pair, or why the row cannot be used. Without an id field the pair is called
    ``<name>-<row>``, ``name`` being the file's (``seed-3`` for row 3 of ``seed.jsonl``)."""
    if lookup(record, cfg.instruction_column) is None and lookup(record, cfg.messages_column) is not None:
        instruction, response, problem = _from_messages(lookup(record, cfg.messages_column), cfg.messages_column)
    else:
        instruction, problem = _text(record, cfg.instruction_column)
        response, problem_2 = _text(record, cfg.response_column)
        problem = problem or problem_2
    if problem:
        return problem
    raw_id = lookup(record, cfg.id_column or "id")
    pair_id = str(raw_id) if raw_id is not None else f"{name}-{row}"
    return SeedPair(pair_id, instruction, response, source, row)  # type: ignore[arg-type]


def _records(storage: Storage, uri: str, fmt: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(row, record or problem) of one file."""
    from bft.readers.jsonl import RejectedLine, iter_jsonl_records

    if fmt == "jsonl":
        for row, record in iter_jsonl_records(storage, uri):
            # A bad line comes as its drop record, whose detail says why ("<file>, row N: why").
            yield row, record["detail"].split(": ", 1)[-1] if isinstance(record, RejectedLine) else record
    else:
        import pyarrow.parquet as pq

        with storage.open(uri, "rb") as fh:
            for row, record in enumerate(pq.read_table(fh).to_pylist(), start=1):
                yield row, record


def seed_files(storage: Storage, cfg: SeedConfig) -> list[tuple[str, str]]:
    """(file, format) of every seed file under ``cfg.uri``."""
    assert cfg.uri is not None
    files = storage.list_files(cfg.uri)
    if not files:
        raise ConfigError(f"seed.uri: nothing found at {cfg.uri}")
    out = []
    for uri in files:
        fmt = cfg.format if cfg.format != "auto" else detect_format(uri)
        if fmt is None:
            if len(files) == 1:
                raise ConfigError(f"seed.uri: cannot tell the format of {uri} from its name; set seed.format")
            continue  # a folder's other files (README, _SUCCESS)
        out.append((uri, fmt))
    if not out:
        raise ConfigError(f"seed.uri: no JSONL or Parquet file under {cfg.uri}")
    return out


def _file_name(root: str, uri: str) -> str:
    """A seed file's path below ``seed.uri`` without extensions (``seed`` for
    ``seed.jsonl.gz``, ``part/2`` for ``<uri>/part/2.parquet``): default ids stay unique
    across the files of a folder."""
    relative = uri[len(root.rstrip("/")):].lstrip("/") or uri.rsplit("/", 1)[-1]
    folder, _, file = relative.rpartition("/")
    stem = file.split(".", 1)[0] or file
    return f"{folder}/{stem}" if folder else stem


def load_seed(cfg: SeedConfig, storage: Storage) -> SeedSet:
    """Read every seed file; logs the unusable rows (file and row) and fails only when no
    pair is usable."""
    if not cfg.uri:
        raise ConfigError("seed.uri is not set: it names the seed pairs (JSONL or Parquet)")
    seeds = SeedSet(cfg.uri, [])
    seen: set[str] = set()
    for uri, fmt in seed_files(storage, cfg):
        name = _file_name(cfg.uri, uri)
        try:
            for row, record in _records(storage, uri, fmt):
                seeds.rows += 1
                pair = record if isinstance(record, str) else to_pair(record, cfg, uri, row, name)
                if isinstance(pair, SeedPair) and pair.id in seen:
                    pair = f"id {pair.id!r} appears twice"
                if isinstance(pair, str):
                    seeds.problems.append(f"{uri}, row {row}: {pair}")
                    continue
                seen.add(pair.id)
                seeds.pairs.append(pair)
        except (OSError, EOFError, ValueError) as exc:
            raise ConfigError(f"seed.uri: {uri} cannot be read: {type(exc).__name__}: {exc}") from None
    if seeds.problems:
        listed = "; ".join(seeds.problems[:LISTED_PROBLEMS])
        more = len(seeds.problems) - LISTED_PROBLEMS
        log.warning("seed data: %d of %d rows cannot be used and are left out: %s%s", len(seeds.problems),
                    seeds.rows, listed, f"; and {more} more" if more > 0 else "")
    if not seeds.pairs:
        raise ConfigError(f"seed.uri: no usable (instruction, response) pair in {cfg.uri} "
                          f"({seeds.rows} rows; first problem: {seeds.problems[0] if seeds.problems else 'none'}). "
                          f"Set seed.instruction_column / seed.response_column, or seed.messages_column")
    return seeds
