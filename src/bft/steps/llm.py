"""Wire an LLM step (generate, curate or rewrite) into the dataset:

    prompt rows  ->  vLLM engine pool (ray.data.llm)  ->  parse, write, keep/drop

The step module supplies ``prompt_values(row)`` and ``parse(text, stage_config)``.
"""

from __future__ import annotations

import time
from functools import partial
from types import ModuleType
from typing import Any

import pyarrow as pa

from bft.config import BftConfig
from bft.context import RunContext
from bft.engine import build_engine_processor
from bft.filters.base import Drop
from bft.prompts import PromptTemplate
from bft.schema import STAGE_COLUMNS, to_table
from bft.tokenization import render_chat

# Engine output columns that are not carried on (they are re-derived or too large).
_ENGINE_COLUMNS = {"prompt", "prompt_token_ids", "sampling_params", "generated_tokens", "generated_text",
                   "num_input_tokens", "num_generated_tokens", "metrics", "logprobs", "prompt_logprobs",
                   "embeddings", "request_id", "batch_uuid", "time_taken_llm", "params",
                   "__inference_error__", "__t_start"}


def build_request(row: dict[str, Any], step: ModuleType, config: BftConfig,
                  templates: dict[str, PromptTemplate]) -> dict[str, Any]:
    """Row -> ``prompt`` + ``sampling_params`` for the engine (ray.data.llm preprocess).

    The throughput benchmark sends the same requests to a bare engine, so this takes
    only the config and templates, not a run context.
    """
    stage = getattr(config, step.NAME)
    messages = templates[step.NAME].messages(**step.prompt_values(row))
    params = stage.sampling.engine_params()
    if stage.structured_output_regex:
        params["structured_outputs"] = {"regex": stage.structured_output_regex}
    return {"prompt": render_chat(stage.tokenizer_path, messages), "sampling_params": params,
            "__t_start": time.time()}


def finish_batch(batch: pa.Table, step: ModuleType, ctx: RunContext) -> pa.Table:
    """Parse engine outputs, write kept and dropped rows, pass kept rows on."""
    name = step.NAME
    stage = getattr(ctx.config, name)
    rows = batch.to_pylist()
    started = min((r.get("__t_start") or time.time() for r in rows), default=time.time())
    kept, dropped = [], []
    for row in rows:
        raw = row.get("generated_text") or ""
        tokens = {"prompt_tokens": row.get("num_input_tokens"),
                  "completion_tokens": row.get("num_generated_tokens")}
        error = row.get("__inference_error__") or ""
        base = {k: v for k, v in row.items() if k not in _ENGINE_COLUMNS}
        result: dict[str, Any] | Drop
        result = Drop("engine_error", error[:2000]) if error else step.parse(raw, stage)
        if isinstance(result, Drop):
            dropped.append({**base, **result.fields, "reason": result.reason, "detail": result.detail,
                            "raw_output": raw, **tokens})
        else:
            kept.append({**base, **result, f"{name}_raw": raw,
                         f"{name}_prompt_tokens": tokens["prompt_tokens"],
                         f"{name}_completion_tokens": tokens["completion_tokens"]})
    ctx.writer.write(name, kept, dropped, started)
    return to_table(kept, STAGE_COLUMNS[name])


def apply_llm_step(ds: Any, step: ModuleType, ctx: RunContext) -> Any:
    light = ctx.config.ray.light_task_cpus
    stage = getattr(ctx.config, step.NAME)
    preprocess = partial(build_request, step=step, config=ctx.config, templates=ctx.templates)
    processor = build_engine_processor(stage, preprocess, light, ctx.config.ray.engine_batch_retries)
    # Ray Data merges a task's small outputs into one block (up to 128 MiB), so all the
    # rows of an input file reach the engine as one task, and the next stage sees none of
    # them until the last is done: no overlap between stages. Blocks of one engine batch
    # stream instead (measured in benchmarks/README.md).
    ds = ds.repartition(target_num_rows_per_block=stage.batch_size)
    ds = processor(ds)
    return ds.map_batches(partial(finish_batch, step=step, ctx=ctx), batch_format="pyarrow",
                          batch_size=stage.batch_size, num_cpus=light)
