"""Issue 18: the progress view, the quiet console with its log file, and ``bft status``,
with the real CLI, planning, storage and manifest and the executor faked (as in
test_planning.py): the fake reads the input files for real, writes stage files the way the
stages do, and can look at the run from inside, as another terminal would."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import yaml

from bft import pipeline
from bft.cli import main
from bft.readers import ColumnMapping, read_file
from bft.steps.read import stats_uri
from bft.writers.parquet import StageWriter

DOCS_PER_FILE = 4


def fake_run(pause_s: float = 0.0, look=None):
    """A run_dataset that, per input file, drops every document at filter except one that
    goes on to generate; ``look(run_uri, files_done)`` is called after each file."""

    def run_dataset(cfg, plan, storage, run_uri, templates, budgets, adapters=None):
        writer = StageWriter(storage, run_uri)
        for n, uri in enumerate(plan.input_files, start=1):
            for docs, drops, stats in read_file(storage, uri, "auto", ColumnMapping(), 100):
                writer.write("read", [], drops, time.time())
                kept = [{**docs[0], "n_chars": 1, "n_tokens": 1}]
                writer.write("filter", kept, [{**d, "reason": "too_short", "detail": "fake"} for d in docs[1:]],
                             time.time())
                writer.write("generate", [], [{**kept[0], "reason": "no_instruction", "detail": "fake",
                                                "prompt_tokens": 10, "completion_tokens": 5}], time.time())
            storage.write_bytes(stats_uri(run_uri, uri), json.dumps(
                {"source": uri, "rows_seen": stats.rows_seen, "rows_ok": stats.rows_ok,
                 "started_at": time.time(), "finished_at": time.time()}).encode())
            if look:
                look(run_uri, n)
            time.sleep(pause_s)

    return run_dataset


@pytest.fixture()
def corpus(tmp_path, minimal_config_data):
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        (tmp_path / "in" / f"{name}.jsonl").write_text("\n".join(
            json.dumps({"id": f"{name}{i}", "text": f"document {name} {i}"}) for i in range(DOCS_PER_FILE)) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**minimal_config_data, "input": {"uri": str(tmp_path / "in")},
                                      "output": {"uri": str(tmp_path / "runs")}}))
    return config


def status(run_uri: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """``bft status`` from another process, as from another terminal."""
    return subprocess.run([sys.executable, "-m", "bft.cli", "status", run_uri, *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def status_json(run_uri: str) -> tuple[int, dict]:
    proc = status(run_uri, "--json")
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_status_during_and_after_a_run(corpus, tmp_path, monkeypatch, capsys):
    seen = {}

    def look(run_uri, files_done):
        if files_done == 1:  # half the input read, the driver still holding the run
            seen["code"], seen["during"] = status_json(run_uri)
            seen["text"] = status(run_uri).stdout

    monkeypatch.setattr(pipeline, "run_dataset", fake_run(look=look))
    assert main(["run", str(corpus), "--run-id", "r1"]) == 0
    during = seen["during"]
    assert seen["code"] == 3 and during["state"] == "running" and "pid" in during["detail"]
    assert during["input_files"] == {"total": 2, "read": 1}
    # rows of one file: three dropped at filter, one at generate; the other file's by its size
    assert during["stages"]["filter"] == {"done": DOCS_PER_FILE, "out": 1, "dropped": {"too_short": 3}, "tokens": 0}
    assert during["rows_done"] == DOCS_PER_FILE and during["expected_rows"] == 2 * DOCS_PER_FILE
    assert during["fraction"] == pytest.approx(0.5) and during["eta_s"] is not None
    assert "running" in seen["text"] and "ETA:" in seen["text"] and "too_short=3" in seen["text"]

    code, after = status_json(str(tmp_path / "runs" / "r1"))
    assert code == 0 and after["state"] == "finished" and after["fraction"] == 1.0
    assert after["rows_done"] == after["expected_rows"] == 2 * DOCS_PER_FILE
    manifest = json.loads((tmp_path / "runs" / "r1" / "manifest.json").read_text())
    # the same counts as the manifest, which reads every row
    for stage, entry in manifest["stages"].items():
        if stage != "read":
            assert after["stages"][stage]["out"] == entry["out"], stage
            assert after["stages"][stage]["dropped"] == entry["dropped_by_reason"], stage
    assert after["dropped_by_reason"] == manifest["dropped_by_reason"]
    assert after["stages"]["generate"]["tokens"] == 2 * 15
    for relative in ("runs/r1", "./runs/r1/"):  # as the README writes it
        proc = status(relative, "--json", cwd=tmp_path)
        assert proc.returncode == 0 and json.loads(proc.stdout)["state"] == "finished", relative


def test_status_of_a_run_whose_driver_died_says_how_to_resume(corpus, tmp_path, monkeypatch, capsys):
    def dies(run_uri, files_done):
        raise RuntimeError("driver killed")

    monkeypatch.setattr(pipeline, "run_dataset", fake_run(look=dies))
    with pytest.raises(RuntimeError):
        main(["run", str(corpus), "--run-id", "r2"])
    code, state = status_json(str(tmp_path / "runs" / "r2"))
    assert code == 1 and state["state"] == "stopped" and "run the same command again" in state["detail"]
    assert main(["status", str(tmp_path / "runs" / "nothing")]) == 2
    assert "no run there" in capsys.readouterr().err


def test_the_progress_view_prints_lines_off_a_terminal(corpus, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "run_dataset", fake_run(pause_s=1.0))
    assert main(["run", str(corpus), "--run-id", "r3", "--progress-interval", "0.1"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 2, lines
    assert "read 1/2 files" in " ".join(lines)  # seen part-way
    assert "read 2/2 files" in lines[-1] and f"{2 * DOCS_PER_FILE}/{2 * DOCS_PER_FILE} rows done" in lines[-1]
    assert len(set(lines)) == len(lines)  # nothing repeated


def test_the_console_stays_quiet_and_the_log_file_has_the_rest(corpus, tmp_path, monkeypatch, capfd):
    noise = fake_run()

    def noisy(*args, **kwargs):
        print("a library printing to stdout")
        # a library logger with a console handler of its own, made once the run started
        # (as Ray's is: bft imports Ray inside the run), not propagating (as Ray's does not)
        lib = logging.getLogger("somelib")
        lib.addHandler(logging.StreamHandler(sys.stderr))
        lib.propagate, lib.level = False, logging.INFO
        lib.info("library chatter")
        os.write(2, b"native code writing to fd 2\n")
        sys.stderr.write("(MapWorker pid=1) 2026-01-01 00:00:00,000 ERROR worker line that is an error\n")
        lib.error("ERROR an error from the library")
        logging.getLogger("urllib3").error("an error record from a library")
        logging.getLogger("bft").info("bft's own note")
        noise(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_dataset", noisy)
    log = tmp_path / "run.log"
    assert main(["run", str(corpus), "--run-id", "r4", "--log-file", str(log)]) == 0
    out, err = capfd.readouterr()
    console = out + err
    assert f"logs: {log} (--verbose shows them here)" in console
    for quiet in ("a library printing to stdout", "library chatter", "native code writing to fd 2"):
        assert quiet not in console and quiet in log.read_text(), quiet
    for loud in ("worker line that is an error", "an error from the library", "an error record from a library",
                 "bft's own note"):
        assert loud in console and loud in log.read_text(), loud
    assert "SFT examples" in console and "counts reconcile: yes" in console  # the summary

    capfd.readouterr()
    assert main(["--verbose", "run", str(corpus), "--run-id", "r5", "--log-file", str(tmp_path / "v.log")]) == 0
    assert "a library printing to stdout" in capfd.readouterr().out
    assert not (tmp_path / "v.log").exists()


def test_gpu_seconds_split_by_tokens_and_estimated_for_pools_that_report_none(tmp_path, tiny_model):
    from bft.config import StorageConfig, load_config
    from bft.storage import Storage
    from bft.writers.cost import cost_line, engine_cost
    from bft.writers.replica_time import REPLICAS_DIR

    cfg = load_config(None, [f"model={tiny_model}", "cost.gpu_hour_usd=3.6", "rewrite.replicas=[1, 2]",
                             "rewrite.resources.gpus_per_worker=1"])
    folder = tmp_path / REPLICAS_DIR
    folder.mkdir(parents=True)
    # one shared replica of generate + curate, up 100 s on 2 GPUs; rewrite's ray.data.llm pool left no record
    (folder / "a.json").write_text(json.dumps({"stages": ["generate", "curate"], "gpus": 2,
                                               "started_at": 1000.0, "last_active": 1100.0}))
    from bft.writers.manifest import union_seconds

    # rewrite's batches: two overlapping ones, then one in a later attempt (the gap is not counted)
    rewrite_active = union_seconds([(100, 105), (103, 110), (5000, 5003)])
    assert rewrite_active == 13
    stages = {"generate": {"in": 10, "prompt_tokens": 200, "completion_tokens": 100, "wall_s": 50},
              "curate": {"in": 10, "prompt_tokens": 80, "completion_tokens": 20, "wall_s": 40},
              "rewrite": {"in": 5, "prompt_tokens": 10, "completion_tokens": 10, "wall_s": 4903,
                          "active_s": rewrite_active}}
    cost = engine_cost(cfg, Storage(StorageConfig()), str(tmp_path), stages, final_rows=40)
    # rewrite: (10 + 3) s with batches in hand x 2 replicas x 1 GPU, not its 4903 s wall span
    assert cost["replica_seconds"] == {"generate": 75.0, "curate": 25.0, "rewrite": 26.0}
    assert cost["gpu_seconds"] == {"generate": 150.0, "curate": 50.0, "rewrite": 26.0}
    assert cost["measured"] == {"generate": True, "curate": True, "rewrite": False}
    assert cost["usd"] == pytest.approx(226 / 3600 * 3.6) and cost["usd_per_1000_pairs"] == pytest.approx(5.65)
    line = cost_line(cost)
    assert "226 GPU-seconds" in line and "estimated for rewrite" in line and "$5.65 per 1,000 pairs" in line


def test_status_watch_ends_with_the_run_and_quiet_has_no_progress_view(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "run_dataset", fake_run(pause_s=0.3))
    assert main(["-q", "run", str(corpus), "--run-id", "r6", "--progress-interval", "0.1"]) == 0
    assert "progress: " not in capsys.readouterr().err
    watched = status(str(tmp_path / "runs" / "r6"), "--watch", "1")
    assert watched.returncode == 0 and watched.stdout.count("run ") == 1 and ": finished" in watched.stdout


def test_a_run_that_crashes_shows_the_end_of_its_log_and_gives_the_console_back(corpus, tmp_path, monkeypatch,
                                                                                 capfd):
    def crashes(*args, **kwargs):
        os.write(2, b"Check failed: something native broke\n")  # straight to the descriptor
        raise RuntimeError("engine core died")

    monkeypatch.setattr(pipeline, "run_dataset", crashes)
    with pytest.raises(RuntimeError):
        main(["run", str(corpus), "--run-id", "r7", "--log-file", str(tmp_path / "crash.log")])
    err = capfd.readouterr().err
    assert f"lines of {tmp_path / 'crash.log'}:" in err and "Check failed: something native broke" in err
    os.write(2, b"the console is ours again\n")
    print("and stdout too")
    out, err = capfd.readouterr()
    assert "the console is ours again" in err and "and stdout too" in out
