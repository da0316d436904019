"""Rewrite: turn the document into a direct assistant answer, extracted from [RES]...[/RES]."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from bft.config.models import StageConfig
from bft.filters.base import Drop

NAME = "rewrite"
DESCRIPTION = "Rewriting documents into assistant answers."
PLACEHOLDERS = {"document", "instruction"}
REQUIRED_PLACEHOLDERS = PLACEHOLDERS
INPUT_COLUMNS = ("text", "instruction")
OUTPUT_COLUMNS = {"response": pa.string()}
# The response of a dropped rewrite is in raw_output.
DROP_COLUMNS = ()


class Config(StageConfig):
    stage_defaults: ClassVar[dict[str, Any]] = {
        "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 1024},
    }

    min_response_chars: int = Field(default=1, ge=1)
    """Drop rewritten responses shorter than this."""

OPEN_RE = re.compile(r"\[\s*RES\s*\]", re.IGNORECASE)
CLOSE_RE = re.compile(r"\[\s*/\s*RES\s*\]", re.IGNORECASE)


def prompt_values(row: dict[str, Any]) -> dict[str, str]:
    return {"document": row["text"], "instruction": row["instruction"]}


def extract_response(raw: str) -> str | Drop:
    """The text between the first ``[RES]`` and the next ``[/RES]``."""
    text = raw or ""
    if not text.strip():
        return Drop("empty_output", "the model returned nothing")
    opening = OPEN_RE.search(text)
    if opening is None:
        return Drop("missing_response_tag", "no [RES] tag in the output")
    closing = CLOSE_RE.search(text, opening.end())
    if closing is None:
        # Usually a reply cut off by max_tokens: keeping it would keep a truncated answer.
        return Drop("missing_end_tag", "no [/RES] after [RES] (output truncated?)")
    response = text[opening.end():closing.start()].strip()
    if not response:
        return Drop("empty_response", "nothing between [RES] and [/RES]")
    return response


def parse(raw: str, cfg: Config) -> dict[str, Any] | Drop:
    response = extract_response(raw)
    if isinstance(response, Drop):
        return response
    if len(response) < cfg.min_response_chars:
        return Drop("response_too_short",
                    f"{len(response)} characters < rewrite.min_response_chars {cfg.min_response_chars}")
    return {"response": response}
