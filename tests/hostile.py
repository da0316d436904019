"""A corpus of hostile input files, generated on the spot, with what the reader must make
of each (used by the reader unit tests and the e2e run through S3)."""

from __future__ import annotations

import gzip
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("river market winter garden engine history method signal harbor valley pattern "
         "library balance orbit lantern mineral copper canvas meadow ledger compass").split()


def prose(seed: int, n_words: int = 140) -> str:
    """A distinct, filter-passing paragraph (about 900 characters, no repeated lines)."""
    rng = random.Random(seed)
    sentences = []
    while sum(len(s) for s in sentences) < n_words * 6:
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
        sentences.append(" ".join(words).capitalize() + f" {seed}-{len(sentences)}.")
    return " ".join(sentences)


@dataclass
class HostileCorpus:
    files: list[Path]
    # read-stage drop reasons each file must produce (exact counts, unless noted below)
    read_drops: dict[str, Counter] = field(default_factory=dict)
    # files whose drop count is only known as "all rows, any of these reasons"
    all_dropped_as: dict[str, set[str]] = field(default_factory=dict)
    good_ids: set[str] = field(default_factory=set)  # rows that must reach the filter
    huge_id: str = "huge-10mb"


def write_hostile_corpus(folder: Path) -> HostileCorpus:
    folder.mkdir(parents=True, exist_ok=True)
    corpus = HostileCorpus(files=[])

    # 1. One JSONL file with a bad row of every kind between good ones.
    lines: list[bytes] = []
    expected: Counter = Counter()

    def good(doc_id: str, **extra) -> None:
        lines.append(json.dumps({"id": doc_id, "text": prose(len(lines)), **extra}).encode())
        corpus.good_ids.add(doc_id)

    def bad(raw: bytes, reason: str) -> None:
        lines.append(raw)
        expected[reason] += 1

    good("ok-1")
    bad(b'{"id": "cut", "text": "no closing', "malformed_json")
    bad(json.dumps({"id": "int-text", "text": 12345}).encode(), "invalid_text")
    bad(json.dumps({"id": "list-text", "text": ["a", "b"]}).encode(), "invalid_text")
    bad(json.dumps({"id": "no-text", "body": prose(99)}).encode(), "missing_text")
    bad(json.dumps({"id": "null-text", "text": None}).encode(), "missing_text")
    bad(json.dumps({"id": "blank", "text": " \n\t "}).encode(), "empty_text")
    bad(b'["an", "array"]', "not_an_object")
    bad(b'{"id": "latin1", "text": "caf\xe9 ' + prose(7).encode() + b'"}', "invalid_utf8")
    bad(b'{"id": "surrogate", "text": "half a pair \\ud800 ' + prose(8).encode() + b'"}', "invalid_utf8")
    bad(b"[" * 200_000 + b"]" * 200_000, "malformed_json")  # nesting deep enough to break a parser
    good("ok-odd-types", url=12345, meta={"nested": [1, 2]})
    good("ok-nul", note="a\u0000b")
    # ~10 MB of text: over input.max_document_chars, dropped at read with a 10,000-character preview
    bad(json.dumps({"id": corpus.huge_id, "text": "lorem ipsum dolor " * 600_000}).encode(), "too_large")
    good("ok-last")
    path = folder / "a-mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    corpus.files.append(path)
    corpus.read_drops[path.name] = expected

    # 2. Binary junk with a JSON name: every non-blank "line" is dropped, none crashes.
    junk = random.Random(4).randbytes(64 * 1024)
    path = folder / "b-binary.jsonl"
    path.write_bytes(junk)
    corpus.files.append(path)
    corpus.all_dropped_as[path.name] = {"invalid_utf8", "malformed_json"}
    corpus.read_drops[path.name] = Counter({"*": sum(1 for line in junk.split(b"\n") if line.strip())})

    # 3. gzip cut mid-stream: the rows before the cut are read, the rest is one drop.
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
        for i in range(40):
            gz.write(json.dumps({"id": f"gz-{i}", "text": prose(1000 + i)}).encode() + b"\n")
    data = buf.getvalue()
    path = folder / "c-truncated.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    corpus.files.append(path)
    corpus.read_drops[path.name] = Counter({"unreadable_file": 1})

    # 4. An empty file: nothing to read, nothing to fail.
    path = folder / "d-empty.jsonl"
    path.write_bytes(b"")
    corpus.files.append(path)
    corpus.read_drops[path.name] = Counter()

    # 5. Parquet with another schema (no text column): one file-level drop.
    path = folder / "e-other-schema.parquet"
    pq.write_table(pa.table({"id": ["x1", "x2"], "body": [prose(5), prose(6)]}), path)
    corpus.files.append(path)
    corpus.read_drops[path.name] = Counter({"wrong_schema": 1})

    # 6. Not Parquet at all.
    path = folder / "f-not-really.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file " * 20)
    corpus.files.append(path)
    corpus.read_drops[path.name] = Counter({"unreadable_file": 1})

    # 7. Parquet whose text column has the wrong type: every row dropped, typed reason.
    path = folder / "g-int-text.parquet"
    pq.write_table(pa.table({"id": ["n1", "n2", "n3"], "text": pa.array([1, 2, 3], pa.int64())}), path)
    corpus.files.append(path)
    corpus.read_drops[path.name] = Counter({"invalid_text": 3})

    # 8. Good Parquet.
    path = folder / "h-good.parquet"
    ids = [f"pq-{i}" for i in range(3)]
    pq.write_table(pa.table({"id": ids, "text": [prose(500 + i) for i in range(3)], "url": [None] * 3}), path)
    corpus.files.append(path)
    corpus.read_drops[path.name] = Counter()
    corpus.good_ids.update(ids)
    return corpus
