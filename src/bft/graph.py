"""The Ray Data graph of one attempt, and driving it to its end:

    input files -> read -> filter -> engine pools (generate, curate, rewrite) -> sft

Each step writes its kept rows to ``<output>/<run_id>/<stage dir>/`` and its drops to
``dropped/`` as batches finish, and passes only kept rows on; nothing waits for a whole
stage. Rows that earlier attempts left part-way (resume, ``--from-stage``) join at the
stage they had reached, read back from the stage before it.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import pyarrow.parquet as pq

from bft.config import BftConfig
from bft.context import RunContext
from bft.engines import apply_pools, union
from bft.filters.dedup import Deduplicator
from bft.filters.near_dedup import NearDeduplicator
from bft.planning import WorkPlan
from bft.stages import COLUMNS, FINAL, FOLDERS, LLM_STAGES, PREVIOUS
from bft.steps.filter import filter_documents
from bft.steps.read import read_files, read_stage_outputs
from bft.steps.sft import build_sft
from bft.storage import Storage, join
from bft.writers.failures import RayDataFailures, first_error, read_failures
from bft.writers.parquet import parquet_files


class RunFailed(RuntimeError):
    """The stream stopped on an error (too many failed batches, a crashed task); what
    was written so far stays, and the same command resumes the run."""


def _last_line(exc: BaseException) -> str:
    """The gist of a (Ray-wrapped) error: its type and the last line of its text."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"


def seed_dedup(dedups: list[Deduplicator | NearDeduplicator], storage: Storage, run_uri: str,
               light_cpus: float) -> None:
    """On resume, teach the (exact and near) dedup shards the documents earlier attempts kept."""
    import ray

    @ray.remote(num_cpus=light_cpus)
    def remember(uri: str) -> None:
        with storage.open(uri, "rb") as fh:
            parquet = pq.ParquetFile(fh)  # files of an older bft have no segment column
            rows = parquet.read(columns=[c for c in ("id", "source", "source_row", "segment", "text")
                                         if c in parquet.schema_arrow.names]).to_pylist()
        for dedup in dedups:
            dedup.remember(rows)

    ray.get([remember.remote(uri) for uri in parquet_files(storage, join(run_uri, FOLDERS["filter"]))])


def init_ray(cfg: BftConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if cfg.ray.address:
        kwargs["address"] = cfg.ray.address
    elif cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    # For a Ray instance started here: when an engine replica's process dies, the raylet
    # also kills the vLLM engine-core process it started, instead of leaving an orphan that
    # holds memory (a GPU's, on a GPU node). Clusters get this from deploy/Dockerfile.
    os.environ.setdefault("RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "true")
    ray.init(**kwargs)


def run_dataset(cfg: BftConfig, plan: WorkPlan, storage: Storage, run_uri: str,
                templates: dict[str, Any], budgets: list[Any], adapters: dict[str, Any] | None = None) -> None:
    """Build the Ray Data pipeline for ``plan`` and drive it to its end."""
    import ray

    init_ray(cfg)
    # Batches that fail every retry are skipped by Ray Data (up to this many per run)
    # and their rows dropped by sweep_failed_batches (see pipeline.run_pipeline), instead
    # of failing a long run.
    ray.data.DataContext.get_current().max_errored_blocks = cfg.ray.max_failed_batches
    light = cfg.ray.light_task_cpus
    dedup = near_dedup = None
    if plan.input_files and cfg.filters.dedup:
        dedup = Deduplicator.start(cfg.filters.dedup_shards)
    if plan.input_files and cfg.filters.near_dedup is not None:
        near_dedup = NearDeduplicator.start(cfg.filters.near_dedup)
    dedups = [d for d in (dedup, near_dedup) if d is not None]
    if dedups and plan.finished is not None:
        seed_dedup(dedups, storage, run_uri, light)
    ctx = RunContext(config=cfg, storage=storage, run_uri=run_uri, templates=templates,
                     token_budgets=budgets, dedup=dedup, near_dedup=near_dedup, adapters=adapters or {},
                     finished=ray.put(plan.finished) if plan.finished is not None else None)

    def files(uris: list[str]) -> Any:
        return ray.data.from_items([{"path": f} for f in uris], override_num_blocks=len(uris))

    def joining(stage: str) -> Any:
        """The rows that join at ``stage``, read back from the stage before it."""
        if not plan.entries.get(stage):
            return None
        columns = COLUMNS[PREVIOUS[stage]]
        return files(plan.entries[stage]).map_batches(
            partial(read_stage_outputs, ctx=ctx, stage=stage, columns=columns),
            batch_size=1, batch_format="pyarrow", num_cpus=light)

    # --- the pipeline ------------------------------------------------------------
    ds = None
    if plan.input_files:
        ds = files(plan.input_files)
        ds = ds.map_batches(partial(read_files, ctx=ctx), batch_size=1, batch_format="pyarrow", num_cpus=light)
        ds = ds.map_batches(partial(filter_documents, ctx=ctx), batch_format="pyarrow",
                            batch_size=cfg.input.rows_per_block, num_cpus=light)
    ds = apply_pools(ds, ctx, [s for s in plan.stages if s in LLM_STAGES], joining)
    ds = union(ds, joining(FINAL))
    if ds is None:  # nothing to read and no row waiting anywhere (plan.empty is checked first)
        return
    ds = ds.map_batches(partial(build_sft, ctx=ctx), batch_format="pyarrow", num_cpus=light)
    # -------------------------------------------------------------------------------

    try:
        with RayDataFailures(storage, run_uri):  # each batch Ray Data gives up on, with its error
            for _ in ds.iter_batches(batch_size=None):
                pass  # outputs are written by the steps; draining the stream drives the run
    except Exception as exc:
        engine = first_error(read_failures(storage, run_uri))
        raise RunFailed(
            f"run {run_uri} stopped: {_last_line(exc)}"
            f"{f' (first error of a failed batch: {engine})' if engine else ''}. A batch that fails every retry "
            f"(ray.engine_batch_retries={cfg.ray.engine_batch_retries}) is tolerated up to "
            f"ray.max_failed_batches={cfg.ray.max_failed_batches} times per run; one more, or a "
            f"failure outside the engines, stops the run. Everything written so far is kept: run "
            f"the same command (with the same --run-id) to resume.") from exc
    finally:
        for d in dedups:
            d.stop()
        # Stops the engines and Ray's forwarding of worker logs, so nothing is printed
        # after the summary (its last line, the manifest path, is for scripts to read).
        ray.shutdown()
