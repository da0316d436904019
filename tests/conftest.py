"""Shared fixtures: the tiny model (built once per session) and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_WEBDOCS = ROOT.parent / "shared" / "webdocs"


@pytest.fixture(scope="session", autouse=True)
def _run_logs_in_a_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``bft run`` writes its logs to a file; the tests' go to a folder of their own
    (subprocesses inherit it), not the user's ~/.cache/bft/logs."""
    os.environ.setdefault("BFT_LOG_DIR", str(tmp_path_factory.mktemp("bft-logs")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model + tokenizer, built locally (no hub). Reused when
    BFT_TINY_MODEL points at one already built (``make test`` builds it once)."""
    from bft.tiny_model import build_tiny_model

    prebuilt = os.environ.get("BFT_TINY_MODEL")
    if prebuilt and (Path(prebuilt) / "config.json").exists():
        return Path(prebuilt)
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture()
def minimal_config_data(tiny_model: Path) -> dict:
    return {"model": str(tiny_model)}
