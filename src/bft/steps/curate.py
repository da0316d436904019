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

# The forms judges write. A verdict at the start of a line wins, the last one (the rubric
# asks for it last; models sometimes restate an early guess before concluding): "Score: 4",
# "**Score:** 4", "Final score: **4**", "Rating: 4 out of 5", "The score is: 4", "Score: [4]".
# Only a reply with no such line is read for a verdict inside a sentence ("... a score of
# 4", "I would rate this 4 out of 5"), and only one with neither for a last line holding the
# number alone ("4", "**4**"). Numbers after a verdict line (a perfect score is 5/5, a
# quoted page) never override it. A scale other than 5 ("8/10") is refused.
_NUMBER = (r"[\[(]?\s*\**\s*(?P<value>-?\d+(?:\.\d+)?)\s*\**\s*[\])]?\s*"
           r"(?:(?:/|out\s+of)\s*(?P<scale>\d+))?")
VERDICT_LINE_RE = re.compile(r"^[\s>*#_-]*(?:the\s+)?(?:final\s+|overall\s+)?(?:score|rating)\s*\**\s*"
                             r"(?:[:=：]|\bis\b\s*:?|\bof\b)\s*" + _NUMBER, re.IGNORECASE | re.MULTILINE)
INLINE_VERDICT_RES = (
    re.compile(r"\b(?:score|rating)\s*(?:[:=：]|\bis\b\s*:?|\bof\b)\s*" + _NUMBER, re.IGNORECASE),
    re.compile(r"\brate\s+(?:it|this|the\s+\w+)\s+(?:an?\s+|as\s+)?" + _NUMBER, re.IGNORECASE),
)
BARE_SCORE_RE = re.compile(r"(?:^|\n)[ \t]*\**[ \t]*(?P<value>\d+)[ \t]*\**[ \t]*(?:/[ \t]*(?P<scale>\d+))?[ \t]*$")


def find_verdict(text: str) -> re.Match[str] | None:
    """The match holding the verdict (groups ``value`` and ``scale``), or ``None``."""
    lines = list(VERDICT_LINE_RE.finditer(text))
    if lines:
        return lines[-1]
    inline = [m for pattern in INLINE_VERDICT_RES for m in pattern.finditer(text)]
    if inline:
        return max(inline, key=lambda m: m.start())
    return BARE_SCORE_RE.search(text)


def prompt_values(row: dict[str, Any]) -> dict[str, str]:
    return {"document": row["text"], "instruction": row["instruction"]}


def parse_score(raw: str) -> tuple[int, str] | Drop:
    """``(score, reasoning)`` from a rating reply, or why it cannot be read."""
    text = (raw or "").strip()
    if not text:
        return Drop("unparseable_score", "empty rating")
    last = find_verdict(text)
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
