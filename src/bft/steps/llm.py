"""What every LLM stage does around the engine, whichever engine runs it:

    row  ->  request (prompt + sampling)  ->  engine  ->  reply  ->  parse  ->  kept or dropped

The step module (``steps/base.py``) supplies ``prompt_values(row)`` and
``parse(text, stage_config, row)``; the engines (``bft/engines/``) only move requests and
replies, so every engine layout writes the same rows, reasons and columns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bft.filters.base import Drop
from bft.prompts import PromptTemplate
from bft.steps.base import LLMStep
from bft.tokenization import render_chat


@dataclass(frozen=True)
class EngineReply:
    """One request's result, as every engine reports it."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    """Prompt tokens served from the engine's prefix cache; ``None`` where the engine
    does not report it (``ray.data.llm``'s vLLM stage does not pass it on)."""
    error: str = ""
    """Why the engine failed this request (the row is dropped as ``engine_error``)."""
    finish_reason: str | None = None
    """``stop`` (end of sequence, a stop string, a completed output regex) or ``length``
    (cut off at ``max_tokens``); ``None`` where the engine does not say."""


def truncated(reply: EngineReply, stage: Any) -> bool:
    """Whether the reply was cut off at the stage's ``max_tokens``: the engine's finish
    reason, or, where it gives none, a completion of exactly ``max_tokens`` tokens.
    ``ignore_eos`` (benchmarks) always generates ``max_tokens``: never truncated then."""
    if stage.sampling.ignore_eos:
        return False
    if reply.finish_reason is not None:
        return reply.finish_reason == "length"
    return reply.completion_tokens is not None and reply.completion_tokens >= stage.sampling.max_tokens


def request_params(stage: Any) -> dict[str, Any]:
    """A stage's sampling parameters, with its structured-output regex (JSON-able)."""
    params = stage.sampling.engine_params()
    if stage.structured_output_regex:
        params["structured_outputs"] = {"regex": stage.structured_output_regex}
    return params


# Request fields that are recorded on the row (the ids of the examples a prompt showed).
RECORDED_REQUEST_FIELDS = ("few_shot_ids",)


def request_messages(row: dict[str, Any], step: LLMStep, templates: dict[str, PromptTemplate],
                     shots: list[Any] | None = None) -> list[dict]:
    """The chat messages of ``row``'s request at ``step``, with its examples (``shots``, or
    the ones the template draws for the row)."""
    template = templates[step.NAME]
    return template.messages(template.draw(row["id"]) if shots is None else shots, **step.prompt_values(row))


def stage_prompt(row: dict[str, Any], step: LLMStep, config: Any,
                 templates: dict[str, PromptTemplate]) -> tuple[str, list[str]]:
    """The prompt text of ``row``'s request at ``step`` (its chat messages through the
    tokenizer's chat template), and the ids of the examples it shows. ``bft train`` renders
    its training prompts with this same function, so an adapter sees at inference exactly
    the prompt form it was trained on."""
    shots = templates[step.NAME].draw(row["id"])  # drawn once: the messages and the ids agree
    messages = request_messages(row, step, templates, shots)
    return render_chat(config.llm_stage(step.NAME).tokenizer_path, messages), [shot.id for shot in shots]


def build_request(row: dict[str, Any], step: LLMStep, config: Any,
                  templates: dict[str, PromptTemplate]) -> dict[str, Any]:
    """Row -> ``prompt`` + ``sampling_params`` for the engine.

    The throughput benchmark sends the same requests to a bare engine, so this takes
    only the config and templates, not a run context.
    """
    prompt, shot_ids = stage_prompt(row, step, config, templates)
    request = {"prompt": prompt, "sampling_params": request_params(config.llm_stage(step.NAME)),
               "__t_start": time.time()}
    if templates[step.NAME].shots_per_prompt:
        request["few_shot_ids"] = shot_ids
    return request


def outcome(row: dict[str, Any], step: LLMStep, stage_cfg: Any, reply: EngineReply) -> tuple[bool, dict[str, Any]]:
    """``(True, kept row)`` or ``(False, drop record)`` for one row's reply."""
    name = step.NAME
    if reply.error:
        result: dict[str, Any] | Drop = Drop("engine_error", reply.error[:2000])
    elif truncated(reply, stage_cfg):
        # A cut-off instruction or verdict reads as whole to every later check.
        result = Drop("truncated", f"the reply was cut off at {name}.sampling.max_tokens "
                                   f"{stage_cfg.sampling.max_tokens} (finish reason length)")
    else:
        result = step.parse(reply.text, stage_cfg, row)
    if isinstance(result, Drop):
        return False, {**row, **result.fields, "reason": result.reason, "detail": result.detail,
                       "raw_output": reply.text, "prompt_tokens": reply.prompt_tokens,
                       "completion_tokens": reply.completion_tokens, "cached_tokens": reply.cached_tokens}
    return True, {**row, **result, f"{name}_raw": reply.text, f"{name}_prompt_tokens": reply.prompt_tokens,
                  f"{name}_completion_tokens": reply.completion_tokens, f"{name}_cached_tokens": reply.cached_tokens}
