"""Command line: ``bft run``, ``bft status``, ``bft train``, ``bft report``, ``bft submit``,
``bft tiny-model``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from bft import __version__


def _summary(manifest: dict[str, Any]) -> str:
    lines = [f"{'stage':<10}{'in':>8}{'out':>8}{'dropped':>9}{'wall s':>9}  drop reasons"]
    for stage, entry in manifest["stages"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in entry["dropped_by_reason"].items())
        lines.append(f"{stage:<10}{entry['in']:>8}{entry['out']:>8}{entry['dropped']:>9}"
                     f"{entry['wall_s']:>9.1f}  {reasons}")
    notes = []
    if added := manifest["stages"].get("filter", {}).get("segments_added"):
        notes.append(f"segments: long documents cut into passages made {added} more row(s) "
                     f"(filter: in + {added} = out + dropped)")
    if skipped := manifest["stages"].get("read", {}).get("records_skipped"):
        notes.append(f"{sum(skipped.values())} WARC records that are no document skipped "
                     f"({', '.join(f'{k}={v}' for k, v in skipped.items())})")
    failures = manifest.get("batch_failures") or {}
    for stage, lost in failures.get("stages", {}).items():
        notes.append(f"failed batches: {stage} lost {lost['rows']} of {lost['of']} row(s) "
                     f"({lost['share']:.0%}; ray.max_failed_share={failures['max_failed_share']})")
    if failures.get("stages"):
        notes.append(f"first error: {failures.get('first_error') or 'none recorded (see the Ray logs)'}")
    lines += notes
    status = "yes" if manifest["reconciled"] else "NO: " + "; ".join(manifest["reconciliation_problems"])
    lines.append(f"counts reconcile: {status}")
    if resume := manifest.get("resume"):
        joining = ", ".join(f"{stage} {n}" for stage, n in resume["rows_entering_at"].items() if n)
        lines.append(f"resumed: {resume['input_files_read_again']} input file(s) read again "
                     f"({manifest.get('rows_read_again', 0)} rows in them already done); "
                     f"rows picked up at {joining or 'no stage'}")
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that explain themselves: printed as one line, exit status 2."""
    from bft.config import ConfigError
    from bft.lease import LeaseHeld
    from bft.prompts import TemplateError
    from bft.readers import InputError
    from bft.report.run_data import ReportError
    from bft.storage import StorageError

    return ConfigError, TemplateError, InputError, StorageError, ReportError, LeaseHeld


def _root_cause(exc: BaseException) -> BaseException:
    """Ray wraps errors raised in tasks; find ours (input, config) for a clean message."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _user_errors()):
            return current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else (current.__cause__ or current.__context__)
    return exc


def cmd_run(args: argparse.Namespace) -> int:
    from bft.config import load_config
    from bft.lease import LeaseHeld
    from bft.planning import earlier_unfinished_dates
    from bft.redaction import learn, secret_sets

    # secret_sets: what `bft submit` kept off the command line (see redaction.py)
    sets = args.set + secret_sets()
    cfg = load_config(args.config, sets + ([f"date={args.date}"] if args.date else []))
    learn(cfg)
    statuses = []
    if args.date is None and cfg.date is not None and not (args.force or args.from_stage or args.run_id):
        log = logging.getLogger("bft")
        for earlier in earlier_unfinished_dates(lambda day: load_config(args.config, [*sets, f"date={day}"]),
                                                cfg.date, cfg.catch_up_days):
            log.info("date %s: its run started and never completed; finishing it before %s (catch_up_days=%d)",
                     earlier.date, cfg.date, cfg.catch_up_days)
            try:
                statuses.append(_run_one(earlier, args))
            except LeaseHeld as exc:  # still running elsewhere (a long run past midnight): its driver finishes it
                log.warning("date %s is left to the driver that holds it: %s", earlier.date, exc)
            except Exception as exc:  # noqa: BLE001 - today's run goes ahead; this one is reported
                print(f"bft: error: date {earlier.date} could not be finished: {_root_cause(exc)}", file=sys.stderr)
                statuses.append(1)
    return max([*statuses, _run_one(cfg, args)])


def _quietly(args: argparse.Namespace, call: Any, *call_args: Any) -> Any:
    """``call`` with the run's console: its libraries' logs in the run's log file."""
    from bft.progress.console import quiet_run

    if args.verbose or getattr(args, "log_path", None) is None:
        return call(*call_args)
    with quiet_run(args.log_path, logging.WARNING if args.quiet else logging.INFO, _user_errors()):
        return call(*call_args)


