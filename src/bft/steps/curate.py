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
    # No output regex by default: a real judge reasons in its own words and its own
    # length, and the parser reads the forms judges write (the random-weight quickstart
    # model is the one that needs a regex; examples/quickstart.yaml sets it).
    stage_defaults: ClassVar[dict[str, Any]] = {
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 512},
    }

    threshold: int = Field(default=5, ge=1, le=5)
    """Keep pairs scored at or above this (5-point rubric)."""

# The forms judges write: "Score: 4", "**Score:** 4", "score = 4/5", "Score: 4.0",
# "Final score: **4**", "Rating: 4 out of 5", "I would rate this 4 out of 5". The rubric
# asks for the score last, so the last match is the verdict (models sometimes restate an
# early guess before concluding). A scale ("/10", "out of 10") other than 5 is refused.
_NUMBER = r"\**\s*(?P<value>-?\d+(?:\.\d+)?)\s*\**\s*(?:(?:/|out\s+of)\s*(?P<scale>\d+))?"
SCORE_RE = re.compile(r"(?:score|rating)\s*\**\s*(?:[:=：]|\bis\b|\bof\b)\s*" + _NUMBER, re.IGNORECASE)
RATE_RE = re.compile(r"\brate\s+(?:it|this|the\s+\w+)?\s*(?:an?\s+|as\s+)?" + _NUMBER, re.IGNORECASE)
# A reply whose last line is the number alone ("4", "**4**", "4/5").
BARE_SCORE_RE = re.compile(r"(?:^|\n)\s*" + _NUMBER + r"\s*\.?\s*$")


def prompt_values(row: dict[str, Any]) -> dict[str, str]:
    return {"document": row["text"], "instruction": row["instruction"]}


def parse_score(raw: str) -> tuple[int, str] | Drop:
    """``(score, reasoning)`` from a rating reply, or why it cannot be read."""
    text = (raw or "").strip()
    if not text:
        return Drop("unparseable_score", "empty rating")
    matches = [*SCORE_RE.finditer(text), *RATE_RE.finditer(text)]
    last = max(matches, key=lambda m: m.start()) if matches else BARE_SCORE_RE.search(text)
    if last is None:
        return Drop("unparseable_score", "no 'Score: N' in the rating")
    value, scale = float(last.group("value")), last.group("scale")
    if scale is not None and int(scale) != 5:
        return Drop("score_out_of_range", f"score {last.group('value')}/{scale} is not on the 5-point scale")
    if value != int(value) or not 1 <= value <= 5:
        return Drop("score_out_of_range", f"score {last.group('value')} is not an integer from 1 to 5")
    # The reasoning: the lines before the verdict's line ("**Score:** 4", "Final score: 4").
    reasoning = text[:text.rfind("\n", 0, last.start("value")) + 1].strip()
    return int(value), reasoning


def parse(raw: str, cfg: Config, row: dict[str, Any] | None = None) -> dict[str, Any] | Drop:
    parsed = parse_score(raw)
    if isinstance(parsed, Drop):
        return parsed
    score, reasoning = parsed
    if score < cfg.threshold:
        # The score is kept with the drop; the reasoning is in its raw_output.
        return Drop("below_threshold", f"score {score} < curate.threshold {cfg.threshold}", {"score": score})
    return {"score": score, "curate_reasoning": reasoning}
