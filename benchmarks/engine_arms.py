"""The bare-engine arms of the throughput benchmark, each run as its own process.

ceiling  One vLLM engine (bft's own driver, ``engines/vllm_engine.py``), started before
         the clock runs, fed every document's three-pass program at once (generate -> parse -> curate -> parse -> rewrite, each
         document's next pass submitted when its previous one returns, with bft's own
         prompts, sampling and parsers: ``bft.engines.programs``): the most this engine
         can do with this work. Its clock is the programs alone.
naive    What a user writes by hand: load the model, read the documents, and for each
         stage call ``LLM.generate`` on fixed-size batches, one after another, keep what
         parses, write the stage's Parquet, go on. The clock includes loading the model.

Both take the documents bft's filters kept in the bft run of the same size.

Usage: python benchmarks/engine_arms.py {ceiling,naive} --config C --run-dir R --out J [--set k=v ...]
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from arm_cli import parse_args, single_engine

from bft.config import BftConfig
from bft.engines.programs import Passes, run_passes
from bft.engines.vllm_engine import engine_kwargs, generate, sampling_params, start_engine
from bft.planning import load_templates
from bft.stages import FOLDERS, LLM_STAGES, STEPS
from bft.steps.llm import EngineReply, build_request, outcome
from bft.storage import Storage, join
from bft.writers.parquet import parquet_files


def documents(cfg: BftConfig, run_dir: str) -> list[dict]:
    """The documents that entered generate in the bft run (its filter's kept rows)."""
    storage = Storage(cfg.storage)
    tables = []
    for uri in sorted(parquet_files(storage, join(run_dir, FOLDERS["filter"]))):
        with storage.open(uri, "rb") as fh:
            tables.append(pq.read_table(fh))
    rows = pa.concat_tables(tables, promote_options="default").to_pylist() if tables else []
    return sorted(rows, key=lambda r: (r["source"], r["source_row"]))


def one_engine(cfg: BftConfig) -> Any:
    """The stage settings of the one engine all passes use (the benchmark compares one
    model used three times)."""
    stage = single_engine(cfg)
    os.environ.update(stage.env_vars)  # before vLLM is imported: it reads them at import
    return stage


def empty_counts() -> dict[str, dict[str, Any]]:
    return {name: {"rows_in": 0, "rows_out": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
            for name in LLM_STAGES}


def count_reply(counts: dict[str, Any], reply: EngineReply) -> None:
    counts["rows_in"] += 1
    counts["prompt_tokens"] += reply.prompt_tokens or 0
    counts["completion_tokens"] += reply.completion_tokens or 0
    counts["cached_tokens"] += reply.cached_tokens or 0


def ceiling(cfg: BftConfig, rows: list[dict]) -> dict[str, Any]:
    stage = one_engine(cfg)
    passes = Passes(LLM_STAGES, cfg, load_templates(cfg))
    counts = empty_counts()

    async def main() -> tuple[float, float]:
        started = time.perf_counter()
        engine = start_engine(stage)
        startup = time.perf_counter() - started
        ids = iter(range(10**9))

        async def submit(name: str, request: dict[str, Any]) -> EngineReply:
            reply = await generate(engine, str(next(ids)), request)
            count_reply(counts[name], reply)
            return reply

        def on_result(name: str, kept: bool, _record: dict, _started: float) -> None:
            counts[name]["rows_out"] += int(kept)

        clock = time.perf_counter()
        await asyncio.gather(*(run_passes(row, 0, passes, submit, on_result) for row in rows))
        wall = time.perf_counter() - clock
        engine.shutdown()
        return startup, wall

    startup, wall = asyncio.run(main())
    return {"stages": counts, "wall_s": wall, "engine_startup_s": round(startup, 2)}


def naive(cfg: BftConfig, rows: list[dict], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    stage_cfg = one_engine(cfg)
    from vllm import LLM

    llm = LLM(model=stage_cfg.model, **engine_kwargs(stage_cfg))
    startup = time.perf_counter() - started
    templates = load_templates(cfg)
    counts = empty_counts()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in LLM_STAGES:
        step, stage = STEPS[name], cfg.llm_stage(name)
        kept_rows = []
        for i in range(0, len(rows), stage.batch_size):
            chunk = rows[i:i + stage.batch_size]
            requests = [build_request(row, step, cfg, templates) for row in chunk]
            outputs = llm.generate([r["prompt"] for r in requests],
                                   [sampling_params(r["sampling_params"], final_only=False) for r in requests],
                                   use_tqdm=False)
            for row, output in zip(chunk, outputs):
                reply = EngineReply(text=output.outputs[0].text, prompt_tokens=len(output.prompt_token_ids),
                                    completion_tokens=len(output.outputs[0].token_ids),
                                    cached_tokens=output.num_cached_tokens,
                                    finish_reason=output.outputs[0].finish_reason)
                kept, record = outcome(row, step, stage, reply)
                count_reply(counts[name], reply)
                counts[name]["rows_out"] += int(kept)
                if kept:
                    kept_rows.append(record)
        if kept_rows:
            pq.write_table(pa.Table.from_pylist(kept_rows), out_dir / f"{name}.parquet")
        rows = kept_rows
    return {"stages": counts, "wall_s": time.perf_counter() - started, "engine_startup_s": round(startup, 2)}


def main() -> None:
    args, cfg = parse_args(["ceiling", "naive"], __doc__)
    rows = documents(cfg, args.run_dir)
    if args.arm == "ceiling":
        result = ceiling(cfg, rows)
    else:
        result = naive(cfg, rows, Path(args.out).with_suffix("") / "parquet")
    result["docs"] = len(rows)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
