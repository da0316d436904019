"""The whole run in one place: read -> filter -> generate -> curate -> rewrite -> sft.

One Ray Data job streams documents through every step. Each step writes its kept rows
to ``<output>/<run_id>/<stage dir>/`` and its drops to ``<output>/<run_id>/dropped/`` as
batches finish, and passes only kept rows on; nothing waits for a whole stage. At the
end the manifest is built from what was written and checked to reconcile.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow.parquet as pq

from bft.config import LLM_STAGES, STAGES, BftConfig
from bft.context import RunContext
from bft.filters.dedup import Deduplicator
from bft.filters.token_length import token_budgets
from bft.prompts import load_template
from bft.readers import ColumnMapping, InputError, read_file
from bft.resume import FinishedRows, check_same_run, scan_run, write_run_record
from bft.schema import PIPELINE_ORDER, PREVIOUS_STAGE, STAGE_COLUMNS, STAGE_DIRS
from bft.steps import curate, generate, rewrite
from bft.steps.filter import filter_documents
from bft.steps.llm import apply_llm_step
from bft.steps.read import read_files, read_stage_outputs
from bft.steps.sft import build_sft
from bft.storage import Storage, detect_format, join
from bft.writers.manifest import build_manifest, write_manifest
from bft.writers.parquet import DROPPED_DIR, StageWriter, parquet_files

log = logging.getLogger("bft")

LLM_STEPS = (generate, curate, rewrite)


class RunFailed(RuntimeError):
    """The stream stopped on an error (too many failed batches, a crashed task); what
    was written so far stays, and the same command resumes the run."""


def _last_line(exc: BaseException) -> str:
    """The gist of a (Ray-wrapped) error: its type and the last line of its text."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"


@dataclass
class RunResult:
    run_id: str
    run_uri: str
    manifest_uri: str
    manifest: dict[str, Any]
    skipped: bool = False  # a dated input that an earlier run already processed


COMPLETED_DIR = "_completed"
STARTED_DIR = "_started"


def completed_marker(cfg: BftConfig) -> str:
    return join(cfg.output.uri, COMPLETED_DIR, f"{cfg.date}.json")


def started_marker(cfg: BftConfig) -> str:
    return join(cfg.output.uri, STARTED_DIR, f"{cfg.date}.json")


def unfinished_run_for_date(cfg: BftConfig, storage: Storage) -> str | None:
    """The run id of an attempt at ``cfg.date`` that never completed, if any: a scheduled
    job that is retried (RayJob backoffLimit, a re-run by hand) resumes it instead of
    starting over."""
    marker = started_marker(cfg)
    if cfg.date is None or not storage.exists(marker):
        return None
    return json.loads(storage.read_bytes(marker))["run_id"]


def previous_run_for_date(cfg: BftConfig, storage: Storage) -> RunResult | None:
    """The run that already processed ``cfg.date`` (scheduled runs), if any."""
    marker = completed_marker(cfg)
    if cfg.date is None or not storage.exists(marker):
        return None
    done = json.loads(storage.read_bytes(marker))
    manifest = json.loads(storage.read_bytes(done["manifest"]))
    return RunResult(done["run_id"], done["run_uri"], done["manifest"], manifest, skipped=True)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def load_templates(cfg: BftConfig) -> dict[str, Any]:
    return {step.NAME: load_template(step.NAME, getattr(cfg, step.NAME).prompt_template,
                                     step.REQUIRED_PLACEHOLDERS) for step in LLM_STEPS}


def list_inputs(cfg: BftConfig, storage: Storage) -> list[str]:
    """Input files to read; fails (naming the URI) when there are none.

    A URI naming one file is read whatever its name; below a directory or prefix, only
    files of the configured format (any known format for ``auto``) are read, skipping
    hidden and ``_``-prefixed names (``_SUCCESS``, ``.crc``)."""
    files = storage.list_files(cfg.input.uri)
    if files != [cfg.input.uri]:
        wanted = {cfg.input.format} if cfg.input.format != "auto" else {"jsonl", "parquet"}
        files = [f for f in files if detect_format(f) in wanted
                 and not f.rsplit("/", 1)[-1].startswith((".", "_"))]
    if cfg.input.max_files:
        files = files[:cfg.input.max_files]
    if not files:
        raise InputError(f"{cfg.input.uri}: no input files found (looked for .jsonl, .jsonl.gz, .json, "
                         f".parquet; set input.uri or input.format)")
    return files


