"""Column names and Arrow schemas of everything bft writes.

Stage outputs are cumulative: each stage's Parquet holds the document columns plus the
columns of every stage so far, so any stage directory is a complete restart point.
"""

from __future__ import annotations

import pyarrow as pa

# Document columns, set by the reader.
DOC_COLUMNS = {
    "id": pa.string(),
    "url": pa.string(),
    "source": pa.string(),  # the input file the row came from
    "source_row": pa.int64(),  # its line (JSONL) or row (Parquet) number there, from 1
    "text": pa.string(),
}

FILTERED_COLUMNS = {**DOC_COLUMNS, "n_chars": pa.int64(), "n_tokens": pa.int64()}

GENERATED_COLUMNS = {
    **FILTERED_COLUMNS,
    "instruction": pa.string(),
    "generate_raw": pa.string(),
    "generate_prompt_tokens": pa.int64(),
    "generate_completion_tokens": pa.int64(),
}

CURATED_COLUMNS = {
    **GENERATED_COLUMNS,
    "score": pa.int64(),
    "curate_reasoning": pa.string(),
    "curate_raw": pa.string(),
    "curate_prompt_tokens": pa.int64(),
    "curate_completion_tokens": pa.int64(),
}

REWRITTEN_COLUMNS = {
    **CURATED_COLUMNS,
    "response": pa.string(),
    "rewrite_raw": pa.string(),
    "rewrite_prompt_tokens": pa.int64(),
    "rewrite_completion_tokens": pa.int64(),
}

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

SFT_COLUMNS = {
    "messages": pa.list_(MESSAGE_TYPE),
    "id": pa.string(),
    "url": pa.string(),
    "source": pa.string(),
    "source_row": pa.int64(),
    "score": pa.int64(),
    "generate_model": pa.string(),
    "curate_model": pa.string(),
    "rewrite_model": pa.string(),
    "generate_prompt_sha256": pa.string(),
    "curate_prompt_sha256": pa.string(),
    "rewrite_prompt_sha256": pa.string(),
}

# Every dropped row, whatever the stage. Nothing is lost: the text and whatever the
# stage produced so far are kept, with the reason and a human-readable detail.
DROPPED_COLUMNS = {
    "id": pa.string(),
    "url": pa.string(),
    "source": pa.string(),
    "source_row": pa.int64(),
    "stage": pa.string(),
    "reason": pa.string(),
    "detail": pa.string(),
    "text": pa.string(),
    "instruction": pa.string(),
    "score": pa.int64(),
    "raw_output": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
}

# Output directory of each stage under <output>/<run_id>/.
STAGE_DIRS = {
    "filter": "filtered",
    "generate": "generated",
    "curate": "curated",
    "rewrite": "rewritten",
    "sft": "sft",
}

STAGE_COLUMNS = {
    "filter": FILTERED_COLUMNS,
    "generate": GENERATED_COLUMNS,
    "curate": CURATED_COLUMNS,
    "rewrite": REWRITTEN_COLUMNS,
    "sft": SFT_COLUMNS,
}

# Stage order, with the stage each one reads from.
PIPELINE_ORDER = ("read", "filter", "generate", "curate", "rewrite", "sft")
PREVIOUS_STAGE = {"filter": "read", "generate": "filter", "curate": "generate",
                  "rewrite": "curate", "sft": "rewrite"}


def row_key(source: str, source_row: int) -> str:
    """Where a row came from: its identity across stages and attempts (ids are not
    unique across a crawl; the same page appears in several shards)."""
    return f"{source}#{source_row}"


def arrow_schema(columns: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(name, dtype) for name, dtype in columns.items()])


def to_table(rows: list[dict], columns: dict[str, pa.DataType]) -> pa.Table:
    """Rows (dicts) to a table with exactly ``columns``; missing values become null."""
    return pa.Table.from_pydict(
        {name: [row.get(name) for row in rows] for name in columns},
        schema=arrow_schema(columns),
    )
