"""The whole run in one place: read -> filter -> generate -> curate -> rewrite -> sft.

One Ray Data job streams documents through every step. Each step writes its kept rows
to ``<output>/<run_id>/<stage dir>/`` and its drops to ``<output>/<run_id>/dropped/`` as
batches finish, and passes only kept rows on; nothing waits for a whole stage. At the
end the manifest is built from what was written and checked to reconcile.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bft.config import LLM_STAGES, STAGES, BftConfig
from bft.context import RunContext
from bft.filters.dedup import Deduplicator
from bft.filters.token_length import token_budgets
from bft.prompts import load_template
from bft.readers import ColumnMapping, InputError, read_file
from bft.schema import PREVIOUS_STAGE, STAGE_COLUMNS, STAGE_DIRS
from bft.steps import curate, generate, rewrite
from bft.steps.filter import filter_documents
from bft.steps.llm import apply_llm_step
from bft.steps.read import read_files
from bft.steps.sft import build_sft
from bft.storage import Storage, detect_format, join
from bft.writers.manifest import build_manifest, write_manifest
from bft.writers.parquet import DROPPED_DIR

log = logging.getLogger("bft")

LLM_STEPS = (generate, curate, rewrite)


@dataclass
class RunResult:
    run_id: str
    run_uri: str
    manifest_uri: str
    manifest: dict[str, Any]
    skipped: bool = False  # a dated input that an earlier run already processed


COMPLETED_DIR = "_completed"


def completed_marker(cfg: BftConfig) -> str:
    return join(cfg.output.uri, COMPLETED_DIR, f"{cfg.date}.json")


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


def preflight_first_file(cfg: BftConfig, storage: Storage, uri: str) -> None:
    """Check the first input file's columns before any engine starts, so a wrong
    ``text_column`` fails in seconds rather than after model loading."""
    mapping = ColumnMapping.from_config(cfg.input)
    for _ in read_file(storage, uri, cfg.input.format, mapping, cfg.input.rows_per_block):
        return  # first chunk read: columns are fine (a wrong text column raises)


def stage_inputs(storage: Storage, source_run_uri: str, from_stage: str) -> tuple[list[str], int]:
    """Parquet files (and their row count) of the stage before ``from_stage``."""
    folder = join(source_run_uri, STAGE_DIRS[PREVIOUS_STAGE[from_stage]])
    files = [f for f in storage.list_files(folder) if f.endswith(".parquet")]
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


def read_stage_files(batch: pa.Table, storage: Storage, columns: list[str]) -> Iterator[pa.Table]:
    """Stream an earlier stage's Parquet back in (for ``--from-stage``)."""
    for uri in batch.column("path").to_pylist():
        with storage.open(uri, "rb") as fh:
            for record_batch in pq.ParquetFile(fh).iter_batches(columns=columns):
                yield pa.Table.from_batches([record_batch])


def init_ray(cfg: BftConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if cfg.ray.address:
        kwargs["address"] = cfg.ray.address
    elif cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    ray.init(**kwargs)


def run_pipeline(cfg: BftConfig, run_id: str | None = None, *, from_stage: str | None = None,
                 from_run: str | None = None, force: bool = False) -> RunResult:
    import ray

    started_at = time.time()
    storage = Storage(cfg.storage)
    if not force and from_stage is None and (previous := previous_run_for_date(cfg, storage)):
        return previous
    run_id = run_id or new_run_id()
    run_uri = join(cfg.output.uri, run_id)
    templates = load_templates(cfg)
    from_stage = from_stage or "filter"
    if from_stage not in STAGES:
        raise ValueError(f"--from-stage must be one of {', '.join(STAGES)}, got {from_stage!r}")
    stages = list(STAGES[STAGES.index(from_stage):])

    # Everything that can fail cheaply fails here, before Ray or any model starts.
    storage.check_writable(cfg.output.uri)
    first_stage_input: int | None = None
    if from_stage == "filter":
        if storage.list_files(run_uri):
            raise ValueError(f"{run_uri} already holds a run; pick another --run-id, or "
                             f"--from-stage to redo later stages of it")
        files = list_inputs(cfg, storage)
        preflight_first_file(cfg, storage, files[0])
    else:
        from_run = from_run or run_id
        files, first_stage_input = stage_inputs(storage, join(cfg.output.uri, from_run), from_stage)
        if from_run == run_id:
            clear_stages(storage, run_uri, stages)
    # A run's manifest covers what its folder holds: from "read" unless it started from
    # another run's output.
    manifest_start = from_stage if from_run not in (None, run_id) else "read"
    budgets = token_budgets(cfg, templates)  # loads every tokenizer: bad model paths fail here
    log.info("run %s: %d input file(s), stages %s -> %s", run_id, len(files), " -> ".join(stages), run_uri)

    init_ray(cfg)
    light = cfg.ray.light_task_cpus
    dedup = Deduplicator.start(cfg.filters.dedup_shards) if "filter" in stages and cfg.filters.dedup else None
    ctx = RunContext(config=cfg, storage=storage, run_uri=run_uri, templates=templates,
                     token_budgets=budgets if "filter" in stages else [], dedup=dedup)

    # --- the pipeline ------------------------------------------------------------
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    if "filter" in stages:
        ds = ds.map_batches(partial(read_files, ctx=ctx), batch_size=1, batch_format="pyarrow", num_cpus=light)
        ds = ds.map_batches(partial(filter_documents, ctx=ctx), batch_format="pyarrow",
                            batch_size=cfg.input.rows_per_block, num_cpus=light)
    else:
        columns = list(STAGE_COLUMNS[PREVIOUS_STAGE[from_stage]])
        ds = ds.map_batches(partial(read_stage_files, storage=storage, columns=columns),
                            batch_size=1, batch_format="pyarrow", num_cpus=light)
    for step in LLM_STEPS:
        if step.NAME in stages:
            ds = apply_llm_step(ds, step, ctx)
    ds = ds.map_batches(partial(build_sft, ctx=ctx), batch_format="pyarrow", num_cpus=light)
    # -------------------------------------------------------------------------------

    try:
        for _ in ds.iter_batches(batch_size=None):
            pass  # outputs are written by the steps; draining the stream drives the run
    finally:
        if dedup is not None:
            dedup.stop()
        # Stops the engines and Ray's forwarding of worker logs, so nothing is printed
        # after the summary (its last line, the manifest path, is for scripts to read).
        ray.shutdown()

    manifest = build_manifest(
        storage, run_uri, run_id=run_id, config=cfg.redacted(), started_at=started_at,
        start_stage=manifest_start, first_stage_input=first_stage_input,
        extra={"from_stage": from_stage, "from_run": from_run,
               "input_files": len(files), "date": cfg.date,
               "models": {name: getattr(cfg, name).model for name in LLM_STAGES},
               "prompt_sha256": {name: t.sha256 for name, t in templates.items()}},
    )
    manifest_uri = write_manifest(storage, run_uri, manifest)
    if cfg.date is not None and manifest["reconciled"]:
        # Consumers read the date's final dataset through this marker, so a forced
        # re-run replaces the old one instead of adding rows next to it.
        storage.write_bytes(completed_marker(cfg), json.dumps(
            {"date": cfg.date, "run_id": run_id, "run_uri": run_uri, "manifest": manifest_uri,
             "sft": join(run_uri, STAGE_DIRS["sft"]), "final_rows": manifest["final_rows"]}).encode())
    return RunResult(run_id=run_id, run_uri=run_uri, manifest_uri=manifest_uri, manifest=manifest)