def preflight(cfg: BftConfig, storage: Storage, files: list[str], tries: int = 3) -> None:
    """Read the start of the first input file before any engine starts, so a wrong
    ``text_column`` fails in seconds rather than after model loading. With
    ``on_bad_file: skip`` a damaged first file is not the run's problem: the next ones
    are tried, and only if none of the first few is readable does the run stop."""
    mapping = ColumnMapping.from_config(cfg.input)
    errors = []
    for uri in files[:tries if cfg.input.on_bad_file == "skip" else 1]:
        try:
            for _ in read_file(storage, uri, cfg.input.format, mapping, cfg.input.rows_per_block):
                return  # first chunk read: the file opens and has the text column
        except InputError as exc:
            errors.append(exc)
            log.warning("%s", exc)
    raise errors[0] if len(errors) == 1 else InputError(
        f"none of the first {len(errors)} input files is readable: " + "; ".join(map(str, errors)))


def stage_inputs(storage: Storage, source_run_uri: str, from_stage: str) -> tuple[list[str], int]:
    """Parquet files (and their row count) of the stage before ``from_stage``."""
    folder = join(source_run_uri, STAGE_DIRS[PREVIOUS_STAGE[from_stage]])
    files = parquet_files(storage, folder)
    if not files:
        raise InputError(f"{folder}: no Parquet files to restart '{from_stage}' from")
    rows = 0
    for uri in files:
        with storage.open(uri, "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    return files, rows


def clear_stages(storage: Storage, run_uri: str, stages: list[str]) -> None:
    """Remove earlier outputs of ``stages`` (and the final dataset) before they are redone."""
    doomed = []
    for stage in [*stages, "sft"]:
        doomed += storage.list_files(join(run_uri, STAGE_DIRS[stage]))
    doomed += [f for f in storage.list_files(join(run_uri, DROPPED_DIR))
               if f.rsplit("/", 1)[-1].split("-", 1)[0] in stages]
    storage.remove(doomed)


@dataclass
class WorkPlan:
    """What this attempt of a run does: which stages run, which input files are read,
    and which earlier-stage files feed rows in part-way (``--from-stage``, resume)."""

    stages: list[str]
    input_files: list[str]
    entries: dict[str, list[str]] = field(default_factory=dict)
    finished: FinishedRows | None = None  # rows earlier attempts finished (resume)
    manifest_start: str = "read"  # a run restarted from another run's output starts later
    first_stage_input: int | None = None
    resume: dict[str, Any] | None = None  # what resuming found, for the manifest
    inputs_total: int | None = None  # input files the run covers, over all its attempts

    @property
    def empty(self) -> bool:
        return not self.input_files and not any(self.entries.values())


def plan_work(cfg: BftConfig, storage: Storage, run_id: str, run_uri: str, from_stage: str | None,
              from_run: str | None, prompt_sha256: dict[str, str]) -> WorkPlan:
    in_place = from_run in (None, run_id)
    if from_stage == "filter" and not in_place:
        raise ValueError("--from-stage filter reads the input again, not another run's files: "
                         "leave out --from-run (a new run id does the same)")
    if from_stage is not None and from_stage != "filter":
        stages = list(STAGES[STAGES.index(from_stage):])
        files, rows_in = stage_inputs(storage, join(cfg.output.uri, from_run or run_id), from_stage)
        if in_place:
            clear_stages(storage, run_uri, stages)
            # The stages redone now may run with another config (a new threshold, prompt
            # or model): a later resume of this run is checked against the config in force.
            write_run_record(storage, run_uri, cfg, prompt_sha256)
        return WorkPlan(stages, [], {from_stage: files},
                        manifest_start="read" if in_place else from_stage, first_stage_input=rows_in)

    inputs = list_inputs(cfg, storage)
    if not storage.list_files(run_uri):
        write_run_record(storage, run_uri, cfg, prompt_sha256)
        preflight(cfg, storage, inputs)
        return WorkPlan(list(STAGES), inputs, inputs_total=len(inputs))

    if from_stage == "filter":
        # Filtering again in place: forget what filter and later stages wrote, then the
        # resume below re-reads every input file (rows dropped by read stay dropped).
        clear_stages(storage, run_uri, list(STAGES))
        write_run_record(storage, run_uri, cfg, prompt_sha256)
    # The run id exists: resume it, doing only what no earlier attempt finished.
    check_same_run(storage, run_uri, cfg, prompt_sha256)
    state = scan_run(storage, run_uri)
    to_read = [f for f in inputs if not state.input_done(f)]
    joining = PIPELINE_ORDER[PIPELINE_ORDER.index("filter") + 1:]  # stages rows can join at
    unfinished = {stage: state.unfinished(stage) for stage in joining}
    entries = {stage: list(files) for stage, files in unfinished.items()}
    resume = {
        "finished_before": {stage: state.finished.count(stage) for stage in PIPELINE_ORDER},
        "input_files_read_again": len(to_read),
        "rows_entering_at": {stage: sum(files.values()) for stage, files in unfinished.items()},
    }
    log.info("resuming %s: finished before: %s; %d of %d input file(s) to read again; rows entering at %s",
             run_uri, ", ".join(f"{k} {v}" for k, v in resume["finished_before"].items()), len(to_read),
             len(inputs), ", ".join(f"{k} {v}" for k, v in resume["rows_entering_at"].items()))
    return WorkPlan(list(STAGES), to_read, entries, finished=state.finished, resume=resume,
                    inputs_total=len(inputs))


def seed_dedup(dedup: Deduplicator, storage: Storage, run_uri: str, light_cpus: float) -> None:
    """On resume, teach the dedup shards the documents earlier attempts kept."""
    import ray

    @ray.remote(num_cpus=light_cpus)
    def remember(uri: str) -> None:
        with storage.open(uri, "rb") as fh:
            dedup.remember(pq.read_table(fh, columns=["id", "source", "source_row", "text"]).to_pylist())

    ray.get([remember.remote(uri) for uri in parquet_files(storage, join(run_uri, STAGE_DIRS["filter"]))])


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


def run_pipeline(cfg: BftConfig, run_id: str | None = None, *, from_stage: str | None = None,
                 from_run: str | None = None, force: bool = False) -> RunResult:
    started_at = time.time()
    storage = Storage(cfg.storage)
    if not force and from_stage is None and (previous := previous_run_for_date(cfg, storage)):
        return previous
    if run_id is None and not force and from_stage is None and (run_id := unfinished_run_for_date(cfg, storage)):
        log.info("date %s: run %s started earlier and did not finish; resuming it", cfg.date, run_id)
    run_id = run_id or new_run_id()
    run_uri = join(cfg.output.uri, run_id)
    templates = load_templates(cfg)
    prompt_sha256 = {name: t.sha256 for name, t in templates.items()}
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"--from-stage must be one of {', '.join(STAGES)}, got {from_stage!r}")

    # Everything that can fail cheaply fails here, before Ray or any model starts.
    storage.check_writable(cfg.output.uri)
    plan = plan_work(cfg, storage, run_id, run_uri, from_stage, from_run, prompt_sha256)
    if cfg.date is not None and from_stage is None and plan.resume is None:
        storage.write_bytes(started_marker(cfg), json.dumps({"date": cfg.date, "run_id": run_id}).encode())
    budgets = token_budgets(cfg, templates)  # loads every tokenizer: bad model paths fail here

    def manifest_now() -> dict[str, Any]:
        return build_manifest(
            storage, run_uri, run_id=run_id, config=cfg.redacted(), started_at=started_at,
            start_stage=plan.manifest_start, first_stage_input=plan.first_stage_input,
            input_files=plan.inputs_total,
            extra={"from_stage": from_stage, "from_run": from_run, "date": cfg.date, "resume": plan.resume,
                   "models": {name: getattr(cfg, name).model for name in LLM_STAGES},
                   "prompt_sha256": prompt_sha256})

    if plan.empty:
        log.info("run %s: nothing left to do; rebuilding its manifest", run_id)
        manifest = manifest_now()
    else:
        log.info("run %s: %d input file(s) to read, stages %s -> %s", run_id, len(plan.input_files),
                 " -> ".join(plan.stages), run_uri)
        run_dataset(cfg, plan, storage, run_uri, templates, budgets)
        manifest = manifest_now()
        # Counts that do not add up after a stream that ran to its end mean batches Ray
        # Data gave up on; record their rows, then count again.
        if not manifest["reconciled"] and sweep_failed_batches(storage, run_uri, cfg):
            manifest = manifest_now()
    manifest_uri = write_manifest(storage, run_uri, manifest)
    if cfg.date is not None and manifest["reconciled"]:
        # Consumers read the date's final dataset through this marker, so a forced
        # re-run replaces the old one instead of adding rows next to it.
        storage.write_bytes(completed_marker(cfg), json.dumps(
            {"date": cfg.date, "run_id": run_id, "run_uri": run_uri, "manifest": manifest_uri,
             "sft": join(run_uri, STAGE_DIRS["sft"]), "final_rows": manifest["final_rows"]}).encode())
    return RunResult(run_id=run_id, run_uri=run_uri, manifest_uri=manifest_uri, manifest=manifest)


