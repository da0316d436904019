"""Cheap quality heuristics in the spirit of Gopher/C4 rules: repetition, shouting,
and navigation or legal boilerplate. Thresholds live in :class:`FilterConfig`."""

from __future__ import annotations

import re
from collections import Counter

from bft.config import FilterConfig
from bft.filters.base import Drop

WORD_RE = re.compile(r"\w+", re.UNICODE)

# Phrases typical of page chrome rather than content. Counted once each.
BOILERPLATE_PHRASES = (
    "cookie", "privacy policy", "terms of use", "terms and conditions", "all rights reserved",
    "sign in", "log in", "login", "sign up", "subscribe", "newsletter", "click here",
    "skip to content", "javascript", "share this", "follow us", "contact us", "copyright",
    "powered by", "add to cart", "read more", "home page",
)


def duplicate_line_fraction(text: str) -> float:
    """Share of characters in lines that already appeared earlier in the document."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    total = sum(len(line) for line in lines)
    if not total:
        return 0.0
    seen: set[str] = set()
    repeated = 0
    for line in lines:
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total


def duplicate_ngram_fraction(text: str, n: int = 5) -> float:
    """Share of word characters covered by word n-grams that occur more than once."""
    words = WORD_RE.findall(text.lower())
    if len(words) < n * 2:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            for j in range(i, i + n):
                covered[j] = True
    total = sum(len(w) for w in words)
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


def uppercase_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if c.isupper()) / len(letters)


def short_line_fraction(text: str, min_words: int = 4) -> tuple[float, int]:
    """Share of non-empty lines with fewer than ``min_words`` words, and the line count."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0, 0
    short = sum(1 for line in lines if len(WORD_RE.findall(line)) < min_words)
    return short / len(lines), len(lines)


def boilerplate_phrase_count(text: str) -> int:
    lower = text.lower()
    return sum(1 for phrase in BOILERPLATE_PHRASES if phrase in lower)


def check_quality(text: str, cfg: FilterConfig) -> Drop | None:
    value = duplicate_line_fraction(text)
    if value > cfg.max_duplicate_line_fraction:
        return Drop("repeated_lines", f"{value:.2f} of characters in repeated lines "
                                      f"> {cfg.max_duplicate_line_fraction}")
    value = duplicate_ngram_fraction(text)
    if value > cfg.max_duplicate_ngram_fraction:
        return Drop("repeated_ngrams", f"{value:.2f} of characters in repeated 5-grams "
                                       f"> {cfg.max_duplicate_ngram_fraction}")
    value = uppercase_fraction(text)
    if value > cfg.max_uppercase_fraction:
        return Drop("uppercase", f"{value:.2f} of letters uppercase > {cfg.max_uppercase_fraction}")
    value, n_lines = short_line_fraction(text)
    if n_lines >= cfg.min_lines_for_short_line_check and value > cfg.max_short_line_fraction:
        return Drop("boilerplate", f"{value:.2f} of {n_lines} lines have under 4 words "
                                   f"> {cfg.max_short_line_fraction}")
    count = boilerplate_phrase_count(text)
    if count >= cfg.max_boilerplate_phrases:
        return Drop("boilerplate", f"{count} navigation/legal phrases >= {cfg.max_boilerplate_phrases}")
    return None
