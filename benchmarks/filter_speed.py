"""Filter speed and funnel: documents per second per core through the filter step (length,
segmentation, quality, language ID, token budget, exact and near dedup, Parquet writes) on
``../shared/webdocs/``, and what it keeps and drops.

    .venv/bin/python benchmarks/filter_speed.py --model .cache/tiny-model [--repeat 3]

The step runs in this one process (one core) on the real crawl sample, read by bft's
readers; the dedup actors run in a local Ray instance (their calls are part of the time).
Prints JSON: documents in, rows out (segments included), drops by reason, seconds and
documents/s per core (the best of ``--repeat`` passes, each into a fresh run folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEBDOCS = ROOT.parent / "shared" / "webdocs"


def read_documents(storage, paths: list[Path]) -> list[dict]:
    from bft.readers import ColumnMapping, read_file

    docs = []
    for path in paths:
        for chunk, _, _ in read_file(storage, str(path), "auto", ColumnMapping(), 1000):
            docs += chunk
    return docs


def one_pass(cfg, storage, docs: list[dict], templates, budgets) -> dict:
    import pyarrow.parquet as pq

    from bft.context import RunContext
    from bft.filters.dedup import Deduplicator
    from bft.schema import DOC_COLUMNS, to_table
    from bft.steps.filter import filter_documents

    extra = {}
    try:
        from bft.filters.near_dedup import NearDeduplicator
        if cfg.filters.near_dedup is not None:
            extra["near_dedup"] = NearDeduplicator.start(cfg.filters.near_dedup)
    except ImportError:  # bft before near-dedup: measure what it had
        pass
    run = tempfile.mkdtemp(prefix="bft-filter-speed-")
    ctx = RunContext(config=cfg, storage=storage, run_uri=run, templates=templates, token_budgets=budgets,
                     dedup=Deduplicator.start(cfg.filters.dedup_shards), **extra)
    # Actors start once per run, not per batch: wait for them before the clock starts.
    import ray

    ray.get([shard.claim.remote([]) for d in (ctx.dedup, getattr(ctx, "near_dedup", None)) if d is not None for shard in d.shards])
    batches = [docs[i:i + cfg.input.rows_per_block] for i in range(0, len(docs), cfg.input.rows_per_block)]
    started = time.perf_counter()
    out_rows = 0
    for batch in batches:
        out_rows += filter_documents(to_table(batch, DOC_COLUMNS), ctx).num_rows
    seconds = time.perf_counter() - started
    for actor in [ctx.dedup, getattr(ctx, "near_dedup", None)]:
        if actor is not None:
            actor.stop()
    dropped = pq.read_table(f"{run}/dropped").to_pylist() if Path(f"{run}/dropped").exists() else []
    kept = pq.read_table(f"{run}/filtered").to_pylist() if Path(f"{run}/filtered").exists() else []
    return {"seconds": round(seconds, 3), "kept": out_rows,
            "segments_kept": sum(1 for r in kept if r.get("segment") is not None),
            "segmented_documents": len({(r["source"], r["source_row"]) for r in kept + dropped
                                        if r.get("segment") is not None}),
            "dropped_by_reason": dict(sorted(Counter(r["reason"] for r in dropped).items()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="tokenizer/model folder (the token budget)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="config overrides, as for bft run")
    args = parser.parse_args(argv)
    if not WEBDOCS.exists():
        print(f"{WEBDOCS} not found", file=sys.stderr)
        return 2

    import ray

    from bft.config import StorageConfig, load_config
    from bft.filters.token_length import token_budgets
    from bft.planning import load_templates
    from bft.storage import Storage

    cfg = load_config(None, [f"model={args.model}", *args.set])
    storage = Storage(StorageConfig())
    docs = read_documents(storage, sorted(p for p in WEBDOCS.iterdir() if p.suffix in (".gz", ".parquet")))
    templates = load_templates(cfg)
    budgets = token_budgets(cfg, templates)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    passes = [one_pass(cfg, storage, docs, templates, budgets) for _ in range(args.repeat)]
    ray.shutdown()
    best = min(passes, key=lambda p: p["seconds"])
    print(json.dumps({"documents": len(docs), **best, "docs_per_s_per_core": round(len(docs) / best["seconds"], 1),
                      "all_seconds": [p["seconds"] for p in passes]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
