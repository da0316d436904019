"""End-to-end fixtures: a real S3 server (moto in server mode on 127.0.0.1) and a helper
that runs the real ``bft`` command in a subprocess (its own Ray instance and engines)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Credentials for the local moto server. The secret is distinctive so tests can check
# that it never reaches a log, manifest or output file.
S3_KEY_ID = "AKIABFTTESTKEY000001"
S3_SECRET = "bft-planted-secret-9f3c2e7a"
# More planted secrets (issue 17): a token in every stage's engine_kwargs, one in the
# environment under a credential name, a proxy password in a URL in the environment.
ENGINE_TOKEN = "hf_planted_engine_kwargs_51d0"
ENV_TOKEN = "hf_planted_environment_7c2b"
PROXY_PASSWORD = "planted-proxy-pass-e41a"
PLANTED = (S3_SECRET, ENGINE_TOKEN, ENV_TOKEN, PROXY_PASSWORD)


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


def run_bft(*args: str, env: dict[str, str] | None = None, timeout: int = 900, verbose: bool = True) -> BftRun:
    """``verbose``: with ``bft --verbose`` (Ray's and the engines' logs on the console, where
    most tests look for them); ``False`` runs with the default quiet console."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)  # always a fresh local instance
    proc = subprocess.run([sys.executable, "-m", "bft.cli", *(["--verbose"] if verbose else []), *args],
                          cwd=ROOT, env=full_env,
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


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


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


# An engine actor with work in hand. A ray.data.llm replica (engine.sharing per_stage):
# vLLM (0.32) warns once per process when its first request arrives, and logs its
# throughput every few seconds while it has requests. A shared-pool replica: bft logs its
# first request of each stage and each stage batch it writes. Ray's prefix names the
# actor's process.
WORKING_ENGINE = re.compile(r"pid=(\d+)\).*(Passing raw prompts to InputProcessor|"
                            r"Engine 000: Avg prompt throughput.*(Running: [1-9]|Waiting: [1-9])|"
                            r"bft\.engines\.shared: first \w+ request on this replica)")
ENGINE_ACTOR = re.compile(r"\(MapWorker\(MapBatches\((?:vLLMEngineStageUDF|SharedEngine)\)\) pid=(\d+)")


def shared_wrote(stage: str) -> re.Pattern:
    """A shared-pool replica's line for a stage batch it wrote (after the batch's earlier
    stages were written)."""
    return re.compile(rf"pid=(\d+)\).*bft\.engines\.shared: wrote {stage} batch")


# When a shared-pool replica logged a line (its log lines carry their time).
LOGGED_AT = re.compile(r"\) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def logged_at(line: str) -> float | None:
    match = LOGGED_AT.search(line)
    if not match:
        return None
    stamp, millis = match.group(1).split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


@dataclass
class EngineWatch:
    """Kills the ``kill_nth`` engine actor to print a ``trigger`` line (1 = the first; by
    default, to get work: generate's first, then curate's, then rewrite's with a pool per
    stage, each getting rows only once the stage before has passed some on), as it prints
    it, remembering its vLLM engine-core process(es), the output line and the time of the
    kill."""

    kill_nth: int = 1
    trigger: re.Pattern = WORKING_ENGINE
    working: list[int] = field(default_factory=list)
    pid: int | None = None
    children: list[int] = field(default_factory=list)
    child_commands: list[str] = field(default_factory=list)
    at_line: int | None = None
    at_time: float | None = None

    def __call__(self, line: str, index: int) -> None:
        match = self.trigger.search(line)
        if match and int(match.group(1)) not in self.working:
            self.working.append(int(match.group(1)))
            if len(self.working) == self.kill_nth:
                self.pid, self.at_line = self.working[-1], index
                self.children = children_of(self.pid)
                self.child_commands = [command_of(pid) for pid in self.children]
                os.kill(self.pid, signal.SIGKILL)
                self.at_time = time.time()


class BftProcess:
    """``bft`` in a session of its own (so everything it starts can be killed with it),
    its stdout and stderr read line by line; ``on_line`` callbacks see each line."""

    def __init__(self, args: list[str], env: dict[str, str], on_line: list[Callable[[str, int], None]] = (),
                 verbose: bool = True):
        full_env = {**os.environ, **env}
        full_env.pop("RAY_ADDRESS", None)
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "bft.cli", *(["--verbose"] if verbose else []), *args],
                                     cwd=ROOT, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", start_new_session=True)
        self.on_line = list(on_line)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            for callback in self.on_line:
                callback(line, len(self.lines) - 1)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 600) -> float:
        """Poll ``condition`` every half second while the run is alive; seconds waited."""
        started = time.time()
        while not condition():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output[-3000:]}"
            assert time.time() - started < timeout, f"no {what} after {timeout} s"
            time.sleep(0.5)
        return time.time() - started

    def kill(self) -> None:
        """SIGKILL the driver, then everything it started (its local Ray, the engines),
        as losing the head node would."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        kill_session(self.proc.pid)
        self.reader.join(timeout=10)

    def wait(self, timeout: float = 900, watch: Callable[[], list[int]] = list) -> int:
        """Wait for the run to end by itself, note which of ``watch()`` (pids) outlived it
        (``self.orphans``), then kill whatever of its session is left."""
        try:
            self.proc.wait(timeout=timeout)
            self.orphans = [pid for pid in watch() if is_running(pid)]
        finally:
            kill_session(self.proc.pid)
            self.reader.join(timeout=10)
        return self.proc.returncode


# --- the S3 runs (s3_runs.py): one corpus, one config, one baseline for two modules ----------

@pytest.fixture(scope="session")
def s3_corpus(s3_server, tmp_path_factory):
    from .s3_runs import upload_corpus

    fs = s3_server.fs()
    return fs, upload_corpus(fs, tmp_path_factory.mktemp("s3-corpus"))


@pytest.fixture(scope="session")
def s3_config(s3_corpus, tmp_path_factory) -> Path:
    from .s3_runs import write_config

    return write_config(tmp_path_factory.mktemp("s3-config") / "s3.yaml", s3_corpus[1])


@pytest.fixture(scope="session")
def s3_baseline(s3_corpus, s3_config, s3_server, tiny_model):
    import tempfile

    from .s3_runs import run_baseline

    # Its Ray logs go to a temp dir of its own, to be searched for secrets; short, as Ray's
    # socket paths have a length limit.
    ray_tmp = Path(tempfile.mkdtemp(prefix="bftray"))
    return run_baseline(s3_corpus[0], s3_server, s3_config, tiny_model, ray_tmp)
