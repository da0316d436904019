"""What an attempt of a run does, decided before Ray starts: the run's bookkeeping (dated
runs' markers, the run id), its inputs, and which stages and files it works on (a new run,
a resume, ``--from-stage``)."""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pyarrow.parquet as pq

from bft.config import BftConfig
from bft.lease import is_lease_file
from bft.prompts import PromptTemplate, Shot, load_template, same_frames
from bft.readers import ColumnMapping, InputError, ReadLimits, read_file
from bft.redaction import mask
from bft.resume import RUN_RECORD, FinishedRows, check_same_run, scan_run, write_run_record
from bft.seed import SeedSet
from bft.stages import FINAL, FOLDERS, JOINABLE, ORDER, PREVIOUS, RESTARTABLE, STEPS
from bft.storage import INPUT_SUFFIXES, Storage, detect_format, join
from bft.writers.failures import FAILURES_DIR
from bft.writers.manifest import MANIFEST_NAME
from bft.writers.parquet import DROPPED_DIR, failed_batch_files, parquet_files

log = logging.getLogger("bft")

COMPLETED_DIR = "_completed"
STARTED_DIR = "_started"
# Written by an in-place --from-stage before it clears anything, removed once it reconciles.
RESTART_FILE = "_run/restart.json"


@dataclass
class RunResult:
    run_id: str
    run_uri: str
    manifest_uri: str
    manifest: dict[str, Any]
    skipped: bool = False  # a dated input that an earlier run already processed
    input_files: list[str] | None = None  # what that earlier run covered (its completion record)


def completed_marker(cfg: BftConfig) -> str:
    return join(cfg.output.uri, COMPLETED_DIR, f"{cfg.date}.json")


def started_marker(cfg: BftConfig) -> str:
    return join(cfg.output.uri, STARTED_DIR, f"{cfg.date}.json")


def unfinished_run_for_date(cfg: BftConfig, storage: Storage) -> str | None:
    """The run id of an attempt at ``cfg.date`` that never completed, if any: a scheduled
    job that is retried (RayJob backoffLimit, a re-run by hand) resumes it instead of
    starting over."""
    if cfg.date is None or (data := storage.read_if_exists(started_marker(cfg))) is None:
        return None
    try:
        return json.loads(data)["run_id"]
    except (ValueError, KeyError):  # left unreadable by a driver that died writing it
        return None


def claim_date(cfg: BftConfig, storage: Storage, run_id: str) -> str:
    """Note ``run_id`` as the date's run unless a driver that started at the same moment
    got there first (the marker is created only if absent); the run id that holds the
    date. Two fresh drivers of one date thus work on one run, and its lease lets one in."""
    body = json.dumps({"date": cfg.date, "run_id": run_id}).encode()
    for _ in range(5):
        if storage.create_new(started_marker(cfg), body):
            return run_id
        if (holder := unfinished_run_for_date(cfg, storage)) is not None:
            return holder
        time.sleep(0.5)  # the other driver's write is still in flight (S3 409)
    storage.write_bytes(started_marker(cfg), body)  # an unreadable marker: ours replaces it
    return run_id


def previous_run_for_date(cfg: BftConfig, storage: Storage) -> RunResult | None:
    """The run that already processed ``cfg.date`` (scheduled runs), if any."""
    marker = completed_marker(cfg)
    if cfg.date is None or not storage.exists(marker):
        return None
    done = json.loads(storage.read_bytes(marker))
    manifest = json.loads(storage.read_bytes(done["manifest"]))
    return RunResult(done["run_id"], done["run_uri"], done["manifest"], manifest, skipped=True,
                     input_files=done.get("input_files"))


def landed_since(cfg: BftConfig, storage: Storage, previous: RunResult) -> list[str]:
    """Input files of the date that its completed run did not cover (shards that landed
    later). A completion record of an older bft lists no files: nothing can be told."""
    if previous.input_files is None:
        return []
    covered = set(previous.input_files)
    try:
        listed = list_inputs(cfg, storage)
    except InputError as exc:  # the date's input expired or moved: its completed run still stands
        log.warning("date %s: its input can no longer be listed (%s); keeping run %s's result",
                    cfg.date, exc, previous.run_id)
        return []
    return [f for f in listed if f not in covered]


def reopen_date(cfg: BftConfig, storage: Storage, run_id: str) -> None:
    """The date's completed run reads files that landed since: until it reconciles again
    the date is not complete (consumers never read a dataset that is still growing, and
    a driver that dies here leaves the date for the next run to finish)."""
    if (done := storage.read_if_exists(completed_marker(cfg))) is not None and \
            json.loads(done).get("run_id") == run_id:
        storage.remove([completed_marker(cfg)], missing_ok=True)


