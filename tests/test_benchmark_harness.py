"""Parts of the throughput benchmark that its numbers rest on: the documents are equal
units of work that bft keeps, and memory is counted over the whole process tree."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from bft.config import FilterConfig
from bft.filters.dedup import normalize
from bft.filters.length import check_length
from bft.filters.quality import check_quality

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from corpus import synthetic_docs  # noqa: E402
from memory import run_measured  # noqa: E402


def test_synthetic_docs_pass_the_filters_are_unique_and_equal_length():
    docs = synthetic_docs(200, chars=1200)
    cfg = FilterConfig()
    assert [check_length(d["text"], cfg) for d in docs] == [None] * 200
    assert [check_quality(d["text"], cfg) for d in docs] == [None] * 200
    assert len({normalize(d["text"]) for d in docs}) == 200 == len({d["id"] for d in docs})
    lengths = [len(d["text"]) for d in docs]
    assert max(lengths) - min(lengths) <= 20  # cut at a word boundary near 1200
    assert synthetic_docs(3, chars=1200) == docs[:3]  # seeded: the same documents every run


def test_memory_of_grandchildren_is_counted(tmp_path):
    # driver -> child -> grandchild holding 300 MB: the grandchild is a "worker".
    grandchild = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(3)"
    child = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", {grandchild!r}], check=True)
    """)
    measured = run_measured([sys.executable, "-c", child], tmp_path / "log.txt")
    assert measured["peak_rss_workers_mb"] >= 300
    assert measured["peak_pss_total_mb"] >= 300
    assert measured["peak_rss_driver_mb"] < 300
    assert measured["max_processes"] >= 2 and measured["wall_s"] >= 3


def test_benchmark_configs_load_with_fixed_output_lengths():
    from bft.config import load_config

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    for name in ("throughput.yaml", "throughput-gpu.yaml"):
        cfg = load_config(str(root / name), ["model=/models/m"])
        for stage in (cfg.generate, cfg.curate, cfg.rewrite):
            assert stage.sampling.ignore_eos and stage.structured_output_regex, name
        assert cfg.curate.threshold == 1, name


def test_scaling_figures_from_two_sizes():
    from throughput import scaling

    def arm(wall, pss, pipeline=None):
        return {"wall_s": wall, "peak_pss_total_mb": pss, "pipeline_wall_s": pipeline or wall}

    runs = [{"docs": 10, "arms": {"bft": arm(100, 1000), "ceiling": arm(10, 500)}},
            {"docs": 100, "arms": {"bft": arm(280, 1100), "ceiling": arm(100, 520)}}]
    out = scaling(runs)
    assert out["memory_10x_over_1x"] == 1.1 == out["scaling"]["memory_10x_over_1x"]
    assert out["scaling"]["time_10x_over_1x"] == 2.8
    # 90 extra documents: bft took 180 s more (0.5 docs/s), the ceiling 90 s more (1.0)
    assert out["marginal_docs_per_s"] == {"bft": 0.5, "ceiling": 1.0}
    assert out["bft_over_ceiling_marginal"] == 0.5
    assert "bft_over_naive_marginal" not in out  # no naive arm in this run
