"""Submitting to a real Ray cluster: a local head on 127.0.0.1 (own ports, temp dir and
auth token) whose Python has every dependency but not bft, as a cluster image would;
`ray job submit` as the README documents it, so the job runs only if ``py_modules``
ships this checkout's bft. The job runs over the real crawl samples in
``../shared/webdocs/`` with settings that exercise every drop path of generate, curate and
rewrite, a custom rewrite prompt and a custom system prompt, few-shot examples and seed
mixing, and writes its report.

Its finished run folder then carries the cheap checks (copies of it, no engine): rows
rejoining at sft, exit status 3 and 4, a resume refused for a changed config. Last,
`bft submit` restarts the run in place from rewrite with another setting."""

from __future__ import annotations

import hashlib
import re
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import fsspec
import pytest
import yaml

from needs import SHARED, missing

from .conftest import ROOT, _free_port, kill_session, run_bft
from .report_checks import check_page_renders, check_report_against_files
from .run_files import RunFiles, documented_columns

RAY = str(Path(sys.executable).with_name("ray"))
EXCLUDES = '{"excludes": [".venv", ".cache", "out", ".git"], "py_modules": ["src/bft"]}'
WEBDOCS = SHARED / "webdocs"
RUN_ID = "job-e2e"
# Documents up to 1,000 characters only: about 50 of the 300 reach the models, which keeps
# this run's model work (not what it tests) short.
MAX_CHARS = 1000
SYSTEM_PROMPT = "You answer from the document, and only from it."
# Two exact lengths the random model picks between with its first letter (a-m or n-z,
# about even): 32-character instructions pass generate.max_instruction_chars, 92-character
# ones do not; 21-character responses fail rewrite.min_response_chars, 81-character ones
# pass. Curate keeps scores of 3 and up.
GENERATE_REGEX = r"([a-m][a-z ]{30}|[n-z][a-z ]{90})\?"
REWRITE_REGEX = r"\[RES\]([a-m][a-z ,.]{20}|[n-z][a-z ,.]{80})\[/RES\]"
MAX_INSTRUCTION_CHARS, MIN_RESPONSE_CHARS, THRESHOLD = 50, 50, 3
FEW_SHOT = 2


