"""The result of a failed check."""

from __future__ import annotations

from typing import Any, NamedTuple


class Drop(NamedTuple):
    """Why a row leaves the pipeline: a stable ``reason`` code, a readable ``detail``, and
    any values the step did produce (e.g. the score of a pair below the threshold)."""

    reason: str
    detail: str
    fields: dict[str, Any] = {}
