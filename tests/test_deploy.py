"""Cluster definitions: the Ray cluster launcher YAML against Ray's own schema, the
KubeRay manifests against KubeRay's CRD schemas, built-in kinds with kubernetes-validate,
kustomize rendering, the bft configs inside them, and the Dockerfile with hadolint."""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from needs import shared

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CRDS = ROOT.parent / "shared" / "kuberay-crds"
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/example", "k8s/overlays/example-nightly",
                  "k8s/overlays/example-nightly-legacy-operator"]
K8S_VERSION = "1.31"


# --- Ray cluster launcher ------------------------------------------------------------------

def _validate_cluster(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_is_valid_for_ray():
    config = yaml.safe_load((ROOT / "deploy" / "cluster-aws.yaml").read_text())
    _validate_cluster(config)
    types = config["available_node_types"]
    assert types["head"]["max_workers"] == 0 and "GPU" not in types["head"]["resources"]
    assert types["gpu-1x"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu-1x"]["max_workers"] > types["gpu-1x"]["min_workers"] == 0
    assert config["idle_timeout_minutes"] and config["upscaling_speed"]


def test_cluster_yaml_starts_every_node_with_token_auth_and_a_loopback_dashboard():
    config = yaml.safe_load((ROOT / "deploy" / "cluster-aws.yaml").read_text())
    token_file = "/home/ray/.ray/auth_token"
    assert config["file_mounts"][token_file] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start, key
        for command in start:
            assert "RAY_AUTH_MODE=token" in command and f"RAY_AUTH_TOKEN_PATH={token_file}" in command, command
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in str(config)


def test_the_documented_token_command_writes_the_file_the_nodes_read(tmp_path):
    """deploy/README.md: `RAY_AUTH_MODE=token ray get-auth-token --generate` before `ray up`."""
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_AUTH_TOKEN", None)
    proc = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    token = (tmp_path / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32 and "ray get-auth-token --generate" in (ROOT / "deploy" / "README.md").read_text()


def test_image_has_no_passwordless_sudo():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    code = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert "NOPASSWD" not in code and "sudoers" not in code and not re.search(r"\bsudo\b", code)
    assert re.search(r"^USER 1000$", dockerfile, re.M)


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(idle_timeout_minutes="ten"),
    lambda c: c.update(not_a_field=1),
    lambda c: c["available_node_types"]["gpu-1x"].pop("node_config"),
])
def test_ray_schema_rejects_broken_cluster_yaml(mutate):
    import jsonschema

    config = yaml.safe_load((ROOT / "deploy" / "cluster-aws.yaml").read_text())
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_cluster(config)


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([str(BIN / "hadolint"), str(ROOT / "deploy" / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_every_dependency():
    """The image installs bft with --no-deps after pinning its dependencies: a dependency
    added to pyproject.toml must be added there too."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text().lower()
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()
        assert f'"{name}==' in dockerfile or f'"{name}[' in dockerfile, f"{name} is not installed in deploy/Dockerfile"


def test_hadolint_catches_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    assert subprocess.run([str(BIN / "hadolint"), str(bad)], capture_output=True).returncode != 0


# --- Kubernetes --------------------------------------------------------------------------------

def render(path: str) -> list[dict]:
    proc = subprocess.run([str(BIN / "kubectl"), "kustomize", str(ROOT / path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {path: render(path) for path in KUSTOMIZATIONS}


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str):
    import jsonschema

    plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}[kind]
    # The CRDs are megabytes of YAML: parse each once, with libyaml when present.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def test_kustomizations_render_expected_kinds(rendered):
    kinds = {path: sorted(d["kind"] for d in docs) for path, docs in rendered.items()}
    assert kinds["k8s/base"] == ["ConfigMap", "NetworkPolicy", "RayJob", "ServiceAccount"]
    assert "RayCronJob" in kinds["k8s/overlays/example-nightly"]
    assert "CronJob" in kinds["k8s/overlays/example-nightly-legacy-operator"]
    assert "RayCluster" in kinds["k8s/overlays/example"]


def test_kuberay_resources_match_crd_schemas(rendered):
    shared("kuberay-crds")
    checked = 0
    for path, docs in rendered.items():
        for doc in docs:
            if doc["apiVersion"] == "ray.io/v1":
                errors = [e.message for e in crd_validator(doc["kind"]).iter_errors(doc)]
                assert not errors, f"{path} {doc['kind']}: {errors[:3]}"
                checked += 1
    assert checked >= 7


def test_crd_validation_catches_a_bad_rayjob(rendered):
    shared("kuberay-crds")
    job = copy.deepcopy(next(d for d in rendered["k8s/base"] if d["kind"] == "RayJob"))
    job["spec"]["backoffLimit"] = "once"
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert len(list(crd_validator("RayJob").iter_errors(job))) == 2


def test_builtin_kinds_are_valid_kubernetes(rendered):
    import kubernetes_validate

    validated = []
    for path, docs in rendered.items():
        for doc in docs:
            if not doc["apiVersion"].startswith("ray.io/"):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on an invalid doc
                validated.append(doc["kind"])
    assert {"ConfigMap", "ServiceAccount", "CronJob"} <= set(validated), validated


def test_kubernetes_validate_catches_a_bad_cronjob(rendered):
    import kubernetes_validate

    cron = copy.deepcopy(next(d for d in rendered["k8s/overlays/example-nightly-legacy-operator"]
                              if d["kind"] == "CronJob"))
    cron["spec"]["concurrencyPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def test_gpu_workers_autoscale_with_gpu_limits_tolerations_and_shm(rendered):
    job = next(d for d in rendered["k8s/base"] if d["kind"] == "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 0 and "env_vars" in yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    group = cluster["workerGroupSpecs"][0]
    assert group["minReplicas"] < group["maxReplicas"]
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])


def test_scheduled_variants_copy_the_base_job(rendered):
    docs = rendered["k8s/overlays/example-nightly"]
    job = next(d for d in docs if d["kind"] == "RayJob")
    cron = next(d for d in docs if d["kind"] == "RayCronJob")
    assert job["spec"]["suspend"] is True  # the schedule owns the runs
    assert cron["spec"]["schedule"] == "0 4 * * *"
    template = cron["spec"]["jobTemplate"]
    assert "suspend" not in template
    for field in ("entrypoint", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "backoffLimit"):
        assert template[field] == job["spec"][field], field
    legacy = rendered["k8s/overlays/example-nightly-legacy-operator"]
    assert next(d for d in legacy if d["kind"] == "RayJob")["spec"]["suspend"] is True
    cronjob = next(d for d in legacy if d["kind"] == "CronJob")
    assert cronjob["spec"]["schedule"] == "0 4 * * *" and "kubectl create" in str(cronjob)


def test_bft_configs_in_manifests_are_valid(rendered, tmp_path):
    from bft.config import load_config

    for path, docs in rendered.items():
        config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "bft-config")
        file = tmp_path / "config.yaml"
        file.write_text(config_map["data"]["config.yaml"])
        cfg = load_config(str(file), ["date=2026-11-22"])
        assert cfg.input.uri.startswith("s3://") and cfg.input.uri.endswith("/2026-11-22/")
    overlay = next(d for d in rendered["k8s/overlays/example"] if d["kind"] == "ConfigMap")
    assert "acme-crawl" in overlay["data"]["config.yaml"]  # the overlay's bucket replaced the base's


def test_no_credentials_in_manifests(rendered):
    text = "\n".join(yaml.safe_dump_all(docs) for docs in rendered.values()).lower()
    text += (ROOT / "deploy" / "cluster-aws.yaml").read_text().lower()
    assert "aws_secret_access_key:" not in text and "akia" not in text
    sa = next(d for d in rendered["k8s/overlays/example"] if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/bft-crawl-bucket")


# --- Security of the rendered manifests --------------------------------------------------------

AUTH_SECRET = "bft-ray-auth"


def ray_pod_specs(doc: dict) -> dict[str, dict]:
    """Every pod spec a KubeRay resource creates, by role."""
    spec = doc["spec"]
    if doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    cluster = spec if doc["kind"] == "RayCluster" else spec["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[f"worker:{group['groupName']}"] = group["template"]["spec"]
    if "submitterPodTemplate" in spec:
        pods["submitter"] = spec["submitterPodTemplate"]["spec"]
    return pods


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
    return spec if doc["kind"] == "RayCluster" else spec["rayClusterSpec"]


def token_from_secret(env: list[dict]) -> bool:
    by_name = {e["name"]: e for e in env}
    ref = by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return by_name.get("RAY_AUTH_MODE", {}).get("value") == "token" and ref == {"name": AUTH_SECRET, "key": "auth_token"}


def assert_hardened(pod: dict, where: str) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True, where
    assert pod["securityContext"]["runAsUser"] != 0, where
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["capabilities"]["drop"] == ["ALL"], where
        assert not context.get("privileged"), where


def kuberay_docs(rendered):
    return [(path, doc) for path, docs in rendered.items() for doc in docs
            if doc["apiVersion"] == "ray.io/v1"]


def test_every_ray_cluster_requires_the_token_from_the_users_secret(rendered):
    checked = 0
    for path, doc in kuberay_docs(rendered):
        cluster = cluster_spec(doc)
        where = f"{path} {doc['kind']}"
        if path.endswith("legacy-operator"):
            # 1.5.1-1.6.1 operators generate the token Secret and inject it everywhere themselves.
            assert cluster["authOptions"] == {"mode": "token"}, where
            assert AUTH_SECRET not in yaml.safe_dump(doc), where
            continue
        # The legacy overlay removes these env lists whole: they must hold only the token.
        for role, pod in ray_pod_specs(doc).items():
            names = [e["name"] for e in pod["containers"][0].get("env", [])]
            assert names == ["RAY_AUTH_MODE", "RAY_AUTH_TOKEN"], \
                f"{where} {role}: env beyond the token; patch the legacy overlay's env removal too"
        assert cluster["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}, where
        for role, pod in ray_pod_specs(doc).items():
            for container in pod["containers"]:
                assert token_from_secret(container.get("env", [])), f"{where} {role}"
        assert token_from_secret(cluster["autoscalerOptions"]["env"]), where
        checked += 1
    assert checked >= 5


def test_ray_pods_are_hardened_and_only_the_head_mounts_an_api_token(rendered):
    for path, doc in kuberay_docs(rendered):
        for role, pod in ray_pod_specs(doc).items():
            where = f"{path} {doc['kind']} {role}"
            assert_hardened(pod, where)
            # The head runs the autoscaler sidecar, which scales the cluster through the API.
            assert pod["automountServiceAccountToken"] is (role == "head"), where
        autoscaler = cluster_spec(doc)["autoscalerOptions"]["securityContext"]
        assert autoscaler["allowPrivilegeEscalation"] is False and autoscaler["capabilities"]["drop"] == ["ALL"]
    for docs in rendered.values():
        sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "bft")
        assert sa["automountServiceAccountToken"] is False
    cronjob = next(d for d in rendered["k8s/overlays/example-nightly-legacy-operator"] if d["kind"] == "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert_hardened(pod, "CronJob")
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_network_policy_admits_only_ray_pods_the_submitter_and_the_operator(rendered):
    for path, docs in rendered.items():
        policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
        selected = policy["spec"]["podSelector"]["matchLabels"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for _, doc in kuberay_docs({path: docs}):
            for role, pod_spec in ray_pod_specs(doc).items():
                pod = (doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"])
                labels = (pod["submitterPodTemplate"]["metadata"]["labels"] if role == "submitter" else
                          (cluster_spec(doc)["headGroupSpec"]["template"] if role == "head" else
                           next(g for g in cluster_spec(doc)["workerGroupSpecs"]
                                if f"worker:{g['groupName']}" == role)["template"])["metadata"]["labels"])
                is_ray = all(labels.get(k) == v for k, v in selected.items())
                assert is_ray is (role != "submitter"), f"{path} {role}"
        rules = policy["spec"]["ingress"]
        # Every rule names its sources; no rule is open to every pod or address.
        assert rules and all(rule.get("from") for rule in rules), path
        assert not any("ipBlock" in peer for rule in rules for peer in rule["from"]), path
        from_ray = [r for r in rules if r["from"][0].get("podSelector", {}).get("matchLabels") == selected
                    and "namespaceSelector" not in r["from"][0]]
        assert len(from_ray) == 1 and "ports" not in from_ray[0]
        others = [r for r in rules if r not in from_ray]
        # The submitter and the operator reach the Jobs API (8265) and nothing else.
        assert others and all(r["ports"] == [{"port": 8265, "protocol": "TCP"}] for r in others), path
        # every peer is chosen by pod labels (no whole namespace, no address range)
        assert all(peer["podSelector"]["matchLabels"] for r in rules for peer in r["from"]), path