def python_without_bft(folder: Path) -> Path:
    """A venv whose site-packages reach this venv's packages through a plain path entry:
    everything imports, except bft (installed here editable, through a .pth file that a
    plain path entry does not run)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    ours = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    theirs = next((folder / "lib").glob("python*/site-packages"))
    (theirs / "deps.pth").write_text(ours + "\n")
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    python = python_without_bft(tmp_path_factory.mktemp("head-venv"))
    # The job's `python` is whatever the head finds on PATH, as on a cluster image.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)
    dashboard = _free_port()
    # A short temp dir: Ray's unix socket paths must stay under ~100 characters.
    temp_dir = tempfile.mkdtemp(prefix="bftray", dir="/tmp")
    cmd = [str(python), "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
           "--runtime-env-agent-port", str(_free_port()), "--temp-dir", temp_dir, "--num-cpus", "2",
           "--include-dashboard", "true", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "wb")
    # Its own process group: the teardown stops this head only, never other Ray instances.
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # 401: up, and asking for the token
        except OSError:
            if time.time() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                raise RuntimeError(f"Ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
    yield address, env, python
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    kill_session(head.pid)  # whatever outlived the head (workers, vLLM engine processes)
    log.close()


def _job_status(address: str, job_id: str, env: dict) -> str:
    out = subprocess.run([RAY, "job", "status", "--address", address, job_id], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def _job_logs(address: str, job_id: str, env: dict) -> str:
    out = subprocess.run([RAY, "job", "logs", "--address", address, job_id], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "logging_progress" not in line]
    return "\n".join(lines[-60:])


def write_job_config(folder: Path, tiny_model: Path, out: Path) -> tuple[Path, Path]:
    """The quickstart with this test's settings, as one file (a config is the single
    place settings live; regexes survive no shell quoting this way)."""
    if not WEBDOCS.exists():
        missing(f"{WEBDOCS} not present")
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    template = folder / "rewrite-prompt.txt"
    template.write_text((ROOT / "src" / "bft" / "templates" / "rewrite.txt").read_text()
                        + "\nKeep the answer short.\n")
    data.update(model=str(tiny_model), input={"uri": str(WEBDOCS)}, output={"uri": str(out), "system_prompt": SYSTEM_PROMPT})
    data["filters"]["max_chars"] = MAX_CHARS
    # Long pages dropped, not cut: at this max_chars, segments would multiply the LLM work
    # (segmentation runs in the S3 runs and the WARC run).
    data["filters"]["long_documents"] = "drop"
    data["curate"]["threshold"] = THRESHOLD
    data["generate"].update(structured_output_regex=GENERATE_REGEX, max_instruction_chars=MAX_INSTRUCTION_CHARS)
    data["generate"]["sampling"]["max_tokens"] = 128
    # Two seed pairs shown before each document, and the seed pairs in the final dataset.
    data["generate"]["few_shot"] = {"k": FEW_SHOT}
    data["output"]["seed_mix"] = True
    data["seed"] = {"uri": str(ROOT / "examples" / "seed.jsonl")}  # as the later local runs resolve it
    data["rewrite"].update(structured_output_regex=REWRITE_REGEX, min_response_chars=MIN_RESPONSE_CHARS,
                           prompt_template=str(template))
    # vLLM's async engine, its core in a process of its own (vLLM's default, what GPUs
    # run); the other e2e runs keep the quickstart's in-process engine.
    for stage in ("generate", "curate", "rewrite"):
        data[stage]["env_vars"] = {**data[stage]["env_vars"], "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    config = folder / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    return config, template


@pytest.fixture(scope="module")
def job(ray_head, tiny_model, tmp_path_factory):
    """The README's `ray job submit` command (its address, working dir and runtime env),
    running `bft run` with this test's config."""
    address, env, head_python = ray_head
    out = tmp_path_factory.mktemp("job-out")
    config, template = write_job_config(tmp_path_factory.mktemp("job-config"), tiny_model, out)
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json", EXCLUDES,
           "--", "python", "-m", "bft.cli", "run", str(config), "--run-id", RUN_ID, "--report"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    job_id = next(word.strip("'") for line in (proc.stdout + proc.stderr).splitlines()
                  for word in line.split() if word.strip("'").startswith("raysubmit_"))
    assert proc.returncode == 0, _job_logs(address, job_id, env)
    files = RunFiles(fsspec.filesystem("file"), str(out / RUN_ID))
    return {"address": address, "env": env, "head_python": head_python, "out": out, "config": config,
            "template": template, "proc": proc, "job_id": job_id, "files": files}


def test_the_head_cannot_import_bft_so_the_job_used_the_shipped_module(job):
    probe = subprocess.run([str(job["head_python"]), "-c", "import bft"], env=job["env"], capture_output=True,
                           text=True)
    assert probe.returncode != 0 and "No module named 'bft'" in probe.stderr
    assert "succeeded" in _job_status(job["address"], job["job_id"], job["env"]).lower()


def test_job_output_is_complete_and_has_the_documented_columns(job):
    files = job["files"]
    files.check_complete()
    files.check_nothing_lost()
    files.check_dedup()
    files.check_columns(documented_columns(), null_columns=("segment",))  # long pages dropped here, not cut


def test_one_shared_engine_served_every_pass_from_its_prefix_cache(job):
    """The default layout on one model: one pool for all three passes, and a document's
    later passes found its prefix in vLLM's prefix cache. With few-shot examples, generate's
    prompt puts them before the document, so curate shares no more than the system message
    with it (less than one of vLLM's cache blocks here), and rewrite finds curate's prefix
    (system message + document) cached."""
    files = job["files"]
    assert files.manifest["engines"] == [{"stages": ["generate", "curate", "rewrite"], "kind": "shared"}]
    # this run's engine was vLLM's async one, its core in a process of its own
    console = job["proc"].stdout + job["proc"].stderr
    # the job's console is quiet: Ray's and the engines' logs are in the file it names
    log_file = re.search(r"^logs: (\S+) \(--verbose shows them here\)", console, re.M)
    assert log_file, console[-2000:]
    logs = Path(log_file.group(1)).read_text()
    assert "(EngineCore pid=" in logs and "shared engine up" in logs
    assert "(EngineCore pid=" not in console and "progress: " in console
    for stage in ("curate", "rewrite"):
        assert all(r[f"{stage}_cached_tokens"] <= r[f"{stage}_prompt_tokens"] for r in files.kept[stage])
    rows = files.kept["rewrite"]
    cached, prompt = sum(r["rewrite_cached_tokens"] for r in rows), sum(r["rewrite_prompt_tokens"] for r in rows)
    assert cached > 0.3 * prompt, (cached, prompt)


