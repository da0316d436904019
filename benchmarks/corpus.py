"""Benchmark documents: every one passes bft's filters and costs the engine the same.

Synthetic documents are random sentences over the words of ``examples/docs.jsonl``
(real web text, so token statistics are realistic). Each has the same length in
characters, so N and 10·N documents are exactly N and 10·N units of work, and no two
are duplicates. A real corpus can be used instead (``--input``); its first documents
are taken as they are.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORD_SOURCE = ROOT / "examples" / "docs.jsonl"
WORD_RE = re.compile(r"[a-z]{2,12}")


def _words() -> list[str]:
    texts = []
    for line in WORD_SOURCE.read_text().splitlines():
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            continue  # the quickstart input has a broken row on purpose
    return sorted(set(WORD_RE.findall(" ".join(texts).lower())))


def synthetic_docs(n: int, chars: int = 1500, seed: int = 0) -> list[dict]:
    """``n`` documents of ``chars`` characters: paragraphs of random sentences."""
    words = _words()
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        paragraphs: list[str] = []
        length = 0
        while length < chars:
            sentences = []
            for _ in range(rng.randint(3, 5)):
                sentence = " ".join(rng.choice(words) for _ in range(rng.randint(8, 16)))
                sentences.append(sentence[0].upper() + sentence[1:] + ".")
            paragraphs.append(" ".join(sentences))
            length += len(paragraphs[-1]) + 2
        text = "\n\n".join(paragraphs)[:chars].rsplit(" ", 1)[0] + "."
        docs.append({"id": f"bench-{i:06d}", "url": f"https://bench.invalid/{i}", "text": text})
    return docs


def corpus_docs(path: str, n: int) -> list[dict]:
    """The first ``n`` documents of a JSONL or Parquet file (fields id, text, url)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).slice(0, n).to_pylist()
    else:
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for _, line in zip(range(n), fh)]
    if len(rows) < n:
        raise SystemExit(f"{path}: has {len(rows)} documents, the benchmark needs {n}")
    return [{"id": str(r.get("id", i)), "url": r.get("url") or "", "text": r["text"]} for i, r in enumerate(rows)]


def write_jsonl(docs: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path
