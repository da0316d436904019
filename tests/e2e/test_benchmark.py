"""The throughput benchmark notebook runs headless at its small size (the README's command),
and the numbers it reports hold together: every arm had the same documents and prompts at
every stage, every completion has the fixed length, and the summary ratios are computed
from the arms. `make test` runs it with bft's default layout and the bare-engine arms; all
six, the stock-Ray ones with minutes of actor start-up each on 2 cores, run in
`make test-stock-ray` (CI)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import fsspec
import nbformat
import pytest
import yaml

from tests.e2e.conftest import ROOT
from tests.e2e.run_files import RunFiles

STAGES = ("generate", "curate", "rewrite")
ALL_ARMS = ("bft", "bft_per_stage", "ray_chain", "ray_serve", "naive", "ceiling")
RATIO = {"bft_per_stage": "bft_over_per_stage", "ray_chain": "bft_over_ray_chain", "ray_serve": "bft_over_ray_serve",
         "naive": "bft_over_naive", "ceiling": "bft_over_ceiling"}


def readme_command() -> list[str]:
    """The benchmark command README.md shows (these tests run it, with outputs redirected)."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith(".venv/bin/python benchmarks/run_notebook.py"))
    return shlex.split(line.split("#")[0])[1:]


def run_notebook(tmp_path, tiny_model, *extra: str) -> dict:
    results_dir = tmp_path / "results"
    # The tiny test model rather than the benchmark's own: the checks are about
    # behaviour, and the tiny model's engines start faster.
    proc = subprocess.run(
        [sys.executable, *readme_command(), "--model", str(tiny_model), *extra,
         "--results-dir", str(results_dir), "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    nb = nbformat.read(results_dir / "throughput.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5, f"expected the 5 plots, got {len(images)} images"
    return json.loads((results_dir / "throughput.json").read_text())


def check_results(results: dict, arms_run: tuple[str, ...], work) -> None:
    config = yaml.safe_load((ROOT / "benchmarks" / "throughput.yaml").read_text())
    # One size keeps the suite short; the N vs 10N figures are unit-tested
    # (test_benchmark_harness.py) and shown by the committed run.
    assert [s["docs"] for s in results["sizes"]] == [3]
    size = results["sizes"][0]
    arms = size["arms"]
    assert set(arms) == set(arms_run)
    finals = {arm["final_rows"] for name, arm in arms.items() if "final_rows" in arm}
    assert len(finals) == 1 and finals.pop() >= 1, {n: a.get("final_rows") for n, a in arms.items()}
    assert arms["bft"]["engines"] == [{"stages": list(STAGES), "kind": "shared"}]
    for stage in STAGES:
        max_tokens = config[stage]["sampling"]["max_tokens"]
        counts = {name: arm["stages"][stage] for name, arm in arms.items()}
        # Every arm had the same documents at every stage (curate keeps all: threshold 1)...
        rows = {name: c.get("rows_in", c["rows_out"]) for name, c in counts.items()}
        assert len(set(rows.values())) == 1, (stage, rows)
        # ...and fixed output lengths.
        for name, c in counts.items():
            assert c["completion_tokens"] == rows[name] * max_tokens, (stage, name, c)
    # The same prompts: generate's are identical in every arm; later prompts carry each
    # arm's own (random) instruction of fixed token length.
    assert len({arm["stages"]["generate"]["prompt_tokens"] for arm in arms.values()}) == 1
    for arm in arms_run[1:]:
        assert size[RATIO[arm]] == round(arms["bft"]["docs_per_s"] / arms[arm]["docs_per_s"], 3)
        assert results[RATIO[arm]] == size[RATIO[arm]]
    for arm in arms.values():
        assert arm["peak_pss_total_mb"] > 0 and arm["peak_rss_driver_mb"] > 0
    assert arms["bft"]["peak_rss_workers_mb"] > 0  # Ray workers and engines were seen
    # bft's profile: fixed costs, then the engines' span, within the command's wall time
    for name in [a for a in arms_run if a.startswith("bft")]:
        ph, arm = arms[name]["phases"], arms[name]
        assert ph["before_pipeline_s"] > 0 and ph["to_first_batch_s"] > 0 and ph["llm_span_s"] > 0, ph
        # (each figure rounded to 0.01 s)
        assert ph["to_first_batch_s"] + ph["llm_span_s"] <= arm["pipeline_wall_s"] + 0.02 <= arm["wall_s"] + 0.02, ph
    # The shared engine reports prefix-cache hits (a ray.data.llm pool per stage does not).
    bft = arms["bft"]["stages"]
    assert arms["bft"]["prefix_cache_hit_share"] == round(
        (bft["curate"]["cached_tokens"] + bft["rewrite"]["cached_tokens"])
        / (bft["curate"]["prompt_tokens"] + bft["rewrite"]["prompt_tokens"]), 4) > 0
    assert results["prefix_cache_hit_share"] == arms["bft"]["prefix_cache_hit_share"]
    assert results["memory_10x_over_1x"] is None and "scaling" not in results
    # bft's arms are real runs: every row accounted for, none lost by an engine or a batch
    for name in [a for a in arms_run if a.startswith("bft")]:
        run = RunFiles(fsspec.filesystem("file"), str(work / "docs-3" / name / "bench"))
        run.check_complete()
        run.check_nothing_lost()


def test_notebook_runs_the_benchmark_headless(tmp_path, tiny_model):
    """bft's default layout against the bare engine and the hand-written loop (a pool per
    stage runs end to end in test_pipeline_s3 already)."""
    arms = ("bft", "naive", "ceiling")
    check_results(run_notebook(tmp_path, tiny_model, "--arms", ",".join(arms)), arms, tmp_path / "work")


@pytest.mark.stock_ray
def test_every_arm_of_the_readme_command(tmp_path, tiny_model):
    """The README's command as it is: all six arms, Ray's own two included."""
    results = run_notebook(tmp_path, tiny_model)
    check_results(results, ALL_ARMS, tmp_path / "work")
    per_stage = results["sizes"][0]["arms"]["bft_per_stage"]
    assert [e["kind"] for e in per_stage["engines"]] == ["per_stage"] * 3
    assert per_stage["prefix_cache_hit_share"] is None
