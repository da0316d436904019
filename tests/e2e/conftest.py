"""End-to-end fixtures: a real S3 server (moto in server mode on 127.0.0.1) and a helper
that runs the real ``bft`` command in a subprocess (its own Ray instance and engines)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Credentials for the local moto server. The secret is distinctive so tests can check
# that it never reaches a log, manifest or output file.
S3_KEY_ID = "AKIABFTTESTKEY000001"
S3_SECRET = "bft-planted-secret-9f3c2e7a"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=S3_KEY_ID, secret=S3_SECRET,
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-west-2"})


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    moto = Path(sys.executable).with_name("moto_server")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(f"moto server did not start: {log.read_text()}")
    env = {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_DEFAULT_REGION": "us-west-2", "AWS_ENDPOINT_URL_S3": endpoint}
    yield S3Server(endpoint=endpoint, env=env)
    proc.terminate()
    proc.wait(timeout=10)


@dataclass
class BftRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def manifest_uri(self) -> str:
        last = self.stdout.strip().splitlines()[-1]
        assert last.startswith("manifest: "), f"last line is not the manifest path: {last!r}"
        return last[len("manifest: "):]


def run_bft(*args: str, env: dict[str, str] | None = None, timeout: int = 900) -> BftRun:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)  # always a fresh local instance
    proc = subprocess.run([sys.executable, "-m", "bft.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return BftRun(proc.returncode, proc.stdout, proc.stderr)


def engine_settings(tiny_model: Path) -> list[str]:
    """Flags that run every stage on the test's tiny model (the quickstart's engine settings stay)."""
    return ["--set", f"model={tiny_model}"]


def _proc_stats() -> list[tuple[int, list[str]]]:
    """``(pid, fields after "pid (comm)")`` of every process: state, ppid, pgrp, session, ..."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            out.append((int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()))
        except (OSError, ValueError, IndexError):
            continue
    return out


def children_of(pid: int) -> list[int]:
    return [child for child, fields in _proc_stats() if int(fields[1]) == pid]


def is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    return any(p == pid and fields[0] not in "ZX" for p, fields in _proc_stats())


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``: Ray workers and vLLM engine processes
    sit in process groups of their own, so killing the driver's group is not enough."""
    for pid, fields in _proc_stats():
        if int(fields[3]) == sid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
