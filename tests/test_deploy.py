"""Cluster definitions: the Ray cluster launcher YAML against Ray's own schema, the
KubeRay manifests against KubeRay's CRD schemas, built-in kinds with kubernetes-validate,
kustomize rendering, the bft configs inside them, and the Dockerfile with hadolint."""

from __future__ import annotations

import copy
import functools
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
    assert kinds["k8s/base"] == ["ConfigMap", "RayJob", "ServiceAccount"]
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
