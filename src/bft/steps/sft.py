"""SFT: the final dataset, as chat messages plus provenance."""

from __future__ import annotations

import time

import pyarrow as pa

from bft.context import RunContext
from bft.stages import LLM_STAGES


def to_messages(system_prompt: str, instruction: str, response: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": instruction},
                       {"role": "assistant", "content": response}]


def build_sft(batch: pa.Table, ctx: RunContext) -> pa.Table:
    """Write the final examples; returns only a row count so the driver receives no data."""
    started = time.time()
    cfg = ctx.config
    rows = [
        {
            "messages": to_messages(cfg.output.system_prompt, row["instruction"], row["response"]),
            "id": row["id"], "url": row["url"], "source": row["source"],
            "source_row": row["source_row"], "score": row["score"],
            **{f"{name}_model": cfg.llm_stage(name).model for name in LLM_STAGES},
            **{f"{name}_prompt_sha256": ctx.templates[name].sha256 for name in LLM_STAGES},
        }
        for row in batch.to_pylist()
    ]
    ctx.writer.write("sft", rows, [], started)
    return pa.table({"sft_rows": [len(rows)]})
