"""Filter: segmentation of long documents, length bounds, quality heuristics, language,
token budget, exact dedup, near dedup, in that order (cheapest first; the dedups only see
documents that passed every other check, so a rejected copy never shadows a good one).

A document over ``filters.max_chars`` is cut into segments here (``filters/segment.py``);
each segment is a row of its own from then on (``segment`` set, id ``<doc id>#<n>``), so
a filter batch may write more rows than it received. On resume, segments an earlier
attempt finished are left out as the document is cut again.
"""

from __future__ import annotations

import time

import pyarrow as pa

from bft.context import RunContext
from bft.filters.base import Drop
from bft.filters.language import check_language
from bft.filters.length import check_length
from bft.filters.quality import check_quality
from bft.filters.segment import segment_document
from bft.filters.token_length import check_token_lengths
from bft.schema import FILTERED_COLUMNS, to_table
from bft.steps.read import unfinished


def filter_documents(batch: pa.Table, ctx: RunContext) -> pa.Table:
    started = time.time()
    cfg = ctx.config.filters
    dropped: list[dict] = []

    def drop(row: dict, why: Drop) -> None:
        dropped.append({**row, **why.fields, "reason": why.reason, "detail": why.detail})

    rows: list[dict] = []
    segments: list[dict] = []
    for row in batch.to_pylist():
        if len(row["text"]) > cfg.max_chars:
            parts = segment_document(row, cfg)
            if isinstance(parts, Drop):
                drop(row, parts)
            else:
                segments += parts
        else:
            rows.append(row)
    # Whole documents an earlier attempt finished were left out by read; segments only
    # show once cut.
    rows += unfinished(segments, "filter", ctx.finished_rows())

    candidates = []
    for row in rows:
        failed = check_length(row["text"], cfg) or check_quality(row["text"], cfg) or check_language(row["text"], cfg)
        if failed:
            drop(row, failed)
        else:
            candidates.append(row)

    passed = []
    if candidates:
        for row, (failed, n_tokens) in zip(
                candidates, check_token_lengths([r["text"] for r in candidates], ctx.token_budgets)):
            if failed:
                drop(row, failed)
            else:
                passed.append({**row, "n_chars": len(row["text"]), "n_tokens": n_tokens})

    if cfg.dedup and ctx.dedup is not None and passed:
        unique = []
        for row, owner in zip(passed, ctx.dedup.duplicates_of(passed)):
            if owner is None:
                unique.append(row)
            else:
                drop(row, Drop("duplicate", f"same normalized text as document {owner}"))
        passed = unique

    if cfg.near_dedup is not None and ctx.near_dedup is not None and passed:
        unique = []
        for row, owner in zip(passed, ctx.near_dedup.near_duplicates_of(passed)):
            if owner is None:
                unique.append(row)
            else:
                drop(row, Drop("near_duplicate", f"near-duplicate of document {owner} (MinHash LSH, "
                                                 f"filters.near_dedup.threshold {cfg.near_dedup.threshold})"))
        passed = unique

    ctx.writer.write("filter", passed, dropped, started)
    return to_table(passed, FILTERED_COLUMNS)