def earlier_unfinished_dates(load: Callable[[str], BftConfig], today: str, days: int) -> list[BftConfig]:
    """Configs of the ``days`` dates before ``today`` whose run started and never completed
    (oldest first): a retry that starts after midnight UTC, or a run abandoned after its
    retries, is finished before the new date is begun."""
    found = []
    for back in range(days, 0, -1):
        day = (datetime.date.fromisoformat(today) - datetime.timedelta(days=back)).isoformat()
        cfg = load(day)
        storage = Storage(cfg.storage)
        run_id = unfinished_run_for_date(cfg, storage)
        # (a claim whose run never wrote its record did nothing: there is nothing to finish)
        if run_id is not None and not storage.exists(completed_marker(cfg)) and \
                storage.exists(join(cfg.output.uri, run_id, RUN_RECORD)):
            found.append(cfg)
    return found


def restart_marker(run_uri: str) -> str:
    return join(run_uri, RESTART_FILE)


def mark_restart(cfg: BftConfig, storage: Storage, run_id: str, run_uri: str, from_stage: str) -> None:
    """Before an in-place ``--from-stage`` clears anything: the run stops counting as done
    (its manifest and its date's completion record go) until the restart reconciles, and a
    plain resume is refused meanwhile (:func:`check_no_restart_pending`)."""
    command = mask(shlex.join(["bft", *sys.argv[1:]])) if sys.argv[1:2] == ["run"] else \
        f"bft run CONFIG --run-id {run_id} --from-stage {from_stage}"
    storage.write_bytes(restart_marker(run_uri), json.dumps(
        {"from_stage": from_stage, "started_at": time.time(), "command": command}).encode())
    storage.remove([join(run_uri, MANIFEST_NAME)], missing_ok=True)
    # Errors of the attempts before it would pass for the restart's own (the rows of
    # earlier failed batches keep theirs in their drop details).
    storage.remove(storage.list_files(join(run_uri, FAILURES_DIR)), missing_ok=True)
    if cfg.date is not None and (done := storage.read_if_exists(completed_marker(cfg))) is not None:
        if json.loads(done).get("run_id") == run_id:
            storage.remove([completed_marker(cfg)], missing_ok=True)


def check_no_restart_pending(storage: Storage, run_uri: str) -> None:
    data = storage.read_if_exists(restart_marker(run_uri))
    if data is None:
        return
    restart = json.loads(data)
    raise ValueError(
        f"run {run_uri} was being restarted from {restart['from_stage']} (--from-stage) and that restart did "
        f"not finish; its later stages hold part old, part new outputs, so a plain resume is refused. Finish "
        f"the restart with the command that started it: {restart['command']}")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def load_templates(cfg: BftConfig, seeds: SeedSet | None = None) -> dict[str, PromptTemplate]:
    """The run's templates; a stage with ``few_shot.k`` gets the seed pairs as its examples."""
    templates = {}
    for name, step in STEPS.items():
        template = load_template(name, cfg.llm_stage(name).prompt_template, step.REQUIRED_PLACEHOLDERS,
                                 step.PLACEHOLDERS)
        shots = getattr(cfg.llm_stage(name), "few_shot", None)
        if shots is not None and shots.k:
            if seeds is None:
                raise ValueError(f"{name}.few_shot needs the seed pairs (seed.uri)")
            pool = tuple(Shot(pair.id, *step.shot(pair)) for pair in seeds.pairs)
            template = replace(template, shot_pool=pool, shots_per_prompt=shots.k, shot_seed=shots.seed)
        templates[name] = template
    return same_frames(templates)


def list_inputs(cfg: BftConfig, storage: Storage) -> list[str]:
    """Input files to read; fails (naming the URI) when there are none.

    A URI naming one file is read whatever its name; below a directory or prefix, only
    files of the configured format (any known format for ``auto``) are read, skipping
    hidden and ``_``-prefixed names (``_SUCCESS``, ``.crc``)."""
    files = storage.list_files(cfg.input.uri)
    if files != [cfg.input.uri]:
        wanted = {cfg.input.format} if cfg.input.format != "auto" else set(INPUT_SUFFIXES)
        files = [f for f in files if detect_format(f) in wanted
                 and not f.rsplit("/", 1)[-1].startswith((".", "_"))]
    if cfg.input.max_files:
        files = files[:cfg.input.max_files]
    if not files:
        looked = ", ".join(suffix for suffixes in INPUT_SUFFIXES.values() for suffix in suffixes)
        raise InputError(f"{cfg.input.uri}: no input files found (looked for {looked}; set input.uri or "
                         f"input.format)")
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
            for _ in read_file(storage, uri, cfg.input.format, mapping, cfg.input.rows_per_block,
                               limits=ReadLimits.from_config(cfg.input)):
                return  # first chunk read: the file opens and has the text column
        except InputError as exc:
            errors.append(exc)
            log.warning("%s", exc)
    raise errors[0] if len(errors) == 1 else InputError(
        f"none of the first {len(errors)} input files is readable: " + "; ".join(map(str, errors)))


