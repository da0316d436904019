"""The stock-Ray arms of the throughput benchmark: bft's three passes built the way Ray's
documentation builds LLM batch pipelines, each run as its own process.

ray_chain  Three ``ray.data.llm`` vLLM processors (``vLLMEngineProcessorConfig`` +
           ``build_processor``) chained on one dataset: each processor's ``preprocess``
           builds the chat messages and sampling parameters (bft's templates and sampling),
           its ``postprocess`` parses the reply (bft's parsers), a ``filter`` keeps what
           parsed, and the last stage's rows are written with ``write_parquet``. Each
           processor runs Ray's own chat-template, tokenize, engine and detokenize stages.
           Changed from the documented defaults only where this machine needs it: the CPU
           stages reserve ``ray.light_task_cpus`` (the default of one CPU for each does not
           fit 2 cores, so the chain never starts), the documents start as in-memory rows
           (``read_parquet``'s file listing reserves a CPU too), the engines the
           CPUs of the bft config's ``resources.cpus_per_worker``, as bft's do, and engine
           metrics are off (they need Ray Serve's metrics stack, which is not installed).

ray_serve  Ray's own way to share one engine between processors: one Ray Serve LLM
           deployment (``LLMConfig`` + ``build_llm_deployment``, the bft config's engine
           settings, CPU bundles) and three ``ray.data.llm`` processors with
           ``ServeDeploymentProcessorConfig`` sending it OpenAI completion requests (bft's
           prompts, chat template applied, and sampling). Changed only where this machine
           needs it: the request actors and light tasks reserve ``ray.light_task_cpus``,
           engine metrics are off, and the final rows are collected by the driver (a
           ``write_parquet`` task waits forever for a CPU beside the deployment).

The clock is the whole command, Ray start-up and engine loading included, as for bft.

Usage: python benchmarks/ray_arms.py {ray_chain,ray_serve} --config C --run-dir R --out J [--set k=v ...]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from arm_cli import parse_args, single_engine

from bft.config import BftConfig
from bft.engines.vllm_engine import engine_kwargs, placement_bundles
from bft.filters.base import Drop
from bft.planning import load_templates
from bft.stages import FOLDERS, LLM_STAGES, STEPS
from bft.steps.llm import build_request, request_messages, request_params
from bft.storage import join


def _preprocess(name: str, cfg: BftConfig, templates: dict) -> Any:
    step, stage = STEPS[name], cfg.llm_stage(name)

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {"messages": request_messages(row, step, templates), "sampling_params": request_params(stage)}

    return preprocess


def _postprocess(name: str, cfg: BftConfig, carried: list[str]) -> Any:
    step, stage = STEPS[name], cfg.llm_stage(name)

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        parsed = step.parse(row["generated_text"], stage)
        kept = not isinstance(parsed, Drop)
        return {**{k: row[k] for k in carried if k in row}, **(parsed if kept else {}), "kept": kept,
                f"{name}_prompt_tokens": row["num_input_tokens"], f"{name}_completion_tokens": row["num_generated_tokens"]}

    return postprocess


def ray_chain(cfg: BftConfig, run_dir: str, out_dir: Path) -> dict[str, Any]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ray.init(include_dashboard=False)
    templates = load_templates(cfg)
    light = {"num_cpus": cfg.ray.light_task_cpus}
    # The documents, as rows (ray.data.read_parquet's file listing reserves a whole CPU of
    # its own, which the chain's pools leave no room for on 2 cores).
    ds = ray.data.from_items(pq.read_table(join(run_dir, FOLDERS["filter"])).to_pylist())
    carried = ["id", "source", "source_row", "text"]
    for name in LLM_STAGES:
        stage = cfg.llm_stage(name)
        config = vLLMEngineProcessorConfig(
            model_source=stage.model, engine_kwargs=engine_kwargs(stage), batch_size=stage.batch_size,
            concurrency=tuple(stage.replicas), max_concurrent_batches=stage.max_concurrent_batches,
            placement_group_config={"bundles": placement_bundles(stage)},
            runtime_env={"env_vars": dict(stage.env_vars)} if stage.env_vars else None,
            chat_template_stage=light, tokenize_stage=light, detokenize_stage=light,
            # vLLM's Ray metrics exporter needs Ray Serve's metrics stack (ray[serve]), not
            # installed here: with it on, every engine dies at start.
            log_engine_metrics=False)
        processor = build_processor(config, preprocess=_preprocess(name, cfg, templates),
                                    postprocess=_postprocess(name, cfg, carried),
                                    preprocess_map_kwargs=light, postprocess_map_kwargs=light)
        ds = processor(ds).filter(lambda row: row["kept"], **light)
        carried += [*STEPS[name].OUTPUT_COLUMNS, f"{name}_prompt_tokens", f"{name}_completion_tokens"]
    ds.write_parquet(str(out_dir))
    ray.shutdown()
    return _counts(out_dir)


def _completion(name: str, cfg: BftConfig, templates: dict, model_id: str) -> Any:
    """preprocess for the Serve arm: bft's prompt (chat template applied) as an OpenAI
    completion request to the shared deployment."""
    step = STEPS[name]

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        request = build_request(row, step, cfg, templates)
        params = dict(request["sampling_params"])
        structured = params.pop("structured_outputs", None)
        kwargs = {"model": model_id, "prompt": request["prompt"], "stream": False, **params}
        if structured:
            kwargs["structured_outputs"] = structured
        return {"method": "completions", "dtype": "CompletionRequest", "request_kwargs": kwargs}

    return preprocess


def _completion_reply(name: str, cfg: BftConfig, carried: list[str]) -> Any:
    step, stage = STEPS[name], cfg.llm_stage(name)

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        parsed = step.parse(row["choices"][0]["text"], stage)
        kept = not isinstance(parsed, Drop)
        usage = row.get("usage") or {}
        return {**{k: row[k] for k in carried if k in row}, **(parsed if kept else {}), "kept": kept,
                f"{name}_prompt_tokens": usage.get("prompt_tokens"),
                f"{name}_completion_tokens": usage.get("completion_tokens")}

    return postprocess


def ray_serve(cfg: BftConfig, run_dir: str, out_dir: Path) -> dict[str, Any]:
    """Ray's own answer to sharing an engine: one Ray Serve LLM deployment, and three
    ``ray.data.llm`` processors (``ServeDeploymentProcessorConfig``) sending it requests."""
    import ray
    from ray import serve
    from ray.data.llm import ServeDeploymentProcessorConfig, build_processor
    from ray.serve.llm import LLMConfig, ModelLoadingConfig, build_llm_deployment
    from ray.serve.llm.openai_api_models import CompletionRequest

    ray.init(include_dashboard=False)
    templates = load_templates(cfg)
    light = {"num_cpus": cfg.ray.light_task_cpus}
    stage = single_engine(cfg)  # the deployment serves every pass
    low, high = stage.replicas
    llm_config = LLMConfig(
        model_loading_config=ModelLoadingConfig(model_id="bench", model_source=stage.model),
        deployment_config={"autoscaling_config": {"min_replicas": low, "max_replicas": high},
                           "max_ongoing_requests": stage.batch_size * stage.max_concurrent_batches * len(LLM_STAGES)},
        engine_kwargs=engine_kwargs(stage), placement_group_config={"bundles": placement_bundles(stage)},
        runtime_env={"env_vars": dict(stage.env_vars)} if stage.env_vars else None,
        log_engine_metrics=False)
    serve.run(build_llm_deployment(llm_config, override_serve_options={"name": "bench_llm"}), name="bench_app")
    ds = ray.data.from_items(pq.read_table(join(run_dir, FOLDERS["filter"])).to_pylist())
    carried = ["id", "source", "source_row", "text"]
    for name in LLM_STAGES:
        config = ServeDeploymentProcessorConfig(
            deployment_name="bench_llm", app_name="bench_app", dtype_mapping={"CompletionRequest": CompletionRequest},
            batch_size=stage.batch_size, concurrency=1)
        processor = build_processor(config, preprocess=_completion(name, cfg, templates, "bench"),
                                    postprocess=_completion_reply(name, cfg, carried),
                                    preprocess_map_kwargs=light, postprocess_map_kwargs=light)
        # Its request actors would reserve a CPU each: three do not fit 2 cores beside the
        # deployment.
        processor.get_stage_by_name("ServeDeploymentStage").map_batches_kwargs.update(light)
        ds = processor(ds).filter(lambda row: row["kept"], **light)
        carried += [*STEPS[name].OUTPUT_COLUMNS, f"{name}_prompt_tokens", f"{name}_completion_tokens"]
    # Collected here: a write_parquet task here waits for a CPU the deployment holds.
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(ds.take_all()), out_dir / "final.parquet")
    serve.shutdown()
    ray.shutdown()
    return _counts(out_dir)


def _counts(out_dir: Path) -> dict[str, Any]:
    table = pq.read_table(out_dir)
    stages = {name: {"rows_out": table.num_rows,
                     "prompt_tokens": sum(table.column(f"{name}_prompt_tokens").to_pylist()),
                     "completion_tokens": sum(table.column(f"{name}_completion_tokens").to_pylist())}
              for name in LLM_STAGES}
    return {"stages": stages, "final_rows": table.num_rows}


ARMS = {"ray_chain": ray_chain, "ray_serve": ray_serve}


def main() -> None:
    args, cfg = parse_args(ARMS, __doc__)
    os.environ.setdefault("RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "true")
    started = time.perf_counter()
    result = ARMS[args.arm](cfg, args.run_dir, Path(args.out).with_suffix("") / "parquet")
    result["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
