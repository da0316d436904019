"""The engines layer: how the LLM stages get vLLM engines, one file per way.

- ``per_stage.py``: one ``ray.data.llm`` pool of replicas per stage, chained by Ray Data;
- ``shared.py``: one pool for consecutive stages on the same model and engine settings,
  each document running all its passes on one replica (``programs.py``);
- ``vllm_engine.py``: what both need of vLLM (engine arguments, resources, requests).

``engine.sharing`` picks the layout (:func:`layout`); every layout writes the same stage
files, drops and manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bft.context import RunContext


@dataclass(frozen=True)
class Pool:
    """One engine pool of a run: the LLM stages it serves, in order, and how it runs them."""

    stages: tuple[str, ...]
    kind: str  # "shared" or "per_stage"


def layout(cfg: Any) -> list[Pool]:
    """The run's engine pools, in stage order (``engine.sharing``): a group of stages on
    the same engine shares a pool, unless sharing is ``per_stage``; a stage alone on its
    engine gets a ``ray.data.llm`` pool (``shared`` asks for all stages on one pool, which
    the config checks before anything starts)."""
    return [Pool(group, "shared" if len(group) > 1 or cfg.engine.sharing == "shared" else "per_stage")
            for group in cfg.engine_groups()]


def apply_pools(ds: Any, ctx: RunContext, stages: list[str], joining: Callable[[str], Any]) -> Any:
    """``ds`` (rows of the stage before the first LLM stage, or ``None``) through every
    pool, for the LLM stages in ``stages``; ``joining(stage)`` gives the rows that join the
    run at a stage (resume, ``--from-stage``), or ``None``."""
    from bft.engines import per_stage, shared

    light = ctx.config.ray.light_task_cpus
    for pool in layout(ctx.config):
        names = tuple(name for name in pool.stages if name in stages)
        if not names:
            continue
        if pool.kind == "per_stage":
            (name,) = names
            ds = union(ds, joining(name))
            if ds is not None:
                ds = per_stage.apply(ds, name, ctx)
            continue
        branches = [shared.conform(ds, names, names[0], light)] if ds is not None else []
        for name in names:
            if (rows := joining(name)) is not None:
                branches.append(shared.conform(rows, names, name, light))
        ds = None
        for branch in branches:
            ds = union(ds, branch)
        if ds is not None:
            ds = shared.apply(ds, names, ctx)
    return ds


def union(ds: Any, other: Any) -> Any:
    """Two datasets as one stream; either may be ``None`` (no rows)."""
    if other is None:
        return ds
    return other if ds is None else ds.union(other)