def _run_one(cfg: Any, args: argparse.Namespace) -> int:
    from bft.pipeline import run_pipeline
    from bft.progress.console import default_log_path, quiet_run
    from bft.progress.view import ProgressView

    def run(progress: Any) -> Any:
        return run_pipeline(cfg, args.run_id, from_stage=args.from_stage, from_run=args.from_run,
                            force=args.force, progress=progress)

    interval = args.progress_interval
    if not args.verbose and getattr(args, "log_path", None) is None:  # one log file for this command
        args.log_path = Path(args.log_file) if args.log_file else default_log_path()
        try:
            args.log_path.parent.mkdir(parents=True, exist_ok=True)
            args.log_path.open("a").close()
        except OSError as exc:
            logging.getLogger("bft").warning("cannot write the log file %s (%s): logs stay on the console",
                                             args.log_path, exc)
            args.verbose = True
        else:
            print(f"logs: {args.log_path} (--verbose shows them here)")
    if args.verbose:  # the logs scroll on the console; progress as lines between them
        result = run(lambda storage, uri: ProgressView(storage, uri, sys.stdout, interval, live=False))
    else:
        with quiet_run(args.log_path, logging.WARNING if args.quiet else logging.INFO, _user_errors()) as console:
            result = run(None if args.quiet else
                         (lambda storage, uri: ProgressView(storage, uri, console, interval)))
    manifest = result.manifest
    if result.skipped:
        print(f"date {cfg.date} was already processed by run {result.run_id}; nothing to do "
              f"(--force runs it again)")
        print(f"manifest: {result.manifest_uri}")
        return 0
    print()
    seeds = f" (+ {manifest['seed_rows']} seed pairs)" if manifest.get("seed_rows") else ""
    print(f"run {result.run_id}: {manifest['final_rows']} SFT examples{seeds} in {manifest['wall_s']:.1f} s")
    print(_summary(manifest))
    from bft.stages import FOLDERS
    from bft.writers.parquet import DROPPED_DIR

    folders = " ".join(f"{folder}/" for folder in [*FOLDERS.values(), DROPPED_DIR])
    from bft.writers.cost import cost_line

    if line := cost_line(manifest.get("cost")):
        print(line)
    print(f"outputs:  {result.run_uri}/  ({folders})")
    print(f"final dataset: {result.run_uri}/sft/")
    failed = (manifest.get("batch_failures") or {}).get("failed")
    if not failed and args.report and (status := _report_after_run(args, cfg.storage, result.run_uri, cfg.report)):
        return status
    print(f"manifest: {result.manifest_uri}")
    if failed:
        failures = manifest["batch_failures"]
        print(f"bft: error: run {result.run_id} failed: batches that failed every retry cost "
              f"{', '.join(failed)} more than ray.max_failed_share={failures['max_failed_share']} of "
              f"its rows (first error: {failures['first_error'] or 'none recorded'})"
              f"{f'; date {cfg.date} is not marked complete' if cfg.date else ''}. The same command "
              f"again retries those rows (a changed config needs a new --run-id).", file=sys.stderr)
        return 1
    return 0 if manifest["reconciled"] else 3


def _print_report(report: Any) -> None:
    from bft.report.build import key_figures

    print(key_figures(report.data))
    print(f"report:   {report.html_uri}")
    print(f"          {report.json_uri}")


