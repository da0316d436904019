"""The report's figures, each rendered to PNG bytes (embedded in the HTML as data URIs)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from bft.stages import ORDER  # noqa: E402

# One colour per stage, in pipeline order.
_PALETTE = ["#8c8c8c", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#937860", "#da8bc3"]
STAGE_COLORS = {stage: _PALETTE[i % len(_PALETTE)] for i, stage in enumerate(ORDER)}
KIND_COLORS = {"documents": "#4c72b0", "instructions": "#55a868", "responses": "#c44e52"}


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return buf.getvalue()


def _empty(ax: Any, message: str = "no data") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def funnel(documents_in: int, counts: dict[str, int]) -> bytes:
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    labels = ["input", *counts]
    values = [documents_in, *counts.values()]
    bars = ax.bar(labels, values, color=["#bbbbbb", *(STAGE_COLORS.get(s, "#999") for s in counts)])
    for bar, value in zip(bars, values):
        share = f"\n{value / documents_in:.0%}" if documents_in and bar is not bars[0] else ""
        ax.annotate(f"{value}{share}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("documents")
    ax.set_title("Documents after each stage")
    ax.margins(y=0.15)
    return _png(fig)


def drops(dropped_by_stage: dict[str, dict[str, int]]) -> bytes:
    items = [(f"{stage}: {reason}", n, stage) for stage, reasons in dropped_by_stage.items()
             for reason, n in reasons.items()]
    fig, ax = plt.subplots(figsize=(5.2, 0.3 * max(len(items), 3) + 1.2))
    if not items:
        _empty(ax, "nothing dropped")
    else:
        ax.barh([i[0] for i in items], [i[1] for i in items], color=[STAGE_COLORS.get(i[2], "#999") for i in items])
        ax.invert_yaxis()
        for y, (_, n, _) in enumerate(items):
            ax.annotate(str(n), (n, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlabel("documents dropped")
        ax.margins(x=0.12)
    ax.set_title("Drops by stage and reason")
    return _png(fig)


def scores(summary: dict[str, Any]) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = [*summary["histogram"], "no score"]
    values = [*summary["histogram"].values(), summary["unparseable"] + summary["out_of_range"]]
    threshold = summary.get("threshold")
    colors = ["#55a868" if threshold and label.isdigit() and int(label) >= threshold else "#c44e52"
              if label.isdigit() else "#8c8c8c" for label in labels]
    ax.bar(labels, values, color=colors)
    ax.set_xlabel("curation score" + (f" (kept: ≥ {threshold})" if threshold else ""))
    ax.set_ylabel("pairs")
    ax.set_title("Curation scores")
    return _png(fig)


def score_vs_length(scores: list[int], doc_chars: list[int]) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    groups = [[c for s, c in zip(scores, doc_chars) if s == score] for score in range(1, 6)]
    if not scores:
        _empty(ax)
    else:
        ax.boxplot([g or [float("nan")] for g in groups], tick_labels=[str(s) for s in range(1, 6)])
        ax.set_xlabel("curation score")
        ax.set_ylabel("document characters")
    ax.set_title("Score vs document length")
    return _png(fig)


def lengths(series: dict[str, dict[str, list[int]]]) -> bytes:
    """``series[unit][kind]``: unit "characters"/"tokens", kind documents/instructions/responses."""
    units = list(series)
    fig, axes = plt.subplots(len(units), 3, figsize=(10, 2.6 * len(units)), squeeze=False)
    for r, unit in enumerate(units):
        for c, kind in enumerate(KIND_COLORS):
            ax = axes[r][c]
            values = series[unit].get(kind) or []
            if values:
                ax.hist(values, bins=30, color=KIND_COLORS[kind])
            else:
                _empty(ax, "not measured" if kind not in series[unit] else "no data")
            ax.set_title(f"{kind} ({unit})", fontsize=10)
    return _png(fig)


def leading_words(top: list[list[Any]]) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 0.3 * max(len(top), 3) + 1))
    if not top:
        _empty(ax)
    else:
        ax.barh([w for w, _ in top], [n for _, n in top], color=KIND_COLORS["instructions"])
        ax.invert_yaxis()
        ax.set_xlabel("instructions")
    ax.set_title("Leading words of instructions")
    return _png(fig)


def faithfulness(shares: list[float], unsupported: list[int]) -> bytes:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    if shares:
        left.hist(shares, bins=[i / 20 for i in range(21)], color=KIND_COLORS["responses"])
        left.set_xlabel("share of response trigrams found in the document")
        left.set_ylabel("responses")
    else:
        _empty(left)
    left.set_title("Copied from the document")
    if unsupported:
        top = max(unsupported)
        right.hist(unsupported, bins=range(0, top + 2), color="#dd8452", align="left")
        right.set_xlabel("numbers/names not in the document")
        right.set_ylabel("responses")
    else:
        _empty(right)
    right.set_title("Unsupported tokens per response")
    return _png(fig)


def throughput(rows: dict[str, dict[str, Any]]) -> bytes:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    stages = [s for s, r in rows.items() if r.get("wall_s")]
    if stages:
        left.bar(stages, [rows[s]["wall_s"] for s in stages], color=[STAGE_COLORS.get(s, "#999") for s in stages])
        left.set_ylabel("seconds (stage wall time)")
    else:
        _empty(left)
    left.set_title("Time per stage")
    llm = [s for s in stages if "completion_tokens" in rows[s]]
    if llm:
        x = range(len(llm))
        right.bar([i - 0.2 for i in x], [rows[s]["prompt_tokens_per_s"] or 0 for s in llm], width=0.4,
                  label="prompt", color="#4c72b0")
        right.bar([i + 0.2 for i in x], [rows[s]["completion_tokens_per_s"] or 0 for s in llm], width=0.4,
                  label="completion", color="#dd8452")
        right.set_xticks(list(x), llm)
        right.set_ylabel("tokens/s")
        right.legend(fontsize=8)
    else:
        _empty(right)
    right.set_title("Tokens per second")
    return _png(fig)


def embeddings(points: dict[str, Any]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for kind, xy in points.items():
        if len(xy):
            ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.6, label=f"{kind} ({len(xy)})", color=KIND_COLORS[kind])
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    ax.legend(fontsize=8)
    ax.set_title("Embeddings, first two principal components")
    return _png(fig)
