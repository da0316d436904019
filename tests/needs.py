"""Tests that need a tool or data this machine may lack: outside CI they skip with the
reason; in CI (``.ci/run`` exports ``CI=true``) a missing piece fails the test, so a
green CI run never hides a check that did not happen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def missing(reason: str) -> None:
    """Skip, or fail under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must not skip this)")
    pytest.skip(reason)


def shared(name: str) -> Path:
    """``../shared/<name>``, or skip (fail under CI) when it is not there."""
    path = SHARED / name
    if not path.exists():
        missing(f"{path} not present")
    return path
