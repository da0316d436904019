"""Diversity of instructions and responses: unique trigrams, leading words, near-duplicates."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from bft.filters.near_dedup import similar_pairs
from bft.filters.quality import WORD_RE

# Unique trigrams are counted over this many texts, so runs of different sizes compare
# (the count grows more slowly than the number of texts).
TRIGRAM_WINDOW = 1000


def words(text: str) -> list[str]:
    return WORD_RE.findall((text or "").lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def unique_trigrams(texts: list[str], seed: int = 0) -> dict[str, Any]:
    """Distinct word trigrams per 1,000 texts (over a random 1,000 when there are more;
    scaled up from fewer), and distinct/total trigrams."""
    if not texts:
        return {"n": 0, "unique_trigrams_per_1k": None, "distinct_trigram_ratio": None}
    window = texts if len(texts) <= TRIGRAM_WINDOW else random.Random(seed).sample(texts, TRIGRAM_WINDOW)
    distinct: set[tuple[str, ...]] = set()
    total = 0
    for text in window:
        tokens = words(text)
        grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
        total += len(grams)
        distinct.update(grams)
    return {"n": len(window), "unique_trigrams_per_1k": round(len(distinct) * 1000 / len(window), 1),
            "distinct_trigram_ratio": round(len(distinct) / total, 4) if total else None}


def leading_words(instructions: list[str], top: int = 15) -> dict[str, Any]:
    """The first word of each instruction: the verb of an imperative ("Explain", "Write")
    or the question word. Few distinct leading words means templated instructions."""
    counts = Counter(tokens[0] for tokens in map(words, instructions) if tokens)
    return {"distinct": len(counts), "top": [[word, n] for word, n in counts.most_common(top)]}


def _shingles(text: str) -> set[str]:
    normalized = " ".join(words(text))
    return {normalized[i:i + 5] for i in range(max(1, len(normalized) - 4))} if normalized else set()


def near_duplicates(texts: list[str], threshold: float, seed: int = 0, num_perm: int = 64,
                    examples: int = 5) -> dict[str, Any]:
    """Pairs whose character 5-gram Jaccard similarity reaches ``threshold``: MinHash LSH
    candidates (the code of the near-duplicate filter, ``bft.filters.near_dedup``), each
    checked exactly, so the figure counts true pairs only."""
    pairs = similar_pairs([_shingles(t) for t in texts], threshold, num_perm, seed + 1)
    involved = {i for _, x, y in pairs for i in (x, y)}
    return {
        "n": len(texts),
        "threshold": threshold,
        "pairs": len(pairs),
        "texts_with_a_near_duplicate": len(involved),
        "share": round(len(involved) / len(texts), 4) if texts else None,
        "examples": [{"jaccard": round(s, 3), "a": texts[x], "b": texts[y]} for s, x, y in pairs[:examples]],
    }
