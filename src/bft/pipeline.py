"""One attempt of a run, start to end: plan it (``planning.py``), run its Ray Data graph
(``graph.py``), then account for every row in the manifest, built from what was written
and checked to reconcile."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any, Callable, ContextManager

import pyarrow.parquet as pq

from bft.config import BftConfig
from bft.engines import layout
from bft.engines.adapters import resolve_adapters
from bft.engines.vllm_engine import check_platform_support
from bft.filters.language import check_languages
from bft.filters.token_length import token_budgets
from bft.graph import RunFailed, run_dataset
from bft.lease import RunLease
from bft.planning import (RunResult, claim_date, completed_marker, landed_since, list_inputs, load_templates, new_run_id,
                          plan_work, previous_run_for_date, reopen_date, restart_marker, started_marker,
                          unfinished_run_for_date)
from bft.progress.snapshot import write_attempt_record
from bft.redaction import mask
from bft.resume import scan_run
from bft.seed import load_seed
from bft.stages import FOLDERS, JOINABLE, LLM_STAGES, RESTARTABLE
from bft.steps.read import read_stats
from bft.steps.sft import write_seed_pairs
from bft.storage import Storage, join
from bft.writers.cost import engine_cost
from bft.writers.failures import first_error, read_failures
from bft.writers.manifest import batch_failures, build_manifest, write_manifest
from bft.writers.parquet import StageWriter

log = logging.getLogger("bft")

__all__ = ["RunFailed", "RunResult", "run_pipeline", "sweep_failed_batches"]


def run_pipeline(cfg: BftConfig, run_id: str | None = None, *, from_stage: str | None = None,
                 from_run: str | None = None, force: bool = False,
                 progress: Callable[[Storage, str], ContextManager[Any]] | None = None) -> RunResult:
    """``progress(storage, run_uri)``: a context to run the stages in (the live progress
    view of ``bft run``), entered once the run id and its plan are known."""
    started_at = time.time()
    storage = Storage(cfg.storage)
    reopen = False
    if not force and from_stage is None and (previous := previous_run_for_date(cfg, storage)):
        if not (landed := landed_since(cfg, storage, previous)):
            return previous
        # Shards of the date that arrived after it was completed: its run reads them now.
        log.info("date %s: %d input file(s) landed since run %s completed it; resuming it to read them",
                 cfg.date, len(landed), previous.run_id)
        run_id = run_id or previous.run_id
        reopen = True
    if run_id is None and not force and from_stage is None and (run_id := unfinished_run_for_date(cfg, storage)):
        log.info("date %s: run %s started earlier and did not finish; resuming it", cfg.date, run_id)
    seeds = load_seed(cfg.seed, storage) if cfg.seed.uri else None
    templates = load_templates(cfg, seeds)
    adapters = resolve_adapters(cfg, storage)
    if from_stage is not None and from_stage not in RESTARTABLE:
        raise ValueError(f"--from-stage must be one of {', '.join(RESTARTABLE)}, got {from_stage!r}")

    # Everything that can fail cheaply fails here, before Ray or any model starts.
    check_languages(cfg.filters)
    check_platform_support(cfg, LLM_STAGES)
    storage.check_writable(cfg.output.uri)
    if run_id is None and cfg.date is not None and not force and from_stage is None:
        # Only a date that can run claims it (its input has landed, its config passed the
        # checks above): a claim left by a run that could not start would be "unfinished".
        list_inputs(cfg, storage)
        if (run_id := claim_date(cfg, storage, fresh := new_run_id())) != fresh:
            log.info("date %s: another driver started it just now as run %s; joining that run", cfg.date, run_id)
    run_id = run_id or new_run_id()
    run_uri = join(cfg.output.uri, run_id)
    # One driver per run id (lease.py): taken before anything of the run is read or written.
    command = f"bft run (date {cfg.date})" if cfg.date else "bft run"
    with RunLease(storage, run_uri, cfg.output.lease_ttl_s, command=command):
        if reopen:
            reopen_date(cfg, storage, run_id)
        return _attempt(cfg, storage, run_id, run_uri, started_at, from_stage, from_run, seeds, templates, adapters,
                        progress)


def _attempt(cfg: BftConfig, storage: Storage, run_id: str, run_uri: str, started_at: float,
             from_stage: str | None, from_run: str | None, seeds: Any, templates: dict[str, Any],
             adapters: dict[str, Any], progress: Callable[[Storage, str], ContextManager[Any]] | None) -> RunResult:
    """Plan, run and account for one attempt of a run, under its lease."""
    prompt_sha256 = {name: t.sha256 for name, t in templates.items()}
    # What else the rows depend on, checked like the config when the run is resumed.
    inputs_sha256 = {**({"seed pairs": seeds.sha256} if seeds else {}),
                     **{f"{name}.lora": adapter.sha256 for name, adapter in adapters.items()}}
    plan = plan_work(cfg, storage, run_id, run_uri, from_stage, from_run, prompt_sha256, inputs_sha256)
    if cfg.date is not None and from_stage is None and plan.resume is None:
        storage.write_bytes(started_marker(cfg), json.dumps({"date": cfg.date, "run_id": run_id}).encode())
    budgets = token_budgets(cfg, templates)  # loads every tokenizer: bad model paths fail here
    # The engine pools this attempt starts, with the stages each serves in it.
    pools = [(pool.kind, [s for s in pool.stages if s in plan.stages]) for pool in layout(cfg)]
    pools = [(kind, stages) for kind, stages in pools if stages]

    def manifest_now() -> dict[str, Any]:
        return build_manifest(
            storage, run_uri, run_id=run_id, config=cfg.redacted(), started_at=started_at,
            start_stage=plan.manifest_start, first_stage_input=plan.first_stage_input,
            input_files=plan.inputs_total,
            extra={"from_stage": from_stage, "from_run": from_run, "date": cfg.date, "resume": plan.resume,
                   "models": {name: cfg.llm_stage(name).model for name in LLM_STAGES},
                   "engines": [{"stages": stages, "kind": kind} for kind, stages in pools],
                   "prompt_sha256": prompt_sha256,
                   "adapters": {name: adapter.summary() for name, adapter in adapters.items()},
                   "seed": seeds.summary() if seeds else None})

    def add_seed_pairs() -> None:
        if cfg.output.seed_mix and seeds is not None:
            count = write_seed_pairs(storage, run_uri, cfg, seeds)
            log.info("run %s: %d seed pairs added to the final dataset (output.seed_mix)", run_id, count)

    if plan.empty:
        log.info("run %s: nothing left to do; rebuilding its manifest", run_id)
        add_seed_pairs()
        manifest = manifest_now()
    else:
        log.info("run %s: %d input file(s) to read, stages %s -> %s; engine pools: %s", run_id,
                 len(plan.input_files), " -> ".join(plan.stages), run_uri,
                 ", ".join(f"{kind} ({' + '.join(stages)})" for kind, stages in pools))
        from_read = plan.manifest_start == "read"
        write_attempt_record(storage, run_uri, cfg.input.uri if from_read else None, plan.input_files, started_at,
                             None if from_read else plan.first_stage_input,
                             resumed=plan.resume is not None or from_stage is not None)
        with progress(storage, run_uri) if progress else contextlib.nullcontext():
            run_dataset(cfg, plan, storage, run_uri, templates, budgets, adapters)
        add_seed_pairs()
        manifest = manifest_now()
        # Counts that do not add up after a stream that ran to its end mean batches Ray
        # Data gave up on; record their rows, then count again.
        if not manifest["reconciled"] and sweep_failed_batches(storage, run_uri, cfg):
            manifest = manifest_now()
    manifest["batch_failures"] = batch_failures(manifest["stages"], cfg.ray.max_failed_share,
                                                first_error(read_failures(storage, run_uri)))
    manifest["cost"] = engine_cost(cfg, storage, run_uri, manifest["stages"], manifest["final_rows"])
    manifest_uri = write_manifest(storage, run_uri, manifest)
    complete = manifest["reconciled"] and not manifest["batch_failures"]["failed"]
    if manifest["reconciled"]:
        # A restart, if any, has run to its end: every output is of this configuration, so a
        # plain resume (which retries any failed batches) is safe again.
        storage.remove([restart_marker(run_uri)], missing_ok=True)
    if cfg.date is not None and complete:
        # Consumers read the date's final dataset through this marker, so a forced
        # re-run replaces the old one instead of adding rows next to it. The input files
        # it lists are what a later run of the date compares the listing with.
        storage.write_bytes(completed_marker(cfg), json.dumps(
            {"date": cfg.date, "run_id": run_id, "run_uri": run_uri, "manifest": manifest_uri,
             "sft": join(run_uri, FOLDERS["sft"]), "final_rows": manifest["final_rows"],
             # (unknown for a run restarted from another run's stage: it read no input itself)
             "input_files": sorted(s["source"] for s in read_stats(storage, run_uri))
             if plan.manifest_start == "read" else None}).encode())
    return RunResult(run_id=run_id, run_uri=run_uri, manifest_uri=manifest_uri, manifest=manifest)


def sweep_failed_batches(storage: Storage, run_uri: str, cfg: BftConfig) -> int:
    """Drop (``batch_failed``) the rows of batches Ray Data gave up on; returns how many.

    Called only after the stream ran to its end: a row kept by one stage and not
    finished by the next can then only belong to a batch that failed every retry."""
    writer = StageWriter(storage, run_uri)
    state = scan_run(storage, run_uri)
    error = first_error(read_failures(storage, run_uri))
    total = 0
    for stage in JOINABLE:  # every stage after filter
        lost = []
        for uri in state.unfinished(stage):
            with storage.open(uri, "rb") as fh:
                rows = pq.read_table(fh).to_pylist()
            done = state.finished.mask_rows(stage, rows)
            lost += [row for row, finished in zip(rows, done) if not finished]
        if lost:
            log.warning("%s: %d row(s) were in batches that failed every retry; dropped as batch_failed",
                        stage, len(lost))
            cause = f": {error}" if error else "; no error was recorded (the Ray logs of the run have it)"
            detail = mask(f"its batch failed at {stage} on every attempt (ray.engine_batch_retries="
                          f"{cfg.ray.engine_batch_retries}){cause}")
            writer.write_failed(stage, [{**row, "reason": "batch_failed", "detail": detail} for row in lost],
                                time.time())
            total += len(lost)
            state = scan_run(storage, run_uri)  # so the next stage does not count them as lost
    return total
