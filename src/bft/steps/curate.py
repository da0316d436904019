"""Curate: score (instruction, document) pairs on a 5-point rubric; keep the best."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from bft.config.models import StageConfig
from bft.filters.base import Drop

NAME = "curate"
DESCRIPTION = "Scoring (instruction, document) pairs."
PLACEHOLDERS = {"document", "instruction"}
REQUIRED_PLACEHOLDERS = PLACEHOLDERS
INPUT_COLUMNS = ("text", "instruction")
OUTPUT_COLUMNS = {"score": pa.int64(), "curate_reasoning": pa.string()}
DROP_COLUMNS = ("score",)


class Config(StageConfig):
    # Scores must always parse, so the output is constrained to "<reasoning>\nScore: N".
    # The reasoning bound (characters) stays below max_tokens so the regex can complete.
    stage_defaults: ClassVar[dict[str, Any]] = {
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 256},
        "structured_output_regex": r"[^\n]{1,200}\nScore: [1-5]",
    }

    threshold: int = Field(default=5, ge=1, le=5)
    """Keep pairs scored at or above this (5-point rubric)."""

# "Score: 4", "**Score:** 4", "score = 4/5", "Score: 4.0". The rubric asks for the score
# on the last line, so the last match is the verdict (models sometimes restate an early
# guess before concluding).
SCORE_RE = re.compile(r"score\s*\**\s*[:=：]\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*5)?", re.IGNORECASE)


def prompt_values(row: dict[str, Any]) -> dict[str, str]:
    return {"document": row["text"], "instruction": row["instruction"]}


def parse_score(raw: str) -> tuple[int, str] | Drop:
    """``(score, reasoning)`` from a rating reply, or why it cannot be read."""
    text = (raw or "").strip()
    if not text:
        return Drop("unparseable_score", "empty rating")
    matches = list(SCORE_RE.finditer(text))
    if not matches:
        return Drop("unparseable_score", "no 'Score: N' in the rating")
    last = matches[-1]
    value = float(last.group(1))
    if value != int(value) or not 1 <= value <= 5:
        return Drop("score_out_of_range", f"score {last.group(1)} is not an integer from 1 to 5")
    reasoning = text[:last.start()].strip()
    return int(value), reasoning


def parse(raw: str, cfg: Config) -> dict[str, Any] | Drop:
    parsed = parse_score(raw)
    if isinstance(parsed, Drop):
        return parsed
    score, reasoning = parsed
    if score < cfg.threshold:
        # The score is kept with the drop; the reasoning is in its raw_output.
        return Drop("below_threshold", f"score {score} < curate.threshold {cfg.threshold}", {"score": score})
    return {"score": score, "curate_reasoning": reasoning}
