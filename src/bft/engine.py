"""Build a ray.data.llm vLLM processor (an actor pool of engine replicas) from a stage config.

Chat templating happens in our own light tasks (see ``tokenization.py``), so the
processor's chat-template, tokenize and detokenize actor pools are switched off: the
pool is just the engines, and vLLM tokenizes and detokenizes inside each replica.
"""

from __future__ import annotations

from typing import Any, Callable

from bft.config import LLMStageConfig


# Name ray.data.llm gives the engine stage of a processor.
ENGINE_STAGE = "vLLMEngineStage"


def placement_bundles(stage: LLMStageConfig) -> list[dict[str, float]]:
    """One bundle per vLLM worker (tensor x pipeline parallel ranks)."""
    res = stage.resources
    bundle: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        bundle["GPU"] = res.gpus_per_worker
    return [dict(bundle) for _ in range(stage.workers_per_replica)]


def engine_kwargs(stage: LLMStageConfig) -> dict[str, Any]:
    """vLLM engine arguments of a stage (also what the benchmark's bare engine gets)."""
    kwargs = dict(stage.engine_kwargs)
    if stage.workers_per_replica == 1:
        # One worker: run the model inside the engine-core process rather than in a
        # separate worker process (another full torch + vLLM import per replica). vLLM's
        # CPU platform honours this only with VLLM_ENABLE_V1_MULTIPROCESSING=0 (see
        # examples/quickstart.yaml); GPUs honour it as is.
        kwargs.setdefault("distributed_executor_backend", "uni")
    if stage.tokenizer:
        kwargs.setdefault("tokenizer", stage.tokenizer)
    return kwargs


def processor_config(stage: LLMStageConfig) -> Any:
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=stage.model,
        engine_kwargs=engine_kwargs(stage),
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
                           light_cpus: float, batch_retries: int) -> Any:
    from ray.data.llm import build_processor

    processor = build_processor(
        processor_config(stage),
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

