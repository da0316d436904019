"""The result of a failed check."""

from __future__ import annotations

from typing import NamedTuple


class Drop(NamedTuple):
    """Why a row leaves the pipeline: a stable ``reason`` code and a readable ``detail``."""

    reason: str
    detail: str
