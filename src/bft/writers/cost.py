"""The manifest's ``cost``: GPU-seconds per LLM stage and, with ``cost.gpu_hour_usd``, the
estimated cost of the run and per 1,000 final pairs.

Replicas of a shared pool (``engines/shared.py``) record how long they held their
accelerators (``replica_time.py``); a replica serving several stages splits its time by
the stages' share of its tokens (prompt + completion). ``ray.data.llm`` pools run no code
of ours in their replicas, so for them the time is estimated as the time the stage had
batches in hand (the manifest's ``active_s``) x its maximum replicas (``measured: false``), the time counted once
however many batches overlapped and without the gaps between attempts: an upper bound
when the pool did not grow to its maximum.
"""

from __future__ import annotations

from typing import Any

from bft.stages import LLM_STAGES
from bft.storage import Storage
from bft.writers.replica_time import read_replicas


def _tokens(entry: dict[str, Any]) -> int:
    return int(entry.get("prompt_tokens") or 0) + int(entry.get("completion_tokens") or 0)


def engine_cost(cfg: Any, storage: Storage, run_uri: str, stages: dict[str, dict[str, Any]],
                final_rows: int) -> dict[str, Any]:
    replica_s = {name: 0.0 for name in LLM_STAGES if name in stages}
    gpu_s = dict(replica_s)
    measured = {name: False for name in replica_s}
    for record in read_replicas(storage, run_uri):
        span = max(float(record.get("last_active", 0)) - float(record.get("started_at", 0)), 0.0)
        names = [name for name in record.get("stages", []) if name in replica_s]
        if not names:
            continue
        total = sum(_tokens(stages[name]) for name in names)
        for name in names:
            share = _tokens(stages[name]) / total if total else 1 / len(names)
            replica_s[name] += span * share
            gpu_s[name] += span * share * float(record.get("gpus", 0))
            measured[name] = True
    for name in replica_s:
        if not measured[name] and stages[name].get("in"):
            stage = cfg.llm_stage(name)
            replicas = max(stage.replicas)
            replica_s[name] = stages[name].get("active_s", 0.0) * replicas
            gpu_s[name] = replica_s[name] * stage.resources.gpus_per_worker * stage.workers_per_replica
    gpu_total = sum(gpu_s.values())
    price = cfg.cost.gpu_hour_usd
    usd = gpu_total / 3600 * price if price is not None else None
    return {
        "gpu_seconds": {name: round(v, 1) for name, v in gpu_s.items()},
        "gpu_seconds_total": round(gpu_total, 1),
        "replica_seconds": {name: round(v, 1) for name, v in replica_s.items()},
        "measured": measured,
        "gpu_hour_usd": price,
        "usd": round(usd, 4) if usd is not None else None,
        "usd_per_1000_pairs": round(usd / final_rows * 1000, 4) if usd is not None and final_rows else None,
    }


def cost_line(cost: dict[str, Any] | None) -> str | None:
    """The summary's line about it."""
    if not cost or not cost.get("replica_seconds"):
        return None
    per_stage = ", ".join(f"{name} {v:.0f}" for name, v in cost["gpu_seconds"].items())
    estimated = [name for name, ok in cost["measured"].items() if not ok]
    note = f" (estimated for {', '.join(estimated)})" if estimated else ""
    if not cost["gpu_seconds_total"]:
        replicas = ", ".join(f"{name} {v:.0f}" for name, v in cost["replica_seconds"].items())
        return f"engine time: 0 GPU-seconds (engines on CPU); replica-seconds: {replicas}{note}"
    line = f"engine time: {cost['gpu_seconds_total']:.0f} GPU-seconds ({per_stage}){note}"
    if cost["usd_per_1000_pairs"] is not None:
        line += (f"; at ${cost['gpu_hour_usd']:g}/GPU-hour: ${cost['usd']:.2f} for the run, "
                 f"${cost['usd_per_1000_pairs']:.2f} per 1,000 pairs")
    elif cost["gpu_hour_usd"] is None:
        line += "; set cost.gpu_hour_usd for a cost estimate"
    return line
