"""What a run does before Ray starts: scheduled dates and ``--force``, and ``--from-stage``
restarts (which stage files feed in, what is cleared, what the run records). The executor
is replaced by a small fake that drops every document at filter, so the real run_pipeline,
CLI, storage, run record and manifest run without Ray or engines."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from bft import pipeline, planning
from bft.cli import main
from bft.config import StorageConfig, load_config
from bft.readers import ColumnMapping, read_file
from bft.steps.read import stats_uri
from bft.storage import Storage
from bft.writers.parquet import StageWriter

STORAGE = Storage(StorageConfig())


def fake_run_dataset(cfg, plan, storage, run_uri, templates, budgets, adapters=None) -> None:
    """Reads each input file for real and drops every document at filter."""
    writer = StageWriter(storage, run_uri)
    for uri in plan.input_files:
        stats = None
        for docs, drops, stats in read_file(storage, uri, "auto", ColumnMapping(), 100):
            writer.write("read", [], drops, 0.0)
            writer.write("filter", [], [{**d, "reason": "too_short", "detail": "fake"} for d in docs], 0.0)
        storage.write_bytes(stats_uri(run_uri, uri), json.dumps(
            {"source": uri, "rows_seen": stats.rows_seen, "rows_ok": stats.rows_ok}).encode())


@pytest.fixture()
def dated(tmp_path, minimal_config_data, monkeypatch):
    """A config over a dated input folder, and the executor faked."""
    monkeypatch.setattr(pipeline, "run_dataset", fake_run_dataset)
    (tmp_path / "in" / "2026-11-22").mkdir(parents=True)
    (tmp_path / "in" / "2026-11-22" / "a.jsonl").write_text(
        "\n".join(json.dumps({"id": f"d{i}", "text": f"document {i}"}) for i in range(3)) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**minimal_config_data, "input": {"uri": str(tmp_path / "in" / "{date}")},
                                      "output": {"uri": str(tmp_path / "runs")}}))
    return config, tmp_path / "runs"


def bft_run(config: Path, *args: str) -> int:
    return main(["run", str(config), "--date", "2026-11-22", *args])


def marker(runs: Path, kind: str) -> str:
    return json.loads((runs / kind / "2026-11-22.json").read_text())["run_id"]


def test_a_processed_date_is_skipped_unless_forced(dated, capsys):
    config, runs = dated
    assert bft_run(config) == 0
    first = marker(runs, "_completed")
    assert bft_run(config) == 0
    assert f"already processed by run {first}" in capsys.readouterr().out
    assert [p.name for p in runs.iterdir() if not p.name.startswith("_")] == [first]
    assert bft_run(config, "--force") == 0
    forced = marker(runs, "_completed")
    assert forced != first and marker(runs, "_started") == forced
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith("_")) == sorted([first, forced])
    manifest = json.loads((runs / forced / "manifest.json").read_text())
    assert manifest["reconciled"] and manifest["stages"]["read"]["in"] == 3


def test_an_unfinished_date_is_resumed_unless_forced(dated, caplog):
    config, runs = dated
    # An attempt that died after recording its start and its config, before any output.
    cfg = load_config(str(config), ["date=2026-11-22"])
    templates = planning.load_templates(cfg)
    sha = {name: t.sha256 for name, t in templates.items()}
    planning.plan_work(cfg, STORAGE, "died", str(runs / "died"), None, None, sha)
    STORAGE.write_bytes(str(runs / "_started" / "2026-11-22.json"), json.dumps({"run_id": "died"}).encode())
    with caplog.at_level("INFO", logger="bft"):
        assert bft_run(config) == 0
    assert "run died started earlier and did not finish; resuming it" in caplog.text
    assert marker(runs, "_completed") == "died"
    (runs / "_completed" / "2026-11-22.json").unlink()
    assert bft_run(config, "--force") == 0
    assert marker(runs, "_completed") not in ("died", None) and marker(runs, "_started") != "died"


# --- --from-stage -----------------------------------------------------------------------

SRC = "/data/in.jsonl"


def doc(n: int, **extra) -> dict:
    return {"id": f"d{n}", "url": None, "source": SRC, "source_row": n, "text": f"text {n}", **extra}


@pytest.fixture()
def finished(tmp_path, minimal_config_data):
    """A finished run folder: 3 rows through every stage (row 3 dropped at curate)."""
    runs = tmp_path / "runs"
    run = str(runs / "r1")
    writer = StageWriter(STORAGE, run)
    docs = [doc(i) for i in (1, 2, 3)]
    writer.write("filter", docs, [], 0.0)
    generated = [{**d, "instruction": "q"} for d in docs]
    writer.write("generate", generated, [], 0.0)
    writer.write("curate", [{**g, "score": 5} for g in generated[:2]],
                 [{**generated[2], "reason": "below_threshold", "score": 1}], 0.0)
    writer.write("rewrite", [{**g, "score": 5, "response": "a"} for g in generated[:2]], [], 0.0)
    writer.write("sft", [{"id": d["id"], "source": SRC, "source_row": d["source_row"], "text": d["text"]}
                         for d in docs[:2]], [], 0.0)
    Path(tmp_path / "in.jsonl").write_text("")
    cfg = load_config(str(_config(tmp_path, minimal_config_data, runs)))
    sha = {name: t.sha256 for name, t in planning.load_templates(cfg).items()}
    planning.write_run_record(STORAGE, run, cfg, sha)
    return tmp_path, runs, run, sha


def _config(tmp_path: Path, data: dict, runs: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**data, "input": {"uri": str(tmp_path / "in.jsonl")},
                                    "output": {"uri": str(runs)}}))
    return path


def files(run: str, folder: str) -> list[str]:
    return sorted(p.name for p in Path(run, folder).glob("*.parquet"))


@pytest.mark.parametrize("stage, previous, cleared", [
    ("generate", "filtered", ["generated", "curated", "rewritten", "sft"]),
    ("curate", "generated", ["curated", "rewritten", "sft"]),
    ("rewrite", "curated", ["rewritten", "sft"]),
])
def test_from_stage_in_place_clears_that_stage_on_and_reads_the_one_before(finished, minimal_config_data,
                                                                           stage, previous, cleared):
    tmp_path, runs, run, sha = finished
    kept = {folder: files(run, folder) for folder in ("filtered", "generated", "curated") if folder not in cleared}
    cfg = load_config(str(_config(tmp_path, minimal_config_data, runs)), ["curate.threshold=2"])
    plan = planning.plan_work(cfg, STORAGE, "r1", run, stage, None, sha)
    assert plan.stages[0] == stage and plan.input_files == [] and plan.manifest_start == "read"
    assert [Path(f).parent.name for f in plan.entries[stage]] == [previous]
    assert plan.first_stage_input == pq.read_table(Path(run, previous)).num_rows
    assert all(files(run, folder) == [] for folder in cleared)
    assert {folder: files(run, folder) for folder in kept} == kept
    dropped = [p.name.split("-")[0] for p in Path(run, "dropped").glob("*.parquet")]
    assert ("curate" in dropped) == (stage == "rewrite")  # a stage's drops go with its outputs
    # the run is recorded with the config now in force: a later resume is checked against it
    record = json.loads(Path(run, "_run", "config.json").read_text())
    assert record["config"]["curate"]["threshold"] == 2


def test_from_stage_of_another_run_leaves_that_run_alone(finished, minimal_config_data):
    tmp_path, runs, run, sha = finished
    before = {folder: files(run, folder) for folder in ("generated", "curated", "rewritten", "sft")}
    cfg = load_config(str(_config(tmp_path, minimal_config_data, runs)))
    plan = planning.plan_work(cfg, STORAGE, "r2", str(runs / "r2"), "curate", "r1", sha)
    assert plan.manifest_start == "curate" and plan.first_stage_input == 3
    assert all(f.startswith(f"{run}/generated/") for f in plan.entries["curate"])
    assert {folder: files(run, folder) for folder in before} == before
    assert not (runs / "r2").exists()


def test_from_stage_filter_in_place_reads_the_input_again(finished, minimal_config_data):
    tmp_path, runs, run, sha = finished
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "d1", "text": "text 1"}) + "\n")
    STORAGE.write_bytes(stats_uri(run, str(tmp_path / "in.jsonl")),
                        json.dumps({"source": str(tmp_path / "in.jsonl"), "rows_seen": 1}).encode())
    cfg = load_config(str(_config(tmp_path, minimal_config_data, runs)), ["filters.min_chars=5"])
    plan = planning.plan_work(cfg, STORAGE, "r1", run, "filter", None, sha)
    assert plan.input_files == [str(tmp_path / "in.jsonl")] and plan.stages[0] == "filter"
    assert all(files(run, folder) == [] for folder in ("filtered", "generated", "curated", "rewritten", "sft"))
    with pytest.raises(ValueError, match="--from-stage filter reads the input again"):
        planning.plan_work(cfg, STORAGE, "r3", str(runs / "r3"), "filter", "r1", sha)


# --- restart safety (issue 17) ------------------------------------------------------------

def test_files_that_land_after_a_date_completed_are_read_by_its_run(dated, caplog):
    config, runs = dated
    assert bft_run(config) == 0
    run_id = marker(runs, "_completed")
    done = json.loads((runs / "_completed" / "2026-11-22.json").read_text())
    assert [Path(f).name for f in done["input_files"]] == ["a.jsonl"]
    late = config.parent / "in" / "2026-11-22" / "b.jsonl"
    late.write_text("\n".join(json.dumps({"id": f"late{i}", "text": f"late {i}"}) for i in range(2)) + "\n")
    with caplog.at_level("INFO", logger="bft"):
        assert bft_run(config) == 0
    assert f"1 input file(s) landed since run {run_id} completed it; resuming it" in caplog.text
    assert marker(runs, "_completed") == run_id  # the same run, not a second one
    done = json.loads((runs / "_completed" / "2026-11-22.json").read_text())
    assert [Path(f).name for f in done["input_files"]] == ["a.jsonl", "b.jsonl"]
    manifest = json.loads((runs / run_id / "manifest.json").read_text())
    assert manifest["reconciled"] and manifest["stages"]["read"]["in"] == 5
    assert bft_run(config) == 0  # nothing new: skipped again


def test_a_date_reading_late_files_is_not_complete_until_it_reconciles(dated, monkeypatch, capsys):
    config, runs = dated
    assert bft_run(config) == 0
    run_id = marker(runs, "_completed")
    late = config.parent / "in" / "2026-11-22" / "b.jsonl"
    late.write_text(json.dumps({"id": "late", "text": "late"}) + "\n")

    def dies(*args, **kwargs):
        assert not (runs / "_completed" / "2026-11-22.json").exists()  # consumers see no growing dataset
        raise RuntimeError("driver killed")

    monkeypatch.setattr(pipeline, "run_dataset", dies)
    with pytest.raises(RuntimeError, match="driver killed"):
        bft_run(config)
    assert not (runs / "_completed" / "2026-11-22.json").exists()  # left for the next run to finish
    monkeypatch.setattr(pipeline, "run_dataset", fake_run_dataset)
    assert bft_run(config) == 0 and marker(runs, "_completed") == run_id
    # The date's input expired (a lifecycle rule): its completed run still stands.
    for f in (config.parent / "in" / "2026-11-22").iterdir():
        f.unlink()
    capsys.readouterr()
    assert bft_run(config) == 0
    assert f"already processed by run {run_id}" in capsys.readouterr().out


def test_a_killed_in_place_restart_undoes_completion_and_refuses_a_plain_resume(dated, capsys):
    config, runs = dated
    assert bft_run(config) == 0
    run_id = marker(runs, "_completed")
    # --from-stage filter in place, killed once it had cleared the stages (nothing redone yet)
    cfg = load_config(str(config), ["date=2026-11-22"])
    sha = {name: t.sha256 for name, t in planning.load_templates(cfg).items()}
    planning.plan_work(cfg, STORAGE, run_id, str(runs / run_id), "filter", None, sha)
    assert not (runs / run_id / "manifest.json").exists()
    assert not (runs / "_completed" / "2026-11-22.json").exists()  # the date is no longer done
    # the scheduled re-run of the date (a plain resume) is refused, naming what finishes it
    assert bft_run(config) == 2
    err = capsys.readouterr().err
    assert "restart did not finish" in err and f"--run-id {run_id} --from-stage filter" in err
    # finishing the restart makes the date complete again
    assert bft_run(config, "--run-id", run_id, "--from-stage", "filter") == 0
    assert marker(runs, "_completed") == run_id and not (runs / run_id / planning.RESTART_FILE).exists()
    assert json.loads((runs / run_id / "manifest.json").read_text())["reconciled"]


def test_a_restart_that_reconciles_with_failed_batches_leaves_them_to_a_plain_resume(dated, monkeypatch, capsys):
    config, runs = dated
    assert bft_run(config) == 0
    run_id = marker(runs, "_completed")

    def every_batch_fails(cfg, plan, storage, run_uri, templates, budgets, adapters=None):
        writer = StageWriter(storage, run_uri)
        for uri in plan.input_files:
            for docs, _, _ in read_file(storage, uri, "auto", ColumnMapping(), 100):
                writer.write_failed("filter", [{**d, "reason": "batch_failed", "detail": "boom"} for d in docs], 0.0)

    monkeypatch.setattr(pipeline, "run_dataset", every_batch_fails)
    stale = runs / run_id / "_run" / "failures" / "1-1.json"  # an error of an earlier attempt
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"where": "generate", "error": "OldError: gone", "origin": "engine", "time": 1}))
    assert bft_run(config, "--run-id", run_id, "--from-stage", "filter") == 1  # more than max_failed_share lost
    manifest = json.loads((runs / run_id / "manifest.json").read_text())
    assert manifest["reconciled"] and manifest["batch_failures"]["failed"] == ["filter"]
    assert manifest["batch_failures"]["first_error"] is None  # not the earlier attempt's error
    # The restart ran to its end: its outputs are all of one configuration, so nothing is
    # left half-done and the plain resume of the date is not refused; it retries the batches.
    assert not (runs / run_id / planning.RESTART_FILE).exists()
    assert not (runs / "_completed" / "2026-11-22.json").exists()
    monkeypatch.setattr(pipeline, "run_dataset", fake_run_dataset)
    capsys.readouterr()
    assert bft_run(config) == 0
    assert "restart did not finish" not in capsys.readouterr().err
    assert marker(runs, "_completed") == run_id


def test_two_fresh_drivers_of_one_date_work_on_one_run(dated, monkeypatch, capsys):
    import time

    config, runs = dated
    # Driver A noted the date as its run and holds that run's lease, after driver B had
    # looked for an unfinished run and found none (they started at the same moment).
    (runs / "_started").mkdir(parents=True)
    (runs / "_started" / "2026-11-22.json").write_text(json.dumps({"date": "2026-11-22", "run_id": "run-a"}))
    (runs / "run-a" / "_run").mkdir(parents=True)
    (runs / "run-a" / "_run" / "lease.json").write_text(json.dumps(
        {"holder": "a", "host": "elsewhere", "pid": 1, "ttl_s": 120, "renewed_at": time.time()}))
    monkeypatch.setattr(pipeline, "unfinished_run_for_date", lambda cfg, storage: None)
    assert bft_run(config) == 2
    assert "run-a is being worked on by another driver" in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == ["_started", "run-a"]  # no second run of the date


def test_a_date_whose_input_has_not_landed_claims_nothing(dated, capsys):
    config, runs = dated
    assert main(["run", str(config), "--date", "2026-11-23"]) == 2  # no input folder for that date
    assert "no input files found" in capsys.readouterr().err
    assert not (runs / "_started" / "2026-11-23.json").exists()  # so no later run "finishes" it


def test_a_retry_after_midnight_finishes_the_date_it_started_then_runs_today(dated, caplog):
    import datetime

    config, runs = dated
    today = datetime.datetime.now(datetime.timezone.utc).date()
    yesterday = (today - datetime.timedelta(days=1)).isoformat()
    for day in (yesterday, today.isoformat()):
        (config.parent / "in" / day).mkdir(exist_ok=True)
        (config.parent / "in" / day / "a.jsonl").write_text(json.dumps({"id": f"{day}-1", "text": "x"}) + "\n")
    # yesterday's attempt died after it started
    cfg = load_config(str(config), [f"date={yesterday}"])
    sha = {name: t.sha256 for name, t in planning.load_templates(cfg).items()}
    planning.plan_work(cfg, STORAGE, "died", str(runs / "died"), None, None, sha)
    STORAGE.write_bytes(str(runs / "_started" / f"{yesterday}.json"), json.dumps({"run_id": "died"}).encode())
    with caplog.at_level("INFO", logger="bft"):
        assert main(["run", str(config)]) == 0  # no --date: today
    assert f"date {yesterday}: its run started and never completed; finishing it" in caplog.text
    assert json.loads((runs / "_completed" / f"{yesterday}.json").read_text())["run_id"] == "died"
    assert (runs / "_completed" / f"{today.isoformat()}.json").exists()