def test_few_shot_examples_are_recorded_on_every_generated_row(job):
    files = job["files"]
    seed_ids = {f"seed-{n}" for n in range(1, 49)}
    rows = files.kept["generate"] + [r for r in files.dropped if r["stage"] == "generate"]
    assert rows and all(len(set(r["few_shot_ids"])) == FEW_SHOT and set(r["few_shot_ids"]) <= seed_ids for r in rows)
    assert len({tuple(r["few_shot_ids"]) for r in rows}) > len(rows) // 2  # drawn per document
    assert files.manifest["seed"]["pairs"] == 48 and files.manifest["seed"]["unusable"] == 0


def test_seed_pairs_join_the_final_dataset_counted_apart(job):
    files = job["files"]
    manifest = files.manifest
    assert len(files.seed_rows) == manifest["seed_rows"] == 48
    assert manifest["dataset_rows"] == manifest["final_rows"] + 48 == len(files.kept["sft"]) + 48
    assert manifest["reconciled"] and manifest["invariant"]["holds"]
    assert {r["origin"] for r in files.seed_rows} == {"seed"} and {r["origin"] for r in files.kept["sft"]} == {"web"}
    seed_prompt = manifest["config"]["output"]["seed_system_prompt"]
    assert all(r["messages"][0] == {"role": "system", "content": seed_prompt} for r in files.seed_rows)
    assert seed_prompt != SYSTEM_PROMPT
    assert "(+ 48 seed pairs)" in job["proc"].stdout + job["proc"].stderr


def test_webdocs_dolma_and_fineweb(job):
    files = job["files"]
    stages = files.manifest["stages"]
    assert files.manifest["input_files"] == 2
    assert stages["read"]["in"] == stages["read"]["out"] == 600  # 300 docs, in both layouts
    # The two files hold the same documents: every document that survives the text
    # filters in one file is a duplicate of its copy in the other.
    assert stages["filter"]["dropped_by_reason"]["duplicate"] == stages["filter"]["out"]
    assert all(r["url"].startswith("http") for r in files.kept["filter"])
    assert all(600 <= r["n_chars"] == len(r["text"]) <= MAX_CHARS for r in files.kept["filter"])


def test_every_llm_stage_drops_with_its_reason_and_keeps_the_rest(job):
    files = job["files"]
    by_stage = {stage: [r for r in files.dropped if r["stage"] == stage] for stage in ("generate", "curate", "rewrite")}
    generate, curate, rewrite = by_stage.values()
    assert generate and {r["reason"] for r in generate} == {"instruction_too_long"}
    assert all(f"generate.max_instruction_chars {MAX_INSTRUCTION_CHARS}" in r["detail"]
               and len(r["raw_output"].strip()) > MAX_INSTRUCTION_CHARS for r in generate)
    assert all(len(r["instruction"]) <= MAX_INSTRUCTION_CHARS for r in files.kept["generate"]) and files.kept["generate"]
    assert curate and {r["reason"] for r in curate} == {"below_threshold"}
    assert all(r["score"] < THRESHOLD and r["instruction"] and f"Score: {r['score']}" in r["raw_output"]
               for r in curate)
    assert all(r["score"] >= THRESHOLD for r in files.kept["curate"]) and files.kept["curate"]
    assert rewrite and {r["reason"] for r in rewrite} == {"response_too_short"}
    assert all(f"rewrite.min_response_chars {MIN_RESPONSE_CHARS}" in r["detail"] for r in rewrite)
    assert all(len(r["response"]) >= MIN_RESPONSE_CHARS for r in files.kept["rewrite"]) and files.kept["rewrite"]
    for r in generate + curate + rewrite:
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 and r["raw_output"]