def run_dataset(cfg: BftConfig, plan: WorkPlan, storage: Storage, run_uri: str,
                templates: dict[str, Any], budgets: list[Any]) -> None:
    """Build the Ray Data pipeline for ``plan`` and drive it to its end."""
    import ray

    init_ray(cfg)
    # Batches that fail every retry are skipped by Ray Data (up to this many per run)
    # and their rows dropped by sweep_failed_batches (see run_pipeline), instead of
    # failing a long run.
    ray.data.DataContext.get_current().max_errored_blocks = cfg.ray.max_failed_batches
    light = cfg.ray.light_task_cpus
    dedup = None
    if plan.input_files and cfg.filters.dedup:
        dedup = Deduplicator.start(cfg.filters.dedup_shards)
        if plan.finished is not None:
            seed_dedup(dedup, storage, run_uri, light)
    ctx = RunContext(config=cfg, storage=storage, run_uri=run_uri, templates=templates,
                     token_budgets=budgets, dedup=dedup,
                     finished=ray.put(plan.finished) if plan.finished is not None else None)

    def files(uris: list[str]) -> Any:
        return ray.data.from_items([{"path": f} for f in uris], override_num_blocks=len(uris))

    def enter(ds: Any, stage: str) -> Any:
        """Add the rows that join at ``stage``, read back from the stage before it."""
        if not plan.entries.get(stage):
            return ds
        columns = list(STAGE_COLUMNS[PREVIOUS_STAGE[stage]])
        joining = files(plan.entries[stage]).map_batches(
            partial(read_stage_outputs, ctx=ctx, stage=stage, columns=columns),
            batch_size=1, batch_format="pyarrow", num_cpus=light)
        return joining if ds is None else ds.union(joining)

    # --- the pipeline ------------------------------------------------------------
    ds = None
    if plan.input_files:
        ds = files(plan.input_files)
        ds = ds.map_batches(partial(read_files, ctx=ctx), batch_size=1, batch_format="pyarrow", num_cpus=light)
        ds = ds.map_batches(partial(filter_documents, ctx=ctx), batch_format="pyarrow",
                            batch_size=cfg.input.rows_per_block, num_cpus=light)
    for step in LLM_STEPS:
        ds = enter(ds, step.NAME)
        if ds is not None:
            ds = apply_llm_step(ds, step, ctx)
    ds = enter(ds, "sft")
    ds = ds.map_batches(partial(build_sft, ctx=ctx), batch_format="pyarrow", num_cpus=light)
    # -------------------------------------------------------------------------------

    try:
        for _ in ds.iter_batches(batch_size=None):
            pass  # outputs are written by the steps; draining the stream drives the run
    except Exception as exc:
        raise RunFailed(
            f"run {run_uri} stopped: {_last_line(exc)}. A batch that fails every retry "
            f"(ray.engine_batch_retries={cfg.ray.engine_batch_retries}) is tolerated up to "
            f"ray.max_failed_batches={cfg.ray.max_failed_batches} times per run; one more, or a "
            f"failure outside the engines, stops the run. Everything written so far is kept: run "
            f"the same command (with the same --run-id) to resume.") from exc
    finally:
        if dedup is not None:
            dedup.stop()
        # Stops the engines and Ray's forwarding of worker logs, so nothing is printed
        # after the summary (its last line, the manifest path, is for scripts to read).
        ray.shutdown()


