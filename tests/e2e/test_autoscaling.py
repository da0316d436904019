"""Issue 18: the autoscaling that deploy/cluster-aws.yaml promises, seen working.

A local Ray cluster runs Ray's own autoscaler with its fake multi-node provider
(``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``): "nodes" are raylets
started on this machine, added and removed by the real StandardAutoscaler. The node
types are those of cluster-aws.yaml (the same names, min/max workers, upscaling speed),
with CPUs standing in for GPUs: a "gpu-1x" node has 2 CPUs, and the run's engine replicas
ask for 2 CPUs each, which the head (1 CPU) cannot hold. The run must make the
autoscaler add worker nodes, its engine pool must grow onto them, its outputs must
reconcile, and the idle nodes must go after the idle timeout (shortened here), all read
from the autoscaler's own event log and status.

Minutes of start-up: `make test-autoscale` (CI runs it), not `make test`."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, _free_port, kill_session

pytestmark = pytest.mark.autoscale

RAY = str(Path(sys.executable).with_name("ray"))
# The fake provider names its head node type so.
FAKE_HEAD_TYPE = "ray.head.default"
# CPUs standing in for one GPU, per node and per engine replica.
CPUS_PER_GPU = 2
IDLE_TIMEOUT_MIN = 0.2
REPLICAS = 2


def fake_cluster_config(port: int) -> dict:
    """deploy/cluster-aws.yaml's shape on the fake provider (a complete config: the
    wheel lacks the provider's example.yaml that would fill the rest)."""
    aws = yaml.safe_load((ROOT / "deploy" / "cluster-aws.yaml").read_text())
    types = {}
    for name, node in aws["available_node_types"].items():
        gpus = {"head": 0, "gpu-1x": 1, "gpu-8x": 8}[name]
        types[FAKE_HEAD_TYPE if name == aws["head_node_type"] else name] = {
            "resources": {"CPU": 1} if gpus == 0 else {"CPU": gpus * CPUS_PER_GPU},
            "node_config": {}, "min_workers": node["min_workers"], "max_workers": node["max_workers"]}
    return {
        "cluster_name": "bft-fake", "max_workers": aws["max_workers"], "upscaling_speed": aws["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "launch_multiple": True,
                     "disable_launch_config_check": True, "disable_node_updaters": True, "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ubuntu"}, "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def ray_status(address: str, env: dict) -> str:
    proc = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def active_nodes(status: str) -> dict[str, int]:
    """``Active:`` of ``ray status``: node type -> count."""
    lines = status.split("Active:", 1)[-1].split("Pending:", 1)[0].strip().splitlines()
    return {line.split()[1]: int(line.split()[0]) for line in lines if line.strip() and line.split()[0].isdigit()}


def autoscaler_events(temp_dir: str) -> list[tuple[float, str]]:
    found = []
    for log in Path(temp_dir).glob("session_2*/logs/events/event_AUTOSCALER.log"):  # not session_latest
        for line in log.read_text().splitlines():
            event = json.loads(line)
            found.append((float(event["timestamp"]), event["message"]))
    return sorted(found)


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory, tiny_model):
    port = _free_port()
    work = tmp_path_factory.mktemp("autoscale")
    config = work / "fake-cluster.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(port)))
    temp_dir = tempfile.mkdtemp(prefix="bftas", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--autoscaling-config", str(config), "--num-cpus", "1", "--temp-dir", temp_dir,
                             "--include-dashboard", "false", "--disable-usage-stats"],
                            env=env, stdout=open(work / "head.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while FAKE_HEAD_TYPE not in active_nodes(ray_status(address, env)):
            assert head.poll() is None and time.time() < deadline, (work / "head.log").read_text()[-3000:]
            time.sleep(2)
        before = active_nodes(ray_status(address, env))
        # Every LLM stage on one shared pool of REPLICAS replicas of 2 CPUs: none fits the head.
        per_stage = [f"--set={stage}.{key}" for stage in ("generate", "curate", "rewrite")
                     for key in (f"replicas=[{REPLICAS}, {REPLICAS}]", f"resources.cpus_per_worker={CPUS_PER_GPU}")]
        out = work / "out"
        log = work / "run.log"
        run = subprocess.Popen([sys.executable, "-m", "bft.cli", "run", "examples/quickstart.yaml", "--run-id", "scaled",
                                f"--set=output.uri={out}", f"--set=ray.address={address}", f"--set=model={tiny_model}",
                                *per_stage], cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        during = []
        deadline = time.time() + 600  # a run the autoscaler never serves would wait for nodes forever
        while run.poll() is None:
            assert time.time() < deadline, f"the run did not end in 600 s: {during[-3:]}"
            during.append(active_nodes(ray_status(address, env)))
            time.sleep(3)
        output = log.read_text()
        ended = time.time()
        after = []
        deadline = ended + IDLE_TIMEOUT_MIN * 60 + 120
        while time.time() < deadline:
            after.append(active_nodes(ray_status(address, env)))
            if after[-1].keys() == {FAKE_HEAD_TYPE}:
                break
            time.sleep(3)
        yield {"returncode": run.returncode, "output": output, "out": out / "scaled", "before": before,
               "during": during, "after": after, "ended": ended, "events": autoscaler_events(temp_dir),
               "status_after": ray_status(address, env)}
    finally:
        if "run" in locals() and run.poll() is None:
            kill_session(run.pid)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        kill_session(head.pid)
        subprocess.run([RAY, "stop", "--force"], env={**env, "RAY_TMPDIR": temp_dir}, capture_output=True)


def test_the_run_made_the_autoscaler_add_worker_nodes_and_its_pool_grew_onto_them(scaled_run):
    r = scaled_run
    assert r["returncode"] == 0, r["output"][-3000:]
    assert r["before"] == {FAKE_HEAD_TYPE: 1}
    added = [(t, m) for t, m in r["events"] if m.startswith("Adding") and "gpu-1x" in m]
    assert added, r["events"]
    peak = max(nodes.get("gpu-1x", 0) for nodes in r["during"])
    assert peak >= REPLICAS, r["during"]
    replicas = [json.loads(p.read_text()) for p in (r["out"] / "_run" / "replicas").glob("*.json")]
    # the pool's replicas ran on the nodes the autoscaler added, one each, none on the head
    assert len(replicas) >= REPLICAS, replicas
    nodes = {rep["node_id"] for rep in replicas}
    assert len(nodes) >= REPLICAS and None not in nodes
    assert not any(n.endswith("00000") for n in nodes)  # the fake head's node id
    manifest = json.loads((r["out"] / "manifest.json").read_text())
    assert manifest["reconciled"] and manifest["final_rows"] > 0
    assert manifest["engines"] == [{"stages": ["generate", "curate", "rewrite"], "kind": "shared"}]
    print(f"\nautoscaler events: {r['events']}\nnodes during the run: {r['during']}\nafter: {r['after']}")


def test_idle_worker_nodes_were_removed_after_the_idle_timeout(scaled_run):
    r = scaled_run
    removed = [(t, m) for t, m in r["events"] if m.startswith("Removing") and "(idle)" in m]
    assert removed, r["events"]
    count = sum(int(m.split()[1]) for _, m in removed)
    added = sum(int(m.split()[1]) for _, m in r["events"] if m.startswith("Adding"))
    assert count == added  # every node added was removed again, as idle
    assert r["after"][-1] == {FAKE_HEAD_TYPE: 1}, r["after"]
    assert "gpu-1x" not in r["status_after"].split("Active:", 1)[-1].split("Pending:", 1)[0]
