"""Column sets and Arrow schemas that do not depend on which LLM stages a run has.

The columns of each stage's Parquet are derived in ``stages.py`` from these and from what
each LLM step declares. Stage outputs are cumulative: each stage's Parquet holds the
document columns plus the columns of every stage so far, so any stage directory is a
complete restart point.
"""

from __future__ import annotations

import pyarrow as pa

# Document columns, set by the reader.
DOC_COLUMNS = {
    "id": pa.string(),
    "url": pa.string(),
    "source": pa.string(),  # the input file the row came from
    "source_row": pa.int64(),  # its line (JSONL), row (Parquet) or record (WARC) number there, from 1
    # which part of a document cut into segments (filters.long_documents), from 1; null for
    # a whole document
    "segment": pa.int64(),
    "text": pa.string(),
}

FILTERED_COLUMNS = {**DOC_COLUMNS, "n_chars": pa.int64(), "n_tokens": pa.int64()}

# What every LLM stage records besides its own outputs (``<stage>_<suffix>``).
LLM_RECORD_COLUMNS = {
    "raw": pa.string(),  # the model's reply as it came
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    # prompt tokens vLLM served from its prefix cache (null where the engine does not say)
    "cached_tokens": pa.int64(),
}

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

# Every dropped row, whatever the stage (``stages.py`` adds, between ``text`` and
# ``raw_output``, the outputs each LLM step keeps in its drop records: the instruction, the
# score). Nothing is lost: the text and what the stages produced so far are kept, with the
# reason and a human-readable detail.
DROPPED_HEAD = {
    "id": pa.string(),
    "url": pa.string(),
    "source": pa.string(),
    "source_row": pa.int64(),
    "segment": pa.int64(),
    "stage": pa.string(),
    "reason": pa.string(),
    "detail": pa.string(),
    "text": pa.string(),
}
DROPPED_TAIL = {
    "raw_output": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "cached_tokens": pa.int64(),
}


def row_key(source: str, source_row: int, segment: int | None = None) -> str:
    """Where a row came from: its identity across stages and attempts (ids are not
    unique across a crawl; the same page appears in several shards). A segment of a
    long document is its own row."""
    return f"{source}#{source_row}" if segment is None else f"{source}#{source_row}/{segment}"


def identity(row: dict) -> tuple[str, int, int | None]:
    """A row's ``(source, source_row, segment)``."""
    return row["source"], row["source_row"], row.get("segment")


def arrow_schema(columns: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(name, dtype) for name, dtype in columns.items()])


def to_table(rows: list[dict], columns: dict[str, pa.DataType]) -> pa.Table:
    """Rows (dicts) to a table with exactly ``columns``; missing values become null."""
    return pa.Table.from_pydict(
        {name: [row.get(name) for row in rows] for name in columns},
        schema=arrow_schema(columns),
    )
