"""``bft submit``: a thin wrapper over Ray's job API that submits ``bft run`` to a cluster.

Equivalent to::

    ray job submit --address ADDRESS --working-dir . \
        --runtime-env-json '{"excludes": [...], "py_modules": ["src/bft"]}' \
        -- python -m bft.cli run CONFIG ...

The driver needs no GPU: every GPU need is a resource of the engine actor pools (see
``engines/``), which is what lets the Ray autoscaler add GPU nodes for them.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import bft
from bft.redaction import SECRET_SETS_ENV

# Never shipped to the cluster: environments, caches, outputs, VCS metadata.
WORKING_DIR_EXCLUDES = [".venv", ".cache", "out", ".git", "**/__pycache__", "*.egg-info", "benchmarks/results"]


def run_command(config: str, run_id: str | None, sets: list[str], date: str | None,
                from_stage: str | None, from_run: str | None) -> list[str]:
    cmd = ["python", "-m", "bft.cli", "run", config]
    if run_id:
        cmd += ["--run-id", run_id]
    if date:
        cmd += ["--date", date]
    if from_stage:
        cmd += ["--from-stage", from_stage]
    if from_run:
        cmd += ["--from-run", from_run]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def runtime_env(working_dir: str | None, ship_package: bool, secret_sets: list[str] | None = None) -> dict[str, Any]:
    """``secret_sets``: ``--set`` overrides that carry secrets, handed to the job's ``bft run``
    through its environment (``BFT_SECRET_SETS``, see ``redaction.py``) instead of its command line."""
    env: dict[str, Any] = {}
    if secret_sets:
        env["env_vars"] = {SECRET_SETS_ENV: json.dumps(secret_sets)}
    if working_dir:
        env["working_dir"] = working_dir
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if ship_package:
        # The job runs this checkout's bft, even on an image with another (or no) bft.
        env["py_modules"] = [str(Path(bft.__file__).parent)]
    return env


def submit(address: str, command: list[str], env: dict[str, Any], submission_id: str | None = None) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    return client.submit_job(entrypoint=shlex.join(command), runtime_env=env, submission_id=submission_id,
                             entrypoint_num_cpus=0, entrypoint_num_gpus=0)
