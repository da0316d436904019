"""Submitting to a real Ray cluster: a local head on 127.0.0.1 (own ports, temp dir and
auth token), `ray job submit` exactly as the README documents it, then `bft submit`."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT, engine_settings, kill_session

RAY = str(Path(sys.executable).with_name("ray"))
EXCLUDES = '{"excludes": [".venv", ".cache", "out", ".git"], "py_modules": ["src/bft"]}'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    # The job's `python` is whatever the head finds on PATH, as on a cluster image.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    # A short temp dir: Ray's unix socket paths must stay under ~100 characters.
    temp_dir = tempfile.mkdtemp(prefix="bftray", dir="/tmp")
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
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
    yield address, env
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


@pytest.fixture(scope="module")
def submitted_run(ray_head, tiny_model, tmp_path_factory):
    """The README's `ray job submit` command, run as written (plus test paths)."""
    address, env = ray_head
    out = tmp_path_factory.mktemp("job-out")
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json", EXCLUDES,
           "--", "python", "-m", "bft.cli", "run", "examples/quickstart.yaml", "--run-id", "job-e2e",
           "--set", f"output.uri={out}", *engine_settings(tiny_model)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return address, env, out, proc


def _job_logs(address: str, job_id: str, env: dict) -> str:
    out = subprocess.run([RAY, "job", "logs", "--address", address, job_id], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "logging_progress" not in line]
    return "\n".join(lines[-60:])


def test_ray_job_submit_quickstart_succeeds(submitted_run):
    address, env, out, proc = submitted_run
    job_id = next(word.strip("'") for line in (proc.stdout + proc.stderr).splitlines()
                  for word in line.split() if word.strip("'").startswith("raysubmit_"))
    assert proc.returncode == 0, _job_logs(address, job_id, env)
    assert "succeeded" in _job_status(address, job_id, env).lower()
    manifest = json.loads((out / "job-e2e" / "manifest.json").read_text())
    assert manifest["reconciled"] is True and manifest["final_rows"] > 0
    assert (out / "job-e2e" / "sft").is_dir()


def test_bft_submit_restarts_from_curate_reusing_generated_output(submitted_run, tiny_model):
    """`bft submit` of a restart: curate again, with another threshold, from the first
    job's generated/ (one job tests both: each costs about two minutes of the suite)."""
    address, env, out, first = submitted_run
    assert first.returncode == 0
    cmd = [sys.executable, "-m", "bft.cli", "submit", "examples/quickstart.yaml", "--address", address,
           "--run-id", "job-e2e-recurate", "--from-stage", "curate", "--from-run", "job-e2e",
           "--set", f"output.uri={out}", "--set", "curate.threshold=1", *engine_settings(tiny_model)]
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
    manifest = json.loads((out / "job-e2e-recurate" / "manifest.json").read_text())
    first_manifest = json.loads((out / "job-e2e" / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["curate", "rewrite", "sft"] and manifest["reconciled"] is True
    assert manifest["from_run"] == "job-e2e"
    assert manifest["stages"]["curate"]["in"] == first_manifest["stages"]["generate"]["out"]
    # threshold 1 keeps every parseable score: nothing is dropped below threshold
    assert "below_threshold" not in manifest["stages"]["curate"]["dropped_by_reason"]
    assert not (out / "job-e2e-recurate" / "filtered").exists()


def test_bft_submit_rejects_bad_config_locally(ray_head, tmp_path):
    address, env = ray_head
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: /m\ncurate: {threshold: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "bft.cli", "submit", str(bad), "--address", address],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "curate.threshold" in proc.stderr
    assert "submitted job" not in proc.stdout


def test_documented_command_matches_test():
    readme = (ROOT / "README.md").read_text()
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir ." in readme
    assert shlex.quote(EXCLUDES) in readme
