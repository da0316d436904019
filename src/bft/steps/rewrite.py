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

    min_response_chars: int = Field(default=40, ge=1)
    """Drop rewritten responses shorter than this (a sentence fragment such as "and" or
    "Here it is" is no answer)."""

OPEN_RE = re.compile(r"\[\s*RES\s*\]", re.IGNORECASE)
CLOSE_RE = re.compile(r"\[\s*/\s*RES\s*\]", re.IGNORECASE)


def prompt_values(row: dict[str, Any]) -> dict[str, str]:
    return {"document": row["text"], "instruction": row["instruction"]}


def tag_blocks(text: str) -> list[str]:
    """The contents of every complete ``[RES]...[/RES]`` block of ``text``: each closing
    tag with the nearest opening tag before it (so an echoed "between [RES] and [/RES]"
    is one block and the answer after it another)."""
    blocks, opened = [], None
    for match in sorted([*OPEN_RE.finditer(text), *CLOSE_RE.finditer(text)], key=lambda m: m.start()):
        if OPEN_RE.fullmatch(match.group()):
            opened = match
        elif opened is not None:
            blocks.append(text[opened.end():match.start()].strip())
            opened = None
    return blocks


def _folded(text: str) -> str:
    return " ".join(text.split()).casefold()


def _copied(block: str, document_blocks: list[str]) -> bool:
    """Whether ``block`` is (a part of) a tag block the document holds: case and spacing
    aside, the same text or a stretch of 20+ characters of it."""
    folded = _folded(block)
    return bool(folded) and any(folded == d or (len(folded) >= 20 and folded in d) for d in document_blocks)


def extract_response(raw: str, document: str = "") -> str | Drop:
    """The longest complete ``[RES]...[/RES]`` block that the document does not hold
    itself: models that echo the instruction ("I'll put it between [RES] and [/RES]") or
    restate the tags around their answer write short blocks besides the real one; a page
    with its own tag block could otherwise win by being longer."""
    text = raw or ""
    if not text.strip():
        return Drop("empty_output", "the model returned nothing")
    if OPEN_RE.search(text) is None:
        return Drop("missing_response_tag", "no [RES] tag in the output")
    blocks = tag_blocks(text)
    if not blocks:
        # Usually a reply cut off by max_tokens: keeping it would keep a truncated answer.
        return Drop("missing_end_tag", "no [/RES] after [RES] (output truncated?)")
    # Web text is untrusted: a page holding its own [RES]...[/RES] must not write the answer.
    in_document = [_folded(b) for b in tag_blocks(document)] if document else []
    own = [b for b in blocks if not _copied(b, in_document)]
    if not own:
        return Drop("copied_tag_block", "the response is a [RES]...[/RES] block copied from the document itself")
    response = max(own, key=len)
    if not response:
        return Drop("empty_response", "nothing between [RES] and [/RES]")
    return response


def parse(raw: str, cfg: Config, row: dict[str, Any] | None = None) -> dict[str, Any] | Drop:
    response = extract_response(raw, (row or {}).get("text") or "")
    if isinstance(response, Drop):
        return response
    if len(response) < cfg.min_response_chars:
        return Drop("response_too_short",
                    f"{len(response)} characters < rewrite.min_response_chars {cfg.min_response_chars}")
    return {"response": response}
