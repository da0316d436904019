"""One pool of vLLM replicas for consecutive LLM stages on the same model and engine
settings. Each replica runs every row of a batch through its passes (``programs.py``):
generate -> parse -> curate -> parse -> rewrite, each request submitted to the replica's
engine (``vllm_engine.start_engine``: vLLM's async engine, or one stepped in this process)
as soon as the previous one parsed, many batches at once. Continuous batching
then mixes all passes, and a document's next pass finds its prefix (system message +
document) still in vLLM's prefix cache.

Stage files are the same as with a pool per stage: each stage's kept and dropped rows of a
batch are written once the stage is complete for the batch, in stage order. A replica that
dies (node lost, engine crash) is restarted by Ray Data and its batches retried, up to
``ray.engine_batch_retries`` times; a retried batch first reads back the stage files its
earlier run wrote and goes on from there, so nothing is written twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from functools import partial
from typing import Any, AsyncIterator

import pyarrow as pa

from bft.context import RunContext
from bft.engines.adapters import engine_lora_kwargs, lora_request
from bft.engines.programs import BatchLedger, Passes, run_batch
from bft.engines.vllm_engine import fatal_errors, generate, replica_resources, start_engine
from bft.schema import to_table
from bft.stages import COLUMNS, PREVIOUS
from bft.steps.llm import EngineReply
from bft.writers.failures import error_line, record_failure
from bft.writers.replica_time import ReplicaClock

# The pass a row starts at, on its way into the pool.
ENTRY_COLUMN = "__entry"

log = logging.getLogger("bft.engines.shared")


def input_columns(names: tuple[str, ...]) -> dict[str, pa.DataType]:
    """What the pool reads: rows of any stage before one of its passes (the widest is the
    one before its last pass; narrower rows have nulls there), and the pass to start at."""
    return {**COLUMNS[PREVIOUS[names[-1]]], ENTRY_COLUMN: pa.string()}


def mark_entry(batch: pa.Table, names: tuple[str, ...], stage: str) -> pa.Table:
    """Rows joining the pool at ``stage``, in the pool's input schema."""
    rows = batch.to_pylist()
    for row in rows:
        row[ENTRY_COLUMN] = stage
    return to_table(rows, input_columns(names))


def _log_to_stderr() -> None:
    # Ray forwards an actor's stderr to the driver, prefixed with the actor's name and pid.
    logger = logging.getLogger("bft")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class SharedEngine:
    """One replica of the shared pool (a Ray Data actor): one vLLM engine taking requests from asyncio."""

    def __init__(self, names: tuple[str, ...], ctx: RunContext):
        _log_to_stderr()
        self.passes = Passes(names, ctx.config, ctx.templates)
        self.writer = ctx.writer
        stage = ctx.config.llm_stage(names[0])
        # from before the engine loads: the accelerators are held from then on
        self.clock = ReplicaClock(ctx.storage, ctx.run_uri, names,
                                  stage.resources.gpus_per_worker * stage.workers_per_replica)
        # Each stage's adapter (if any) runs on this one engine, next to the base weights.
        adapters = {name: ctx.adapters[name] for name in names if name in ctx.adapters}
        ids = {sha: i for i, sha in enumerate(sorted({a.sha256 for a in adapters.values()}), start=1)}
        self.lora = {name: lora_request(ctx.storage, a, ids[a.sha256]) for name, a in adapters.items()}
        self.engine = start_engine(stage, engine_lora_kwargs(list(adapters.values()), stage.engine_kwargs))
        self.request_ids = itertools.count()
        self.first_request: set[str] = set()
        log.info("shared engine up for %s (pid %d)", " -> ".join(names), os.getpid())

    async def submit(self, stage: str, request: dict[str, Any]) -> EngineReply:
        if stage not in self.first_request:
            self.first_request.add(stage)
            log.info("first %s request on this replica (pid %d)", stage, os.getpid())
        try:
            return await generate(self.engine, str(next(self.request_ids)), request, self.lora.get(stage))
        except fatal_errors() as exc:
            # The engine is gone (its core process, or its stepping thread) but this actor
            # lives: retries of its batches would come back here. Exiting lets Ray Data start a fresh replica
            # and retry them there (a system error, so the retry counts).
            log.error("engine died (%s); exiting so the replica is replaced", exc)
            # The process goes, and with it the error: Ray only sees "the actor died".
            record_failure(self.writer.storage, self.writer.run_uri, stage, error_line(exc), "engine")
            os._exit(1)

    async def write(self, stage: str, kept: list[dict], dropped: list[dict], started: float, replace: bool) -> None:
        await asyncio.to_thread(self.writer.write, stage, kept, dropped, started, replace)
        await asyncio.to_thread(self.clock.tick)
        log.info("wrote %s batch: %d kept, %d dropped (pid %d)", stage, len(kept), len(dropped), os.getpid())

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        names = self.passes.names
        joining: dict[str, list[dict]] = {name: [] for name in names}
        for row in batch.to_pylist():
            joining[row.pop(ENTRY_COLUMN)].append(row)
        ledger = BatchLedger(names, joining)
        starts = await asyncio.to_thread(ledger.restore, self.writer.read_batch)
        if done := [name for name in names if ledger.written[name] and ledger.entering(names.index(name))]:
            log.info("batch run again: %s already written by its earlier run; %d row(s) go on (pid %d)",
                     ", ".join(done), len(starts), os.getpid())
        kept = await run_batch(ledger, starts, self.passes, self.submit, self.write)
        yield to_table(kept, COLUMNS[names[-1]])

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def apply(ds: Any, names: tuple[str, ...], ctx: RunContext) -> Any:
    """``ds`` (rows in :func:`input_columns`, see :func:`mark_entry`) through one shared
    pool running ``names``; returns the rows the last pass kept."""
    import ray

    cfg = ctx.config
    stage = cfg.llm_stage(names[0])  # every pass has the same engine settings
    low, high = stage.replicas
    ds = ds.repartition(target_num_rows_per_block=stage.batch_size)  # see per_stage.apply
    # map_batches_internal, as ray.data.llm builds its engine pools: Ray 2.60's public
    # map_batches deprecates the actor options a pool needs (max_task_retries, a placement
    # group per replica) and offers nothing in their place.
    return ds.map_batches_internal(
        SharedEngine, fn_constructor_kwargs={"names": names, "ctx": ctx}, batch_size=stage.batch_size,
        batch_format="pyarrow", zero_copy_batch=True,
        # Batches run at once on a replica, and enough more queued there to keep them
        # running.
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high,
                                           max_concurrent_calls_per_actor=stage.max_concurrent_batches,
                                           max_tasks_in_flight_per_actor=2 * stage.max_concurrent_batches),
        runtime_env={"env_vars": dict(stage.env_vars)} if stage.env_vars else None,
        # A batch that kills every engine it meets must fail (its rows are then dropped as
        # batch_failed) instead of being retried forever.
        max_task_retries=cfg.ray.engine_batch_retries,
        **replica_resources(stage))


def conform(ds: Any, names: tuple[str, ...], stage: str, light_cpus: float) -> Any:
    """Rows joining the pool at ``stage`` (see :func:`mark_entry`)."""
    return ds.map_batches(partial(mark_entry, names=names, stage=stage), batch_format="pyarrow",
                          num_cpus=light_cpus)
