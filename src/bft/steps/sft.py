"""SFT: the final dataset, as chat messages plus provenance."""

from __future__ import annotations

import time

import pyarrow as pa

from bft.config import BftConfig
from bft.context import RunContext
from bft.seed import SeedSet
from bft.stages import LLM_STAGES
from bft.storage import Storage
from bft.writers.parquet import StageWriter


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
            "source_row": row["source_row"], "segment": row.get("segment"), "score": row["score"],
            "origin": "web",
            **{f"{name}_model": cfg.llm_stage(name).model for name in LLM_STAGES},
            **{f"{name}_prompt_sha256": ctx.templates[name].sha256 for name in LLM_STAGES},
        }
        for row in batch.to_pylist()
    ]
    ctx.writer.write("sft", rows, [], started)
    return pa.table({"sft_rows": [len(rows)]})


def seed_rows(cfg: BftConfig, seeds: SeedSet) -> list[dict]:
    """The seed pairs as final examples (``output.seed_mix``), with their own system prompt."""
    return [{"messages": to_messages(cfg.output.seed_system_prompt, pair.instruction, pair.response),
             "id": pair.id, "url": None, "source": pair.source, "source_row": pair.source_row,
             "score": None, "origin": "seed"} for pair in seeds.pairs]


def write_seed_pairs(storage: Storage, run_uri: str, cfg: BftConfig, seeds: SeedSet) -> int:
    """Write the seed pairs into the final dataset; returns how many."""
    rows = seed_rows(cfg, seeds)
    StageWriter(storage, run_uri).write_seed_pairs(rows)
    return len(rows)
