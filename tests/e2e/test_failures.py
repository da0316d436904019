"""Faults, for real: hostile input, a driver killed with SIGKILL and resumed, an engine
actor killed mid-run, and an S3 endpoint that throttles, errors and drops connections
(the last two during the resumed run).

Every run reads the same input from the S3 server (the quickstart documents plus a
generated corpus of hostile files) with ``curate.threshold=1``, so which documents reach
the final dataset does not depend on the random model's scores: a run that lost or
duplicated work cannot match the uninterrupted baseline.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from hostile import write_hostile_corpus

from .conftest import ROOT, S3_KEY_ID, S3_SECRET, children_of, engine_settings, is_running, kill_session, run_bft
from .s3_fault_proxy import S3FaultProxy

BUCKET = "bft-faults"
RUNS = f"s3://{BUCKET}/runs"
DATE = "2026-11-23"


@pytest.fixture(scope="module")
def corpus(s3_server, tmp_path_factory):
    fs = s3_server.fs()
    fs.mkdir(BUCKET)
    hostile = write_hostile_corpus(tmp_path_factory.mktemp("hostile"))
    for folder in ("input", f"dated/input/{DATE}"):  # the same files, for a scheduled-style run
        for path in hostile.files:
            fs.put(str(path), f"{BUCKET}/{folder}/{path.name}")
        fs.put(str(ROOT / "examples" / "docs.jsonl"), f"{BUCKET}/{folder}/quickstart.jsonl")
    return fs, hostile


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """The quickstart with the S3 credentials in the config itself (so redaction of
    config secrets is exercised, not only of the environment)."""
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["storage"] = {"access_key_id": S3_KEY_ID, "secret_access_key": S3_SECRET, "region": "us-west-2"}
    data["input"] = {"uri": f"s3://{BUCKET}/input/"}
    data["output"] = {"uri": RUNS}
    data["curate"]["threshold"] = 1
    path = tmp_path_factory.mktemp("config") / "faults.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def bft_command(config_file: Path, run_id: str | None, tiny_model: Path, *extra: str) -> list[str]:
    return ["run", str(config_file), *(["--run-id", run_id] if run_id else []), *engine_settings(tiny_model),
            *extra]


def s3_env(s3_server, endpoint: str | None = None) -> dict[str, str]:
    # Credentials come from the config file; the environment only points at the server.
    env = {k: v for k, v in s3_server.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint
    return env


class Outcome:
    """What a run left on S3, keyed by where each row came from."""

    def __init__(self, fs, run_id: str, runs: str = f"{BUCKET}/runs"):
        base = f"{runs}/{run_id}"
        fs.invalidate_cache()  # the run wrote after this process last listed
        self.manifest = json.loads(fs.cat(f"{base}/manifest.json"))
        self.final = self._rows(fs, f"{base}/sft")
        self.dropped = self._rows(fs, f"{base}/dropped")
        self.files = fs.find(base)

    @staticmethod
    def _rows(fs, folder: str) -> list[dict]:
        rows = []
        for path in fs.find(folder):
            if path.endswith(".parquet"):
                with fs.open(path, "rb") as fh:
                    rows += pq.read_table(fh).to_pylist()
        return rows

    @staticmethod
    def key(row: dict) -> tuple[str, int]:
        return row["source"].rsplit("/", 1)[-1], row["source_row"]

    @property
    def final_keys(self) -> list[tuple[str, int]]:
        return [self.key(r) for r in self.final]

    @property
    def drop_records(self) -> list[tuple]:
        return [(*self.key(r), r["stage"], r["reason"]) for r in self.dropped]

    def check_complete(self) -> None:
        """Every input row ends exactly once, in the final dataset or in dropped/."""
        keys = self.final_keys + [self.key(r) for r in self.dropped]
        assert len(keys) == len(set(keys)), [k for k, n in Counter(keys).items() if n > 1][:5]
        m = self.manifest
        assert m["reconciled"] is True, m["reconciliation_problems"]
        assert m["invariant"]["holds"] and m["invariant"]["input_rows"] == len(keys)
        for stage, entry in m["stages"].items():
            assert entry["in"] == entry["out"] + entry["dropped"], stage

    def same_result_as(self, other: Outcome) -> None:
        assert sorted(r["id"] for r in self.final) == sorted(r["id"] for r in other.final)
        assert sorted(self.final_keys) == sorted(other.final_keys)
        assert sorted(self.drop_records) == sorted(other.drop_records)


@pytest.fixture(scope="module")
def baseline(corpus, config_file, s3_server, tiny_model):
    """The uninterrupted run; its Ray logs go to a temp dir of its own to be searched."""
    fs, hostile = corpus
    ray_tmp = tempfile.mkdtemp(prefix="bftray")  # short: Ray's socket paths have a length limit
    started = time.time()
    result = run_bft(*bft_command(config_file, "baseline", tiny_model),
                     env={**s3_env(s3_server), "RAY_TMPDIR": ray_tmp})
    wall = time.time() - started
    assert result.returncode == 0, result.stderr[-5000:]
    outcome = Outcome(fs, "baseline")
    outcome.check_complete()
    return outcome, result, wall, Path(ray_tmp)


def test_hostile_input_every_bad_row_dropped_with_its_reason(corpus, baseline):
    _, hostile = corpus
    outcome = baseline[0]
    read_drops: dict[str, Counter] = {}
    for name, _, stage, reason in outcome.drop_records:
        if stage == "read":
            read_drops.setdefault(name, Counter())[reason] += 1
    for path in hostile.files:
        got = read_drops.get(path.name, Counter())
        if path.name in hostile.all_dropped_as:
            assert set(got) <= hostile.all_dropped_as[path.name]
            assert sum(got.values()) == hostile.read_drops[path.name]["*"], path.name
        else:
            assert got == hostile.read_drops[path.name], path.name
    # the 10 MB document was read whole and dropped by the length filter, text kept
    huge = [r for r in outcome.dropped if r["id"] == hostile.huge_id]
    assert [(r["stage"], r["reason"]) for r in huge] == [("filter", "too_long")]
    assert len(huge[0]["text"]) > 10_000_000
    # every good document got past the reader
    past_read = {r["id"] for r in outcome.final} | {r["id"] for r in outcome.dropped if r["stage"] != "read"}
    assert hostile.good_ids <= past_read
    unreadable = [r for r in outcome.dropped if r["reason"] in ("unreadable_file", "wrong_schema")]
    assert all(r["source"].startswith(f"s3://{BUCKET}/input/") and r["source"] in r["detail"] for r in unreadable)
    assert outcome.manifest["input_files"] == len(hostile.files) + 1


def test_secret_in_config_never_reaches_outputs_or_logs(corpus, baseline):
    fs, _ = corpus
    outcome, result, _, ray_tmp = baseline
    assert S3_SECRET not in result.stdout + result.stderr
    for path in outcome.files:
        assert S3_SECRET.encode() not in fs.cat(path), path
    assert outcome.manifest["config"]["storage"]["secret_access_key"] == "**********"
    logs = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_socket()]
    assert any(p.suffix in (".log", ".out", ".err") for p in logs), "no Ray logs found to search"
    for path in logs:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        assert S3_SECRET.encode() not in data, path


def _listing(fs, folder: str) -> list[str]:
    fs.invalidate_cache()
    return fs.find(folder) if fs.exists(folder) else []


# vLLM logs its throughput about once a second while it has requests; the Ray prefix
# names the actor process.
BUSY_ENGINE = re.compile(r"pid=(\d+)\).*Engine 000: Avg prompt throughput.*(Running: [1-9]|Waiting: [1-9])")


@pytest.fixture(scope="module")
def killed_and_resumed(corpus, baseline, config_file, s3_server, tiny_model, tmp_path_factory):
    """A scheduled-style run (``{date}`` in its URIs, no --run-id) is SIGKILLed at a random
    point; the same command again resumes it, through a faulty S3 endpoint, and one of its
    busy engine actors is killed. (One resumed run carries all three faults: each full
    run costs about two minutes of the suite; each fault has its own checks below.)"""
    fs, _ = corpus
    _, _, baseline_wall, _ = baseline
    runs = f"{BUCKET}/dated/runs/{DATE}"
    # One sequence at a time keeps the generate engine busy long enough to be caught working.
    command = bft_command(config_file, None, tiny_model, "--date", DATE,
                         "--set", f"input.uri=s3://{BUCKET}/dated/input/{{date}}/",
                         "--set", f"output.uri=s3://{BUCKET}/dated/runs/{{date}}",
                         "--set", "generate.engine_kwargs.max_num_seqs=1")
    env = {**os.environ, **s3_env(s3_server)}
    env.pop("RAY_ADDRESS", None)

    seed = int(time.time())
    delay = random.Random(seed).uniform(0.25, 0.75) * baseline_wall
    proc = subprocess.Popen([sys.executable, "-m", "bft.cli", *command], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # A random point, but no later than the first generated batch: a warm run can be
    # faster than the baseline, and the resumed run must still have engine work (its
    # busy engine is killed below).
    started = time.time()
    while time.time() - started < delay and not any(
            "/generated/" in path and path.endswith(".parquet") for path in _listing(fs, runs)):
        time.sleep(1)
    delay = time.time() - started
    assert proc.poll() is None, f"the run ended before the kill at {delay:.1f} s (seed {seed})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_session(proc.pid)  # what the driver started (its local Ray) goes with it, as a lost head node would
    fs.invalidate_cache()
    run_id = json.loads(fs.cat(f"{runs}/_started/{DATE}.json"))["run_id"]
    left = Counter(p.split("/")[5] for p in _listing(fs, f"{runs}/{run_id}") if p.endswith(".parquet"))
    assert not fs.exists(f"{runs}/{run_id}/manifest.json") and not fs.exists(f"{runs}/_completed/{DATE}.json")
    driver_kill = {"seed": seed, "delay": delay, "run_id": run_id, "left": dict(left)}

    killed: list[int] = []
    engine_children: list[int] = []  # vLLM's engine-core process(es) of the killed replica
    lines: list[str] = []
    with S3FaultProxy(s3_server.endpoint, fault_rate=0.1, seed=11) as proxy:
        env["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
        # vLLM logs to stdout, which Ray forwards to the driver's stdout: watch both.
        proc = subprocess.Popen([sys.executable, "-m", "bft.cli", *command], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)

        def watch() -> None:
            for line in proc.stdout:
                lines.append(line)
                match = BUSY_ENGINE.search(line)
                if match and not killed:
                    pid = int(match.group(1))
                    engine_children.extend(children_of(pid))
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        proc.wait(timeout=900)
        watcher.join(timeout=10)
        orphans = [pid for pid in engine_children if is_running(pid)]
        kill_session(proc.pid)  # nothing of this run may outlive it
        counts = dict(proxy.counts)
    output = "".join(lines)
    (tmp_path_factory.getbasetemp() / "resumed-run.log").write_text(output)
    assert proc.returncode == 0, output[-5000:]
    engine_kill = {"killed": killed, "children": engine_children, "orphans": orphans}
    return Outcome(fs, run_id, runs), driver_kill, engine_kill, counts, output


def test_driver_killed_at_random_point_then_resumed(killed_and_resumed, baseline, corpus, capsys):
    fs, _ = corpus
    outcome, kill, _, _, output = killed_and_resumed
    runs = f"{BUCKET}/dated/runs/{DATE}"
    assert f"run {kill['run_id']} started earlier and did not finish; resuming it" in output
    outcome.check_complete()
    outcome.same_result_as(baseline[0])
    assert json.loads(fs.cat(f"{runs}/_completed/{DATE}.json"))["run_id"] == kill["run_id"]
    # one run for the date: the retry did not start a second one
    assert sorted(fs.ls(runs, refresh=True)) == sorted(
        f"{runs}/{name}" for name in ("_completed", "_started", kill["run_id"]))
    resume = outcome.manifest["resume"]
    assert resume is not None
    with capsys.disabled():
        print(f"\n[driver kill] seed {kill['seed']}: SIGKILL after {kill['delay']:.1f} s; files left per folder "
              f"{kill['left']}; resume found finished {resume['finished_before']}, read "
              f"{resume['input_files_read_again']} input file(s) again ({outcome.manifest['rows_read_again']} rows "
              f"already done), rows joining at {resume['rows_entering_at']}")


def test_engine_actor_killed_mid_run_is_replaced(killed_and_resumed, baseline, capsys):
    outcome, _, engine_kill, _, output = killed_and_resumed
    killed = engine_kill["killed"]
    assert killed, "no engine was seen working, so none was killed"
    # its vLLM engine-core process did not outlive it (it would hold a GPU's memory)
    assert engine_kill["children"] and not engine_kill["orphans"]
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    # Ray saw the actor die with work in hand (then restarted it and retried the batch)
    assert "A worker died or was killed while executing a task" in output
    outcome.check_complete()
    outcome.same_result_as(baseline[0])
    assert "engine_error" not in outcome.manifest["dropped_by_reason"]
    with capsys.disabled():
        print(f"\n[engine kill] killed busy engine actor pid {killed[0]}; run completed, "
              f"{outcome.manifest['final_rows']} final rows as in the baseline")


def test_s3_faults_are_retried_with_identical_output(killed_and_resumed, baseline, capsys):
    outcome, _, _, counts, _ = killed_and_resumed
    faults = counts.get("throttle", 0) + counts.get("server_error", 0) + counts.get("drop", 0)
    assert faults >= 10, counts
    outcome.check_complete()
    outcome.same_result_as(baseline[0])
    with capsys.disabled():
        print(f"\n[s3 faults] {counts}")


@pytest.mark.parametrize("setting, locked, message", [
    ("input.uri=s3://{bucket}/locked-input/", "/{bucket}/locked-input",
     "s3://{bucket}/locked-input/: cannot list it: access denied"),
    ("output.uri=s3://{bucket}/locked-runs", "/{bucket}/locked-runs",
     "s3://{bucket}/locked-runs: cannot write there: access denied"),
])
def test_access_denied_fails_fast_naming_uri_and_cause(corpus, config_file, s3_server, tiny_model,
                                                      setting, locked, message):
    """Permanent errors are not retried into a hang: the run stops before Ray starts."""
    fs, _ = corpus
    fs.pipe(f"{BUCKET}/locked-input/a.jsonl", b'{"text": "x"}\n')
    with S3FaultProxy(s3_server.endpoint, fault_rate=0, deny=locked.format(bucket=BUCKET)) as proxy:
        result = run_bft(*bft_command(config_file, "denied", tiny_model, "--set", setting.format(bucket=BUCKET)),
                         env=s3_env(s3_server, proxy.endpoint))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message.format(bucket=BUCKET) in result.stderr
    assert "Traceback" not in result.stderr and "Started a local Ray instance" not in result.stderr
    assert S3_SECRET not in result.stderr + result.stdout
