"""Filter: length bounds, quality heuristics, exact dedup, token budget, in that order
(cheapest first; dedup only sees documents that passed the text checks, so a rejected
copy never shadows a good one)."""

from __future__ import annotations

import time

import pyarrow as pa

from bft.context import RunContext
from bft.filters.base import Drop
from bft.filters.length import check_length
from bft.filters.quality import check_quality
from bft.filters.token_length import check_token_lengths
from bft.schema import FILTERED_COLUMNS, to_table


def filter_documents(batch: pa.Table, ctx: RunContext) -> pa.Table:
    started = time.time()
    cfg = ctx.config.filters
    kept: list[dict] = []
    dropped: list[dict] = []

    def drop(row: dict, why: Drop) -> None:
        dropped.append({**row, **why.fields, "reason": why.reason, "detail": why.detail})

    candidates = []
    for row in batch.to_pylist():
        failed = check_length(row["text"], cfg) or check_quality(row["text"], cfg)
        if failed:
            drop(row, failed)
        else:
            candidates.append(row)

    if cfg.dedup and ctx.dedup is not None and candidates:
        unique = []
        for row, owner in zip(candidates, ctx.dedup.duplicates_of(candidates)):
            if owner is None:
                unique.append(row)
            else:
                drop(row, Drop("duplicate", f"same normalized text as document {owner}"))
        candidates = unique

    if candidates:
        for row, (failed, n_tokens) in zip(
                candidates, check_token_lengths([r["text"] for r in candidates], ctx.token_budgets)):
            if failed:
                drop(row, failed)
            else:
                kept.append({**row, "n_chars": len(row["text"]), "n_tokens": n_tokens})

    ctx.writer.write("filter", kept, dropped, started)
    return to_table(kept, FILTERED_COLUMNS)