def test_final_pairs_carry_the_system_prompt_and_each_template_hash(job):
    files = job["files"]
    builtin = ROOT / "src" / "bft" / "templates"
    expected = {"generate": hashlib.sha256((builtin / "generate.txt").read_bytes()).hexdigest(),
                "curate": hashlib.sha256((builtin / "curate.txt").read_bytes()).hexdigest(),
                "rewrite": hashlib.sha256(job["template"].read_bytes()).hexdigest()}
    assert files.manifest["prompt_sha256"] == expected
    for row in files.kept["sft"]:
        assert row["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert [m["role"] for m in row["messages"][1:]] == ["user", "assistant"]
        assert {name: row[f"{name}_prompt_sha256"] for name in expected} == expected


def test_webdocs_report_matches_the_files_and_renders(job, tmp_path):
    run = job["out"] / RUN_ID
    report = json.loads((run / "report" / "report.json").read_text())
    check_report_against_files(report, fsspec.filesystem("file"), str(run))
    assert report["documents_in"] == 600 and report["dropped"]["duplicate"] >= 1
    check_page_renders(run / "report" / "report.html", report, tmp_path / "webdocs-report.png")


def test_report_command_on_a_finished_run(job, tmp_path):
    run = job["out"] / RUN_ID
    first = json.loads((run / "report" / "report.json").read_text())
    again = run_bft("report", str(run), "--out", str(tmp_path / "again"), "--no-embed",
                    "--set", "report.sample_size=20", "--set", "report.examples=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"report:   {tmp_path / 'again' / 'report.html'}" in again.stdout
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert report["funnel"] == first["funnel"] and report["scores"] == first["scores"]
    assert report["sample"] == {"size": min(20, first["funnel"]["rewrite"]), "of": first["funnel"]["rewrite"],
                                "seed": 0}
    assert len(report["examples"]) == min(4, first["funnel"]["rewrite"]) and report["embeddings"]["enabled"] is False
    assert "Off: turned off" in (tmp_path / "again" / "report.html").read_text()


# --- copies of the finished run: what a re-run does with a run folder (no engine starts) ----

@pytest.fixture()
def copy_of_run(job):
    """A copy of the finished run under another run id, in the same output folder."""
    made = []

    def make(name: str) -> Path:
        target = job["out"] / name
        shutil.copytree(job["out"] / RUN_ID, target)
        made.append(target)
        return target

    yield make
    for target in made:
        shutil.rmtree(target, ignore_errors=True)


def rerun(job, run: Path, *extra: str):
    return run_bft("run", str(job["config"]), "--run-id", run.name, *extra)


def test_rows_of_a_lost_sft_file_rejoin_at_sft(job, copy_of_run):
    run = copy_of_run("lost-sft-file")
    fs = fsspec.filesystem("file")
    before = RunFiles(fs, str(run))
    sorted((run / "sft").glob("*.parquet"))[0].unlink()
    after_loss = RunFiles(fs, str(run))
    lost_rows = len(before.kept["sft"]) - len(after_loss.kept["sft"])
    assert lost_rows > 0
    result = rerun(job, run)
    assert result.returncode == 0, result.stderr[-3000:]
    final = RunFiles(fs, str(run))
    inputs = [str(WEBDOCS / name) for name in ("sample.dolma.jsonl.gz", "sample.fineweb.parquet")]
    assert final.manifest["resume"] == after_loss.expected_resume(inputs)
    assert final.manifest["resume"]["rows_entering_at"] == {"generate": 0, "curate": 0, "rewrite": 0,
                                                            "sft": lost_rows}
    final.check_complete()
    final.check_nothing_lost()
    assert sorted(r["id"] for r in final.kept["sft"]) == sorted(r["id"] for r in before.kept["sft"])


def test_counts_that_do_not_reconcile_exit_with_status_3(job, copy_of_run):
    run = copy_of_run("doubled-sft-file")
    part = sorted((run / "sft").glob("*.parquet"))[0]
    shutil.copy(part, part.with_name("part-copied-by-hand.parquet"))
    result = rerun(job, run)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert "counts reconcile: NO: sft:" in result.stdout
    assert json.loads((run / "manifest.json").read_text())["reconciled"] is False
    assert "Started a local Ray instance" not in result.stderr  # nothing to run: no Ray


def test_a_report_that_fails_after_a_good_run_exits_with_status_4(job, copy_of_run):
    run = copy_of_run("report-fails")
    result = rerun(job, run, "--report", "--set", "report.out_uri=/dev/null/report")
    assert result.returncode == 4, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"the report of {run} failed" in result.stderr and f"bft report {run}" in result.stderr
    assert "counts reconcile: yes" in result.stdout
    assert json.loads((run / "manifest.json").read_text())["reconciled"] is True


def test_resuming_with_a_changed_config_is_refused_naming_the_field(job):
    run = job["out"] / RUN_ID
    before = sorted(p.name for p in run.rglob("*"))
    result = rerun(job, run, "--set", "curate.threshold=2")
    assert result.returncode == 2
    assert f"cannot resume {run}" in result.stderr and f"curate.threshold: {THRESHOLD} -> 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run.rglob("*")) == before


# --- last: restart the run in place (changes it) ------------------------------------------

def test_bft_submit_restarts_in_place_from_rewrite(job):
    """`bft submit` of a restart: rewrite again with another minimum length, in place."""
    address, env, out = job["address"], job["env"], job["out"]
    run = out / RUN_ID
    earlier = {folder: sorted(p.name for p in (run / folder).glob("*.parquet"))
               for folder in ("filtered", "generated", "curated")}
    # a secret given on the command line (issue 17): it must reach the run, not the job's entrypoint
    planted = "planted-session-token-0d4e91"
    cmd = [sys.executable, "-m", "bft.cli", "submit", str(job["config"]), "--address", address,
           "--run-id", RUN_ID, "--from-stage", "rewrite", "--set", "rewrite.min_response_chars=10",
           "--set", f"storage.session_token={planted}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    job_id = lines[-1]
    assert lines[0] == f"submitted job {job_id}"
    assert f"ray job logs --address {address} --follow {job_id}" in proc.stdout
    deadline = time.time() + 900
    while "succeeded" not in (status := _job_status(address, job_id, env).lower()):
        assert "failed" not in status and "stopped" not in status, _job_logs(address, job_id, env)
        assert time.time() < deadline, "job did not finish in time"
        time.sleep(5)
    entrypoint = subprocess.run(
        [sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
         "print(C(sys.argv[1]).get_job_info(sys.argv[2]).entrypoint)", address, job_id],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "run" in entrypoint.stdout and planted not in entrypoint.stdout, entrypoint.stderr[-2000:]
    assert planted not in _job_logs(address, job_id, env) + proc.stdout + proc.stderr
    assert json.loads((run / "_run" / "config.json").read_text())["config"]["storage"]["session_token"] == "**********"
    files = RunFiles(fsspec.filesystem("file"), str(run))
    # in place: one manifest over every stage, earlier stages' files untouched
    assert list(files.manifest["stages"]) == ["read", "filter", "generate", "curate", "rewrite", "sft"]
    assert files.manifest["from_stage"] == "rewrite" and files.manifest["from_run"] is None
    assert {folder: sorted(p.name for p in (run / folder).glob("*.parquet")) for folder in earlier} == earlier
    files.check_complete()
    files.check_nothing_lost()
    # rewrite was redone with the new minimum: no drop of the old one is left
    assert not [r for r in files.dropped if r["stage"] == "rewrite" and "min_response_chars 50" in r["detail"]]
    assert len(files.kept["rewrite"]) > len(job["files"].kept["rewrite"])
    # the run is now recorded with the config in force: a plain re-run finds nothing to do
    assert json.loads((run / "_run" / "config.json").read_text())["config"]["rewrite"]["min_response_chars"] == 10
    again = run_bft("run", str(job["config"]), "--run-id", RUN_ID, "--set", "rewrite.min_response_chars=10")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing left to do" in again.stderr


def test_documented_command_matches_test():
    readme = (ROOT / "README.md").read_text()
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir ." in readme
    assert shlex.quote(EXCLUDES) in readme
