"""Generate (backtranslation): ask the backward model which instruction the document answers."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from bft.config.models import FewShotConfig, StageConfig
from bft.filters.base import Drop

NAME = "generate"
DESCRIPTION = "Instruction generation (the backward model)."
PLACEHOLDERS = {"document"}
REQUIRED_PLACEHOLDERS = PLACEHOLDERS
INPUT_COLUMNS = ("text",)
OUTPUT_COLUMNS = {"instruction": pa.string(), "few_shot_ids": pa.list_(pa.string())}
DROP_COLUMNS = ("instruction", "few_shot_ids")


class Config(StageConfig):
    # The paper's sampling for the backward model: temperature 1.0, top-p 0.9.
    stage_defaults: ClassVar[dict[str, Any]] = {
        "sampling": {"temperature": 1.0, "top_p": 0.9, "max_tokens": 128},
    }

    min_instruction_chars: int = Field(default=10, ge=1)
    """Drop generated instructions shorter than this (after cleaning)."""

    max_instruction_chars: int = Field(default=600, ge=1)
    """Drop generated instructions longer than this (after cleaning)."""

    few_shot: FewShotConfig = Field(default_factory=FewShotConfig)
    """Seed pairs as in-prompt examples (needs ``seed.uri``)."""

# Labels models like to put in front of the request; removed before length checks.
LABEL_RE = re.compile(
    r"^\s*(?:\*\*)?(?:user(?:'s)?\s+(?:message|request|instruction)|instruction|question|request|"
    r"prompt|query|user|task)(?:\*\*)?\s*[:：-]\s*(?:\*\*)?\s*",
    re.IGNORECASE)
QUOTE_PAIRS = [('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("`", "`"), ("«", "»")]
WHITESPACE_RE = re.compile(r"[ \t]+")


def prompt_values(row: dict[str, Any]) -> dict[str, str]:
    return {"document": row["text"]}


def shot(pair: Any) -> tuple[dict[str, str], str]:
    """A seed pair as a worked example (values, answer): backtranslation runs the pair
    backwards, its response in the document's place and its instruction as the answer.
    ``bft train --direction backward`` trains on the same form."""
    return prompt_values({"text": pair.response}), pair.instruction


def clean_instruction(raw: str) -> str:
    """Strip labels, wrapping quotes and stray whitespace from a generated instruction."""
    text = raw.replace("\r\n", "\n").strip()
    for _ in range(2):  # "Instruction: "..."" needs both steps, twice covers nesting
        text = LABEL_RE.sub("", text, count=1).strip()
        for left, right in QUOTE_PAIRS:
            if len(text) >= 2 and text.startswith(left) and text.endswith(right):
                text = text[len(left):-len(right)].strip()
    lines = [WHITESPACE_RE.sub(" ", line).strip() for line in text.split("\n")]
    # Keep paragraph breaks (multi-part instructions), drop runs of blank lines.
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def parse(raw: str, cfg: Config, row: dict[str, Any] | None = None) -> dict[str, Any] | Drop:
    instruction = clean_instruction(raw or "")
    if not instruction:
        return Drop("empty_instruction", "the model returned no instruction")
    if len(instruction) < cfg.min_instruction_chars:
        return Drop("instruction_too_short",
                    f"{len(instruction)} characters < generate.min_instruction_chars {cfg.min_instruction_chars}")
    if len(instruction) > cfg.max_instruction_chars:
        return Drop("instruction_too_long",
                    f"{len(instruction)} characters > generate.max_instruction_chars {cfg.max_instruction_chars}")
    return {"instruction": instruction}
