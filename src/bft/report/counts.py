"""Counts and distributions: the funnel, drops, curation scores, lengths, throughput."""

from __future__ import annotations

from collections import Counter
from statistics import mean
from typing import Any

import numpy as np

from bft.stages import ORDER


def distribution(values: list[float]) -> dict[str, Any]:
    """Summary of a list of numbers (``n`` 0 and no other keys when empty)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "mean": round(mean(ordered), 3), "min": ordered[0], "p10": quantile(0.1),
            "median": quantile(0.5), "p90": quantile(0.9), "max": ordered[-1]}


def _stages(tallies: dict[str, Any], manifest: dict[str, Any] | None) -> list[str]:
    """The stages this run ran: all, or from ``--from-stage`` on (the manifest says; without
    one, from the first stage that left anything)."""
    if manifest and manifest.get("stages"):
        return [stage for stage in ORDER if stage in manifest["stages"]]
    ran = [stage for stage in ORDER
           if stage in tallies and (tallies[stage].out or tallies[stage].dropped or tallies[stage].rows_in)]
    return list(ORDER[ORDER.index(ran[0]):]) if ran else []


def funnel(tallies: dict[str, Any], manifest: dict[str, Any] | None) -> dict[str, int]:
    """Rows each stage passed on, from the files it wrote (``read``: rows parsed)."""
    return {stage: tallies[stage].out if stage in tallies else 0 for stage in _stages(tallies, manifest)}


def documents_in(tallies: dict[str, Any], manifest: dict[str, Any] | None) -> int:
    """Rows entering the first stage: input rows, or the restart stage's input."""
    stages = _stages(tallies, manifest)
    if not stages:
        return 0
    if stages[0] == "read":
        return tallies["read"].rows_in or 0 if "read" in tallies else 0
    first = stages[0]
    if manifest:
        return manifest["stages"][first]["in"]
    return tallies[first].out + sum(tallies[first].dropped.values())


def drops(tallies: dict[str, Any]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Drops by reason (all stages) and by stage, then reason."""
    by_reason: Counter[str] = Counter()
    by_stage: dict[str, dict[str, int]] = {}
    for stage in ORDER:
        if stage in tallies and tallies[stage].dropped:
            by_stage[stage] = dict(sorted(tallies[stage].dropped.items()))
            by_reason.update(tallies[stage].dropped)
    return dict(sorted(by_reason.items())), by_stage


def manifest_check(manifest: dict[str, Any] | None, counts: dict[str, int],
                   dropped_by_stage: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Does the manifest say what the files say? (It should: it was computed from them.)"""
    if manifest is None:
        return {"found": False}
    differences = []
    for stage, entry in manifest.get("stages", {}).items():
        if counts.get(stage, 0) != entry["out"]:
            differences.append(f"{stage}: manifest out {entry['out']}, files {counts.get(stage, 0)}")
        if dropped_by_stage.get(stage, {}) != entry["dropped_by_reason"]:
            differences.append(f"{stage}: manifest drops {entry['dropped_by_reason']}, "
                               f"files {dropped_by_stage.get(stage, {})}")
    return {"found": True, "reconciled": manifest.get("reconciled"), "counts_agree": not differences,
            "differences": differences}


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Correlation coefficient; ``None`` under 3 points or when either side is constant."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 3 or not x.std() or not y.std():
        return None
    return round(float(np.corrcoef(x, y)[0, 1]), 3)


def score_summary(scores: list[int], doc_chars: list[int], unparseable: int, out_of_range: int,
                  threshold: int | None) -> dict[str, Any]:
    """Histogram of curate scores 1-5, the share of ratings with no readable score, and
    how score relates to document length."""
    rated = len(scores) + unparseable + out_of_range
    histogram = {str(s): scores.count(s) for s in range(1, 6)}
    by_score = {str(s): distribution([c for sc, c in zip(scores, doc_chars) if sc == s]) for s in range(1, 6)}
    return {
        "rated": rated,
        "histogram": histogram,
        "unparseable": unparseable,
        "out_of_range": out_of_range,
        "unparseable_share": round(unparseable / rated, 4) if rated else None,
        "mean": round(mean(scores), 3) if scores else None,
        "threshold": threshold,
        "kept_share": round(sum(1 for s in scores if threshold and s >= threshold) / rated, 4)
        if rated and threshold else None,
        "document_chars_by_score": by_score,
        "score_vs_document_chars_pearson": pearson(scores, doc_chars),
    }


def throughput(manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per stage: rows, wall time, rows/s and tokens/s, from the manifest."""
    if not manifest:
        return {}
    out = {}
    for stage, entry in manifest.get("stages", {}).items():
        wall = entry.get("wall_s") or 0.0
        row: dict[str, Any] = {"in": entry["in"], "out": entry["out"], "wall_s": wall,
                               "rows_per_s": round(entry["in"] / wall, 3) if wall else None}
        if "prompt_tokens" in entry:
            row["prompt_tokens"] = entry["prompt_tokens"]
            row["completion_tokens"] = entry["completion_tokens"]
            row["prompt_tokens_per_s"] = round(entry["prompt_tokens"] / wall, 1) if wall else None
            row["completion_tokens_per_s"] = round(entry["completion_tokens"] / wall, 1) if wall else None
            # Share of prompt tokens the engine served from its prefix cache (None: not reported).
            cached = entry.get("cached_prompt_tokens")
            row["cached_prompt_tokens"] = cached
            row["prefix_cache_hit_share"] = (round(cached / entry["prompt_tokens"], 4)
                                             if cached is not None and entry["prompt_tokens"] else None)
        out[stage] = row
    return out
