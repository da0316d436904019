"""Checks shared by the report's end-to-end tests: report.json against counts taken
straight from the run's files (not through bft), and the page in headless Chromium."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .browser import render
from .run_files import RunFiles


def counts_from_files(files: RunFiles) -> dict:
    """What report.json must say, from the run's files."""
    dropped = files.dropped
    scores = [r["score"] for r in files.kept["curate"]]
    scores += [r["score"] for r in dropped if r["stage"] == "curate" and r["score"] is not None]
    return {
        "documents_in": sum(s["rows_seen"] for s in files.stats.values()),
        "funnel": {stage: entry["out"] for stage, entry in files.stage_counts().items()},
        "dropped": dict(Counter(r["reason"] for r in dropped)),
        "dropped_by_stage": {stage: dict(Counter(r["reason"] for r in dropped if r["stage"] == stage))
                             for stage in {r["stage"] for r in dropped}},
        "score_histogram": {str(s): scores.count(s) for s in range(1, 6)},
        "unparseable": sum(1 for r in dropped if r["reason"] == "unparseable_score"),
        "responses": [r["response"] for r in files.kept["rewrite"]],
    }


def check_report_against_files(report: dict, fs, run: str) -> None:
    """report.json against the run's files (``fs``: local or s3fs; ``run``: the folder on
    it); and the manifest too, on its own (the report's "counts agree" compares the
    manifest with a tally made by the code that wrote it, so it cannot stand in for an
    independent check)."""
    files = RunFiles(fs, run)
    files.check_complete()
    expected = counts_from_files(files)
    assert report["documents_in"] == expected["documents_in"]
    assert report["funnel"] == expected["funnel"]
    assert report["dropped"] == expected["dropped"]
    assert report["dropped_by_stage"] == expected["dropped_by_stage"]
    assert report["scores"]["histogram"] == expected["score_histogram"]
    assert report["scores"]["unparseable"] == expected["unparseable"]
    assert report["manifest"]["found"] and report["manifest"]["counts_agree"], report["manifest"]
    lengths = report["lengths"]["responses"]["characters"]
    assert lengths["n"] == len(expected["responses"]) == report["funnel"]["rewrite"]
    assert lengths["max"] == max(len(r) for r in expected["responses"])
    assert report["sample"]["of"] == report["funnel"]["rewrite"]
    # Each figure's section is there, with numbers in range.
    assert 0 <= report["faithfulness"]["responses_with_unsupported_tokens"] <= report["sample"]["size"]
    assert report["diversity"]["instructions"]["unique_trigrams_per_1k"] > 0
    assert report["throughput"]["generate"]["completion_tokens"] > 0
    assert len(report["examples"]) == min(10, report["funnel"]["rewrite"])
    assert report["embeddings"]["enabled"] is True, report["embeddings"]  # `make test` installs the extra
    for kind in ("instructions", "responses"):
        assert 0 < report["embeddings"][kind]["mean_pairwise_cosine_distance"] <= 2


def check_page_renders(html: Path, report: dict, screenshot: Path) -> None:
    rendered = render(html, screenshot)
    assert sorted(i["figure"] for i in rendered.images) == report["figures"]
    broken = [i for i in rendered.images if not (i["complete"] and i["width"] > 100 and i["height"] > 100)]
    assert not broken, broken
    assert not [m for m in rendered.console if m[0] in ("error", "warning")], rendered.console
    assert not rendered.page_errors, rendered.page_errors
    assert not rendered.requests, rendered.requests  # self-contained: nothing fetched
    assert screenshot.stat().st_size > 50_000
