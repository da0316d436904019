"""How far rewritten responses moved from their documents.

Two cheap signals, no model needed:
- copied share: the fraction of a response's word trigrams that occur in its document
  (1.0 = stitched from the document, near 0 = new wording, or new content);
- unsupported tokens: numbers and capitalized names in the response that appear nowhere
  in the document. The rewrite is told to add no facts, so each one is a candidate
  hallucination (or a harmless reformatting: "5" for "five").
"""

from __future__ import annotations

import re
from statistics import mean
from typing import Any

from bft.report.counts import distribution
from bft.report.diversity import ngrams, words

NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")
CAPITALIZED_RE = re.compile(r"\b[A-Z][\w'’-]*")
# A capital after these (or at the start) opens a sentence, a quote or a list item and
# says nothing about names.
SENTENCE_OPENERS = ".!?:;\"'“‘([{*#-•\n"


def _numbers(text: str) -> set[str]:
    return {m.group(0).replace(",", "").rstrip(".") for m in NUMBER_RE.finditer(text)}


def _names(text: str) -> list[str]:
    names = []
    for m in CAPITALIZED_RE.finditer(text):
        # The character before the word, spaces and tabs skipped (looked up in place:
        # slicing the text before each word would be quadratic in its length).
        i = m.start() - 1
        while i >= 0 and text[i] in " \t":
            i -= 1
        if i < 0 or text[i] in SENTENCE_OPENERS or m.group(0) == "I":
            continue
        names.append(m.group(0))
    return names


def copied_share(response: str, document: str) -> float | None:
    response_words = words(response)
    n = 3 if len(response_words) >= 3 else 1
    response_grams = ngrams(response_words, n)
    if not response_grams:
        return None
    return len(response_grams & ngrams(words(document), n)) / len(response_grams)


def unsupported_tokens(response: str, document: str) -> list[str]:
    """Numbers and mid-sentence capitalized words of ``response`` absent from ``document``
    (names compared case-insensitively, numbers without thousands separators)."""
    doc_numbers = _numbers(document)
    doc_words = set(words(document))
    missing = sorted(n for n in _numbers(response) if n not in doc_numbers)
    seen = set()
    for name in _names(response):
        key = name.lower()
        if key not in seen and not set(words(key)) <= doc_words:
            seen.add(key)
            missing.append(name)
    return missing


def faithfulness(pairs: list[dict[str, Any]], worst: int = 5) -> tuple[dict[str, Any], list[float], list[int]]:
    """Summary over sampled final pairs (``text``, ``response``, ...), plus each pair's
    copied share and unsupported-token count (for the plots)."""
    shares, counts, ranked = [], [], []
    for pair in pairs:
        share = copied_share(pair["response"] or "", pair["text"] or "")
        missing = unsupported_tokens(pair["response"] or "", pair["text"] or "")
        if share is not None:
            shares.append(share)
        counts.append(len(missing))
        if missing:
            ranked.append((len(missing), share or 0.0, pair, missing))
    # Most unsupported tokens first; among equals, the least copied.
    ranked.sort(key=lambda item: (-item[0], item[1], item[2]["id"] or ""))
    flagged = sum(1 for c in counts if c)
    summary = {
        "n": len(pairs),
        "copied_trigram_share": distribution([round(s, 4) for s in shares]),
        "unsupported_tokens_per_response": round(mean(counts), 3) if counts else None,
        "responses_with_unsupported_tokens": flagged,
        "responses_with_unsupported_tokens_share": round(flagged / len(counts), 4) if counts else None,
        "worst": [{"id": p["id"], "url": p["url"], "instruction": p["instruction"], "response": p["response"],
                   "unsupported": missing, "copied_trigram_share": round(share, 4)}
                  for _, share, p, missing in ranked[:worst]],
    }
    return summary, shares, counts
