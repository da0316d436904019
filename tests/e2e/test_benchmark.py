"""The throughput benchmark notebook runs headless at its small size (as `make test` asks),
and the numbers it reports hold together: the ceiling replays exactly the prompts bft sent,
every completion has the fixed length, and the summary ratios are computed from the arms."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import fsspec
import nbformat
import yaml

from tests.e2e.conftest import ROOT
from tests.e2e.run_files import RunFiles

STAGES = ("generate", "curate", "rewrite")


def readme_command() -> list[str]:
    """The benchmark command README.md shows (this test runs it, with its outputs redirected)."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith(".venv/bin/python benchmarks/run_notebook.py"))
    return shlex.split(line.split("#")[0])[1:]


def test_notebook_runs_the_benchmark_headless(tmp_path, tiny_model):
    results_dir = tmp_path / "results"
    # The tiny test model rather than the benchmark's own: the checks are about
    # behaviour, and the tiny model's engines start faster.
    proc = subprocess.run(
        [sys.executable, *readme_command(), "--model", str(tiny_model),
         "--results-dir", str(results_dir), "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    nb = nbformat.read(results_dir / "throughput.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, f"expected the 4 plots, got {len(images)} images"

    results = json.loads((results_dir / "throughput.json").read_text())
    config = yaml.safe_load((ROOT / "benchmarks" / "throughput.yaml").read_text())
    # One size keeps `make test` short; the N vs 10N figures are unit-tested
    # (test_benchmark_harness.py) and shown by the committed run.
    assert [s["docs"] for s in results["sizes"]] == [3]
    for size in results["sizes"]:
        arms = size["arms"]
        assert set(arms) == {"bft", "ceiling", "naive"}
        assert arms["bft"]["final_rows"] >= 1
        for stage in STAGES:
            bft, ceiling, naive = (arms[a]["stages"][stage] for a in ("bft", "ceiling", "naive"))
            max_tokens = config[stage]["sampling"]["max_tokens"]
            # The ceiling replays bft's requests: same rows, same prompts.
            assert ceiling["rows_in"] == bft["rows_in"]
            assert ceiling["prompt_tokens"] == bft["prompt_tokens"]
            # Fixed output lengths in every arm.
            for arm in (bft, ceiling, naive):
                assert arm["completion_tokens"] == arm["rows_in"] * max_tokens, (stage, arm)
        assert size["bft_over_ceiling"] == round(arms["bft"]["docs_per_s"] / arms["ceiling"]["docs_per_s"], 3)
        assert size["bft_over_naive"] == round(arms["bft"]["docs_per_s"] / arms["naive"]["docs_per_s"], 3)
        for arm in arms.values():
            assert arm["peak_pss_total_mb"] > 0 and arm["peak_rss_driver_mb"] > 0
        assert arms["bft"]["peak_rss_workers_mb"] > 0  # Ray workers and engines were seen
    # bft's arm is a real run: every row accounted for, none lost by an engine or a batch
    bft_run = RunFiles(fsspec.filesystem("file"), str(tmp_path / "work" / "docs-3" / "bft" / "bench"))
    bft_run.check_complete()
    bft_run.check_nothing_lost()
    assert results["bft_over_ceiling"] == results["sizes"][-1]["bft_over_ceiling"]
    assert results["bft_over_naive"] == results["sizes"][-1]["bft_over_naive"]
    assert results["memory_10x_over_1x"] is None and "scaling" not in results
