"""One ``ray.data.llm`` vLLM pool per LLM stage: an actor pool of engine replicas per stage,
chained by Ray Data. For stages on different models (a fine-tuned backward model and a 70B
judge, as in examples/gpu.yaml).

    prompt rows  ->  vLLM engine pool (ray.data.llm)  ->  parse, write, keep/drop

Chat templating happens in our own light tasks (see ``tokenization.py``), so the
processor's chat-template, tokenize and detokenize actor pools are switched off: the pool
is just the engines, and vLLM tokenizes and detokenizes inside each replica.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

import pyarrow as pa

from bft.config.models import LLMStageConfig
from bft.context import RunContext
from bft.engines.adapters import Adapter, engine_lora_kwargs, run_copy
from bft.engines.vllm_engine import engine_kwargs, placement_bundles
from bft.schema import to_table
from bft.stages import COLUMNS, STEPS
from bft.steps.llm import EngineReply, build_request, outcome
from bft.storage import is_remote

# Name ray.data.llm gives the engine stage of a processor.
ENGINE_STAGE = "vLLMEngineStage"

# Engine output columns that are not carried on (they are re-derived or too large).
_ENGINE_COLUMNS = {"prompt", "prompt_token_ids", "sampling_params", "generated_tokens", "generated_text",
                   "num_input_tokens", "num_generated_tokens", "metrics", "logprobs", "prompt_logprobs",
                   "embeddings", "request_id", "batch_uuid", "time_taken_llm", "params",
                   "__inference_error__", "__t_start", "model"}


def lora_model(adapter: Adapter | None, folder: str | None = None) -> tuple[str | None, str | None]:
    """(the ``model`` column of each request, ``dynamic_lora_loading_path``) for a stage's
    adapter, whose files are in ``folder`` (default: where the adapter is): ray.data.llm
    serves a row on a LoRA when its ``model`` differs from the base model. A local folder is
    named by its path; one on S3 by its name below the prefix ray.data.llm downloads from
    (with credentials from the environment: it does not read ``storage.*``)."""
    if adapter is None:
        return None, None
    folder = folder or adapter.uri
    if not is_remote(folder):
        return folder, None
    parent, _, name = folder.rstrip("/").rpartition("/")
    return name, parent


def processor_config(stage: LLMStageConfig, adapter: Adapter | None = None, lora_path: str | None = None) -> Any:
    from ray.data.llm import vLLMEngineProcessorConfig

    kwargs = engine_kwargs(stage)
    return vLLMEngineProcessorConfig(
        model_source=stage.model,
        engine_kwargs={**kwargs, **engine_lora_kwargs([adapter] if adapter else [], kwargs)},
        dynamic_lora_loading_path=lora_path,
        batch_size=stage.batch_size,
        concurrency=tuple(stage.replicas),
        max_concurrent_batches=stage.max_concurrent_batches,
        accelerator_type=stage.resources.accelerator_type,
        placement_group_config={"bundles": placement_bundles(stage)},
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        # A failing request becomes a row with __inference_error__ (dropped as
        # engine_error) instead of failing the whole run.
        should_continue_on_error=True,
        # Engine metrics need Ray Serve's metrics stack; not a dependency of ours.
        log_engine_metrics=False,
        runtime_env={"env_vars": dict(stage.env_vars)} if stage.env_vars else None,
    )


def build_engine_processor(stage: LLMStageConfig, preprocess: Callable[[dict], dict],
                           light_cpus: float, batch_retries: int, adapter: Adapter | None = None,
                           lora_path: str | None = None) -> Any:
    from ray.data.llm import build_processor

    processor = build_processor(
        processor_config(stage, adapter, lora_path),
        preprocess=preprocess,
        preprocess_map_kwargs={"num_cpus": light_cpus},
        postprocess_map_kwargs={"num_cpus": light_cpus},
    )
    # A replica that dies (node lost, engine crash) is restarted by Ray Data, and its
    # batches are retried elsewhere. Ray Data retries them forever by default; a batch
    # that kills every engine it meets must fail instead, so its rows can be dropped.
    engine = processor.get_stage_by_name(ENGINE_STAGE)
    engine.map_batches_kwargs["max_task_retries"] = batch_retries
    return processor


def _request(row: dict[str, Any], step: Any, config: Any, templates: Any, model: str | None) -> dict[str, Any]:
    request = build_request(row, step, config, templates)
    return {**request, "model": model} if model else request


def _reply(row: dict[str, Any]) -> EngineReply:
    # ray.data.llm reports no prefix-cache hits per request.
    return EngineReply(text=row.get("generated_text") or "", prompt_tokens=row.get("num_input_tokens"),
                       completion_tokens=row.get("num_generated_tokens"),
                       error=row.get("__inference_error__") or "")


def finish_batch(batch: pa.Table, name: str, ctx: RunContext) -> pa.Table:
    """Parse engine outputs, write kept and dropped rows, pass kept rows on."""
    step, stage = STEPS[name], ctx.config.llm_stage(name)
    rows = batch.to_pylist()
    started = min((r.get("__t_start") or time.time() for r in rows), default=time.time())
    kept, dropped = [], []
    for row in rows:
        base = {k: v for k, v in row.items() if k not in _ENGINE_COLUMNS}
        is_kept, record = outcome(base, step, stage, _reply(row))
        (kept if is_kept else dropped).append(record)
    # replace: a batch run again (a replica lost, lineage re-executed) may split its rows
    # differently; the side it no longer has must not stay behind.
    ctx.writer.write(name, kept, dropped, started, replace=True)
    return to_table(kept, COLUMNS[name])


def apply(ds: Any, name: str, ctx: RunContext) -> Any:
    """``ds`` (rows of the stage before ``name``) through stage ``name``'s own engine pool."""
    light = ctx.config.ray.light_task_cpus
    stage = ctx.config.llm_stage(name)
    adapter = ctx.adapters.get(name)
    # ray.data.llm names an S3 adapter by its folder below one prefix, and bft train
    # writes every adapter as `adapter/`: a copy in the run folder, named by its digest,
    # keeps two stages' adapters apart.
    copied = run_copy(ctx.storage, adapter, ctx.run_uri) if adapter and is_remote(adapter.uri) else None
    model, lora_path = lora_model(adapter, copied)
    preprocess = partial(_request, step=STEPS[name], config=ctx.config, templates=ctx.templates, model=model)
    processor = build_engine_processor(stage, preprocess, light, ctx.config.ray.engine_batch_retries, adapter,
                                       lora_path)
    # Ray Data merges a task's small outputs into one block (up to 128 MiB), so all the
    # rows of an input file reach the engine as one task, and the next stage sees none of
    # them until the last is done: no overlap between stages. Blocks of one engine batch
    # stream instead (measured in benchmarks/README.md).
    ds = ds.repartition(target_num_rows_per_block=stage.batch_size)
    ds = processor(ds)
    return ds.map_batches(partial(finish_batch, name=name, ctx=ctx), batch_format="pyarrow",
                          batch_size=stage.batch_size, num_cpus=light)
