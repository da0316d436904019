"""The training record's figure: loss per step (PNG)."""

from __future__ import annotations

import io
from typing import Any


def plot_loss(history: list[dict[str, Any]], title: str) -> bytes:
    """PNG bytes of the loss curve (one point per step, epochs marked)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], marker="o", markersize=3, linewidth=1.2)
    for previous, current in zip(history, history[1:]):
        if current["epoch"] != previous["epoch"]:
            ax.axvline(previous["step"] + 0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("step (dotted lines: epochs)")
    ax.set_ylabel("training loss (target tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