def stage_inputs(storage: Storage, source_run_uri: str, from_stage: str) -> tuple[list[str], int]:
    """Parquet files (and their row count) of the stage before ``from_stage``."""
    folder = join(source_run_uri, FOLDERS[PREVIOUS[from_stage]])
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
    for stage in [*stages, FINAL]:
        doomed += storage.list_files(join(run_uri, FOLDERS[stage]))
    doomed += [f for f in storage.list_files(join(run_uri, DROPPED_DIR))
               if f.rsplit("/", 1)[-1].split("-", 1)[0] in stages]
    storage.remove(doomed)


def retry_failed_batches(storage: Storage, run_uri: str) -> None:
    """On resume, rows whose batches failed every retry last time (an engine that died,
    a node lost) are tried again: their drop records go, with the errors recorded for them."""
    failed = failed_batch_files(storage, run_uri)
    if failed:
        rows = 0
        for uri in failed:
            with storage.open(uri, "rb") as fh:
                rows += pq.ParquetFile(fh).metadata.num_rows
        log.info("resuming %s: %d row(s) of batches that failed last time are tried again", run_uri, rows)
        storage.remove(failed)
    storage.remove(storage.list_files(join(run_uri, FAILURES_DIR)), missing_ok=True)


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
              from_run: str | None, prompt_sha256: dict[str, str],
              inputs_sha256: dict[str, str] | None = None) -> WorkPlan:
    """``inputs_sha256``: digests of what else the run's rows depend on (seed pairs, each
    stage's adapter), checked like the config when the run is resumed."""
    in_place = from_run in (None, run_id)
    if from_stage == "filter" and not in_place:
        raise ValueError("--from-stage filter reads the input again, not another run's files: "
                         "leave out --from-run (a new run id does the same)")
    if from_stage is not None and from_stage != "filter":
        stages = list(RESTARTABLE[RESTARTABLE.index(from_stage):])
        files, rows_in = stage_inputs(storage, join(cfg.output.uri, from_run or run_id), from_stage)
        if in_place:
            mark_restart(cfg, storage, run_id, run_uri, from_stage)
            clear_stages(storage, run_uri, stages)
            # The stages redone now may run with another config (a new threshold, prompt
            # or model): a later resume of this run is checked against the config in force.
            write_run_record(storage, run_uri, cfg, prompt_sha256, inputs_sha256)
        return WorkPlan(stages, [], {from_stage: files},
                        manifest_start="read" if in_place else from_stage, first_stage_input=rows_in)

    inputs = list_inputs(cfg, storage)
    if not [f for f in storage.list_files(run_uri) if not is_lease_file(f, run_uri)]:  # a new run
        write_run_record(storage, run_uri, cfg, prompt_sha256, inputs_sha256)
        preflight(cfg, storage, inputs)
        return WorkPlan(list(RESTARTABLE), inputs, inputs_total=len(inputs))

    if from_stage == "filter":
        # Filtering again in place: forget what filter and later stages wrote, then the
        # resume below re-reads every input file (rows dropped by read stay dropped).
        mark_restart(cfg, storage, run_id, run_uri, from_stage)
        clear_stages(storage, run_uri, list(RESTARTABLE))
        write_run_record(storage, run_uri, cfg, prompt_sha256, inputs_sha256)
    else:
        check_no_restart_pending(storage, run_uri)
    # The run id exists: resume it, doing only what no earlier attempt finished.
    check_same_run(storage, run_uri, cfg, prompt_sha256, inputs_sha256)
    retry_failed_batches(storage, run_uri)
    state = scan_run(storage, run_uri)
    to_read = [f for f in inputs if not state.input_done(f)]
    unfinished = {stage: state.unfinished(stage) for stage in JOINABLE}
    entries = {stage: list(files) for stage, files in unfinished.items()}
    resume = {
        "finished_before": {stage: state.finished.count(stage) for stage in ORDER},
        "input_files_read_again": len(to_read),
        "rows_entering_at": {stage: sum(files.values()) for stage, files in unfinished.items()},
    }
    log.info("resuming %s: finished before: %s; %d of %d input file(s) to read again; rows entering at %s",
             run_uri, ", ".join(f"{k} {v}" for k, v in resume["finished_before"].items()), len(to_read),
             len(inputs), ", ".join(f"{k} {v}" for k, v in resume["rows_entering_at"].items()))
    return WorkPlan(list(RESTARTABLE), to_read, entries, finished=state.finished, resume=resume,
                    inputs_total=len(inputs))