def sweep_failed_batches(storage: Storage, run_uri: str, cfg: BftConfig) -> int:
    """Drop (``batch_failed``) the rows of batches Ray Data gave up on; returns how many.

    Called only after the stream ran to its end: a row kept by one stage and not
    finished by the next can then only belong to a batch that failed every retry."""
    writer = StageWriter(storage, run_uri)
    state = scan_run(storage, run_uri)
    total = 0
    for stage in (*LLM_STAGES, "sft"):
        lost = []
        for uri in state.unfinished(stage):
            with storage.open(uri, "rb") as fh:
                rows = pq.read_table(fh).to_pylist()
            done = state.finished.mask(stage, [r["source"] for r in rows], [r["source_row"] for r in rows])
            lost += [row for row, finished in zip(rows, done) if not finished]
        if lost:
            log.warning("%s: %d row(s) were in batches that failed every retry; dropped as batch_failed",
                        stage, len(lost))
            detail = (f"its batch failed at {stage} on every attempt (ray.engine_batch_retries="
                      f"{cfg.ray.engine_batch_retries}); the cause is in the Ray logs of the run")
            writer.write(stage, [], [{**row, "reason": "batch_failed", "detail": detail} for row in lost],
                         time.time())
            total += len(lost)
            state = scan_run(storage, run_uri)  # so the next stage does not count them as lost
    return total