def _report_after_run(args: argparse.Namespace, storage_cfg: Any, run_uri: str, settings: Any) -> int:
    """``bft run --report``: 4 when the report fails (the run's outputs are intact)."""
    from bft.report.build import build_report
    from bft.storage import Storage

    try:
        report = _quietly(args, build_report, Storage(storage_cfg), run_uri, settings)
    except Exception as exc:  # noqa: BLE001 - a failed report must not hide the run's result
        logging.getLogger("bft").exception("report failed")
        print(f"bft: error: the report of {run_uri} failed: {_root_cause(exc)} "
              f"(the run is complete; retry with `bft report {run_uri}`)", file=sys.stderr)
        return 4
    _print_report(report)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bft.config import load_report_settings
    from bft.report.build import build_report
    from bft.storage import Storage

    overrides = list(args.set)
    if args.out:
        overrides.append(f"report.out_uri={args.out}")
    if args.no_embed:
        overrides.append("report.embed=false")
    storage_cfg, settings = load_report_settings(args.config, overrides)
    _print_report(build_report(Storage(storage_cfg), args.run_uri, settings))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when the run finished and reconciled, 1 when it failed or stopped, 3 while
    it runs (a script can wait on it)."""
    from bft.config import load_report_settings
    from bft.progress.snapshot import FileTallies, snapshot
    from bft.progress.status import format_status
    from bft.storage import Storage

    storage_cfg, _ = load_report_settings(args.config, list(args.set))
    storage = Storage(storage_cfg)
    tallies = FileTallies(storage, args.run_uri)
    looks = 0
    while True:
        progress = snapshot(storage, args.run_uri, tallies)
        looks += 1
        # --watch waits a while for a run about to start, not forever for a wrong path
        if progress.state == "not started" and (not args.watch or looks * args.watch > 600):
            raise FileNotFoundError(f"{args.run_uri}: no run there (nothing written yet, or a wrong path)")
        print(json.dumps(progress.to_dict(), indent=2) if args.json else format_status(progress), flush=True)
        if not args.watch or progress.state not in ("running", "not started"):
            break
        time.sleep(args.watch)
    return {"finished": 0, "running": 3, "not started": 3}.get(progress.state, 1)


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from bft.tiny_model import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_layers=args.layers,
                         num_heads=args.hidden_size // args.head_dim, head_dim=args.head_dim,
                         max_position_embeddings=args.max_position_embeddings, seed=args.seed)
    path = build_tiny_model(args.path, spec, corpus=args.corpus)
    print(f"tiny model written to {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from bft.config import load_config
    from bft.redaction import is_secret_override, learn
    from bft.submit import run_command, runtime_env, submit

    if "://" not in args.config:
        learn(load_config(args.config, args.set))  # fail here, not on the cluster, on a bad config
    working_dir = None if args.no_working_dir else args.working_dir
    # Secrets go in the job's environment: its command line is shown in Ray's job list and logs.
    secret = [item for item in args.set if is_secret_override(item)]
    plain = [item for item in args.set if not is_secret_override(item)]
    command = run_command(args.config, args.run_id, plain, args.date, args.from_stage, args.from_run)
    job_id = submit(args.address, command, runtime_env(working_dir, not args.no_ship_package, secret),
                    args.submission_id)
    print(f"submitted job {job_id}")
    print(f"follow its logs:  ray job logs --address {args.address} --follow {job_id}")
    print(f"its status:       ray job status --address {args.address} {job_id}")
    print(job_id)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bft.config import load_config
    from bft.training.run import PLOT_FILE, RECORD_FILE, train

    from bft.redaction import learn

    cfg = load_config(args.config, args.set)
    learn(cfg)
    result = train(cfg, args.direction, args.out, add_runs=args.add_run, merge=args.merge)
    record = result.record
    losses = [h["loss"] for h in record["loss"]]
    resumed = f", resumed at step {record['resumed_from_step']}" if record["resumed_from_step"] is not None else ""
    print()
    print(f"trained a {args.direction} LoRA adapter on {record['data']['examples']} examples "
          f"({record['data']['seed']['pairs']} seed pairs + {record['data']['pairs'] - record['data']['seed']['pairs']} "
          f"run pairs; {record['data']['left_out_too_long']} left out as too long) in {record['steps_done']} steps"
          f"{resumed}, {record['wall_s']:.1f} s")
    print(f"loss: {losses[0]:.4f} at step 1 -> {losses[-1]:.4f} at step {len(losses)}"
          + (f"; {record['s_per_step']:.3f} s/step" if record["s_per_step"] else ""))
    print(f"adapter:  {result.adapter_uri}  (sha256 {record['adapter']['sha256'][:16]}...)")
    if record["merged"]:
        print(f"merged:   {record['merged']}")
    print(f"record:   {result.out_uri}/{RECORD_FILE}, {result.out_uri}/{PLOT_FILE}")
    stage = "generate" if args.direction == "backward" else "curate"
    print(f"use it:   bft run {args.config} --set {stage}.lora={result.out_uri}")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from bft.config import reference_markdown

    print(reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bft.stages import RESTARTABLE as STAGES

    parser = argparse.ArgumentParser(prog="bft", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bft {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress view: only warnings, errors and the summary")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Ray's, vLLM's and bft's logs on the console (default: in a log file whose path "
                             "is printed), with progress lines between them")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline over a corpus")
    run.add_argument("config", help="YAML config file (local path or s3:// URI)")
    run.add_argument("--run-id", help="name of this run's output folder (default: UTC time + random)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set input.uri=s3://bucket/crawl/ (repeatable)")
    run.add_argument("--from-stage", choices=STAGES,
                     help="start at this stage, reading the previous stage's output")
    run.add_argument("--from-run", help="with --from-stage: the run whose outputs to read (default: --run-id)")
    run.add_argument("--date", help="fills {date} in input/output URIs (YYYY-MM-DD, default: today in UTC)")
    run.add_argument("--force", action="store_true",
                     help="with a {date} input: start a new run even if that date was already processed "
                          "or has an unfinished run (which is otherwise resumed)")
    run.add_argument("--report", action="store_true",
                     help="write the quality report (<run>/report/report.html, report.json) at the end")
    run.add_argument("--log-file", help="where the run's logs go (default: $BFT_LOG_DIR or ~/.cache/bft/logs/"
                                        "run-<UTC time>-<pid>.log)")
    run.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                     help="how often the progress view reads the run's files (default: 5)")
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="where a run stands, from its files: rows per stage, drops, throughput, "
                                       "ETA (a running or finished run, local or s3://)")
    st.add_argument("run_uri", help="the run folder: <output.uri>/<run_id>")
    st.add_argument("--config", help="a run config to take storage.* settings from (S3 endpoint, credentials)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set storage.endpoint_url=http://127.0.0.1:9000")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.add_argument("--watch", type=float, metavar="SECONDS", help="print it again every SECONDS until the run ends")
    st.set_defaults(func=cmd_status)

    rep = sub.add_parser("report", help="write a run's quality report: report.html (self-contained) and report.json")
    rep.add_argument("run_uri", help="the run folder: <output.uri>/<run_id> (local path or s3://)")
    rep.add_argument("--out", help="folder for report.html and report.json (default: <run>/report/)")
    rep.add_argument("--config", help="a run config to take storage.* and report.* settings from")
    rep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set report.sample_size=500 (repeatable)")
    rep.add_argument("--no-embed", action="store_true", help="leave out the embedding view")
    rep.set_defaults(func=cmd_report)

    sub_ = sub.add_parser("submit", help="submit `bft run` to a Ray cluster as a job (prints the job id)")
    sub_.add_argument("config", help="YAML config: a path inside --working-dir, or an s3:// URI")
    sub_.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    sub_.add_argument("--run-id")
    sub_.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sub_.add_argument("--date")
    sub_.add_argument("--from-stage", choices=STAGES)
    sub_.add_argument("--from-run")
    sub_.add_argument("--working-dir", default=".", help="folder shipped to the cluster (default: .)")
    sub_.add_argument("--no-working-dir", action="store_true", help="ship nothing: the image has what the job needs")
    sub_.add_argument("--no-ship-package", action="store_true",
                      help="use the bft installed on the cluster instead of shipping this one")
    sub_.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    sub_.set_defaults(func=cmd_submit)

    tiny = sub.add_parser("tiny-model", help="build a small random-weight Llama model for trials and tests")
    tiny.add_argument("path", help="output folder")
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--head-dim", type=int, default=64, help=">= 32 (vLLM CPU backend)")
    tiny.add_argument("--intermediate-size", type=int, default=256)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--vocab-size", type=int, default=2048)
    tiny.add_argument("--max-position-embeddings", type=int, default=4096)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--corpus", help="extra text file to train the tokenizer on")
    tiny.set_defaults(func=cmd_tiny_model)

    tr = sub.add_parser("train", help="LoRA-tune a model on the seed pairs (seed.uri) with Ray Train")
    tr.add_argument("config", help="YAML config: seed.*, train.* and the stages' models")
    tr.add_argument("--direction", required=True, choices=["backward", "forward"],
                    help="backward: response -> instruction (generate's backtranslation model); "
                         "forward: instruction -> response (the seed model, for curate)")
    tr.add_argument("--out", required=True, help="output folder (local or s3://): adapter/, checkpoints/, "
                                                 "training_record.json, loss.png; the same --out resumes")
    tr.add_argument("--add-run", action="append", default=[], metavar="RUN_URI",
                    help="also train on a finished run's final pairs (its sft/), e.g. for a second iteration "
                         "(repeatable)")
    tr.add_argument("--merge", action="store_true", help="also write the base model with the adapter merged in")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set train.epochs=1 (repeatable)")
    tr.set_defaults(func=cmd_train)

    ref = sub.add_parser("config-reference", help="print every config field with its default (Markdown)")
    ref.set_defaults(func=cmd_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    from bft.redaction import masked_console

    args = build_parser().parse_args(argv)
    with masked_console():  # before logging is set up, so its handler writes through the mask
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    if sets := getattr(args, "set", None):  # before the config is loaded: its errors may quote them
        from bft.redaction import MASKER, is_secret_override

        MASKER.add(item.partition("=")[2] for item in sets if is_secret_override(item))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (*_user_errors(), ValueError, FileNotFoundError) as exc:
        print(f"bft: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - Ray wraps task errors; unwrap ours
        from bft.pipeline import RunFailed

        cause = _root_cause(exc)
        if cause is not exc:
            print(f"bft: error: {cause}", file=sys.stderr)
            return 2
        if isinstance(exc, RunFailed):
            print(f"bft: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
