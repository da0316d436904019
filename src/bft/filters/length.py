"""Character-length bounds (Humpback kept documents of 600-3000 characters)."""

from __future__ import annotations

from bft.config import FilterConfig
from bft.filters.base import Drop


def check_length(text: str, cfg: FilterConfig) -> Drop | None:
    n = len(text)
    if n < cfg.min_chars:
        return Drop("too_short", f"{n} characters < filters.min_chars {cfg.min_chars}")
    if n > cfg.max_chars:
        return Drop("too_long", f"{n} characters > filters.max_chars {cfg.max_chars}")
    return None
