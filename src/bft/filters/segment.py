"""Cutting long documents into passages (``filters.long_documents: segment``).

Long pages are often the richest, so instead of dropping them they are cut into segments
of at most ``max_chars``: at paragraph breaks first, inside an over-long paragraph at
sentence ends, and inside an over-long sentence at spaces (a run of text with no space
at all is cut hard). Segments are packed to an even size (the document's length over the
number of segments it needs), so the last one is rarely a short leftover (one under
``min_chars`` is dropped as ``too_short`` by the length check, like any short document).
"""

from __future__ import annotations

import math
import re

from bft.config import FilterConfig
from bft.filters.base import Drop

PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")
# A sentence ends at . ! ? (or their CJK forms) followed by space, or at a line break.
SENTENCE_RE = re.compile(r"(?<=[.!?。！？])\s+|\n")


def _pieces(text: str, max_chars: int, pattern: re.Pattern[str] | None) -> list[str]:
    """``text`` split by ``pattern`` (then by spaces, then hard) into pieces of at most
    ``max_chars``."""
    if len(text) <= max_chars:
        return [text]
    if pattern is not None:
        parts = [p.strip() for p in pattern.split(text) if p.strip()]
        if len(parts) > 1:
            return [piece for part in parts for piece in _pieces(part, max_chars, None if pattern is SENTENCE_RE
                                                                  else SENTENCE_RE)]
        if pattern is PARAGRAPH_RE:
            return _pieces(text, max_chars, SENTENCE_RE)
    words = text.split()
    if len(words) > 1:
        out, current = [], ""
        for word in words:
            for chunk in ([word] if len(word) <= max_chars else
                          [word[i:i + max_chars] for i in range(0, len(word), max_chars)]):
                if current and len(current) + 1 + len(chunk) > max_chars:
                    out.append(current)
                    current = chunk
                else:
                    current = f"{current} {chunk}" if current else chunk
        return out + ([current] if current else [])
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]


def split_segments(text: str, max_chars: int) -> list[str]:
    """``text`` cut into segments of at most ``max_chars`` characters, paragraphs kept whole
    where they fit (joined by a blank line), sentences where a paragraph does not."""
    units: list[tuple[str, str]] = []  # (piece, separator before it)
    for paragraph in (p.strip() for p in PARAGRAPH_RE.split(text)):
        if paragraph:
            pieces = _pieces(paragraph, max_chars, SENTENCE_RE)
            units += [(piece, "\n\n" if i == 0 else " ") for i, piece in enumerate(pieces)]
    total = sum(len(piece) + len(sep) for piece, sep in units)
    target = total / max(1, math.ceil(total / max_chars))
    segments: list[str] = []
    current = ""
    for piece, sep in units:
        joined = f"{current}{sep}{piece}" if current else piece
        if current and (len(joined) > max_chars or len(current) >= target):
            segments.append(current)
            current = piece
        else:
            current = joined
    if current:
        segments.append(current)
    return segments


def segment_document(row: dict, cfg: FilterConfig) -> list[dict] | Drop:
    """The segments of a document over ``max_chars``, as rows (id ``<doc id>#<n>``, ``segment``
    n from 1, the document's url and source), or why it is dropped whole."""
    n = len(row["text"])
    if cfg.long_documents == "drop":
        return Drop("too_long", f"{n} characters > filters.max_chars {cfg.max_chars}")
    segments = split_segments(row["text"], cfg.max_chars)
    if len(segments) > cfg.max_segments:
        return Drop("too_long", f"{n} characters would make {len(segments)} segments of at most "
                                f"filters.max_chars {cfg.max_chars} > filters.max_segments {cfg.max_segments}")
    return [{**row, "id": f"{row['id']}#{i}", "segment": i, "text": text}
            for i, text in enumerate(segments, start=1)]
