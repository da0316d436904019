"""The two reference arms of the throughput benchmark, each run as its own process.

ceiling  One vLLM engine (``LLM``), started before the clock runs. For each stage, the
         exact requests bft's run sent to that stage (rebuilt from the run's per-stage
         Parquet with bft's own prompt builder and sampling) are submitted at once: the
         speed the engine alone reaches on this work.
naive    What a user writes by hand: load the model, read the documents, and for each
         stage call ``LLM.generate`` on fixed-size batches, one after another, keep what
         parses, write the stage's Parquet, go on. The clock includes loading the model.

Usage: python benchmarks/engine_arms.py {ceiling,naive} --config C --run-dir R --out J [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bft.config import BftConfig, load_config
from bft.engine import engine_kwargs
from bft.filters.base import Drop
from bft.pipeline import LLM_STEPS, load_templates
from bft.schema import PREVIOUS_STAGE, STAGE_DIRS
from bft.steps.llm import build_request
from bft.storage import Storage, join
from bft.writers.parquet import parquet_files


def stage_input(cfg: BftConfig, run_dir: str, stage: str) -> list[dict]:
    """Rows that entered ``stage`` in the bft run (its previous stage's kept rows)."""
    storage = Storage(cfg.storage)
    folder = join(run_dir, STAGE_DIRS[PREVIOUS_STAGE[stage]])
    tables = []
    for uri in sorted(parquet_files(storage, folder)):
        with storage.open(uri, "rb") as fh:
            tables.append(pq.read_table(fh))
    rows = pa.concat_tables(tables, promote_options="default").to_pylist() if tables else []
    return sorted(rows, key=lambda r: (r["source"], r["source_row"]))


def load_engine(cfg: BftConfig) -> Any:
    """One engine for all stages: the benchmark compares one model used three times."""
    stages = [getattr(cfg, step.NAME) for step in LLM_STEPS]
    if len({(s.model, json.dumps(engine_kwargs(s), sort_keys=True)) for s in stages}) != 1:
        raise SystemExit("the benchmark needs the same model and engine_kwargs for generate, curate and rewrite")
    os.environ.update(stages[0].env_vars)  # before vLLM is imported: it reads them at import
    from vllm import LLM

    return LLM(model=stages[0].model, **engine_kwargs(stages[0]))


def sampling(params: dict[str, Any]) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    params = dict(params)
    structured = params.pop("structured_outputs", None)
    if structured:
        params["structured_outputs"] = StructuredOutputsParams(**structured)
    return SamplingParams(**params)


def generate(llm: Any, requests: list[dict]) -> tuple[list[Any], dict[str, Any]]:
    """Run ``requests`` through the engine at once; outputs and their token counts."""
    started = time.perf_counter()
    outputs = llm.generate([r["prompt"] for r in requests], [sampling(r["sampling_params"]) for r in requests],
                           use_tqdm=False) if requests else []
    return outputs, {"wall_s": time.perf_counter() - started,
                     "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
                     "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def ceiling(cfg: BftConfig, run_dir: str, llm: Any) -> dict[str, Any]:
    templates = load_templates(cfg)
    stages = {}
    for step in LLM_STEPS:
        rows = stage_input(cfg, run_dir, step.NAME)
        requests = [build_request(row, step, cfg, templates) for row in rows]
        _, measured = generate(llm, requests)
        stages[step.NAME] = {"rows_in": len(rows), **measured}
    return {"stages": stages}


def naive(cfg: BftConfig, run_dir: str, llm: Any, out_dir: Path) -> dict[str, Any]:
    templates = load_templates(cfg)
    started = time.perf_counter()
    # The documents bft's filters kept: filtering is not what this arm measures.
    rows = stage_input(cfg, run_dir, "generate")
    stages = {"read": {"wall_s": time.perf_counter() - started, "rows_out": len(rows)}}
    out_dir.mkdir(parents=True, exist_ok=True)
    for step in LLM_STEPS:
        stage_cfg = getattr(cfg, step.NAME)
        measured: dict[str, Any] = {"rows_in": len(rows)}
        stage_started = time.perf_counter()
        kept = []
        for i in range(0, len(rows), stage_cfg.batch_size):
            chunk = rows[i:i + stage_cfg.batch_size]
            outputs, counts = generate(llm, [build_request(row, step, cfg, templates) for row in chunk])
            add(measured, {k: v for k, v in counts.items() if k != "wall_s"})
            for row, output in zip(chunk, outputs):
                parsed = step.parse(output.outputs[0].text, stage_cfg)
                if not isinstance(parsed, Drop):
                    kept.append({**row, **parsed})
        if kept:
            pq.write_table(pa.Table.from_pylist(kept), out_dir / f"{step.NAME}.parquet")
        measured.update(rows_out=len(kept), wall_s=time.perf_counter() - stage_started)
        stages[step.NAME] = measured
        rows = kept
    return {"stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arm", choices=["ceiling", "naive"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True, help="a finished bft run of the same config and documents")
    parser.add_argument("--out", required=True, help="JSON file for the measurements")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    llm = load_engine(cfg)
    startup = time.perf_counter() - started
    if args.arm == "ceiling":
        result = ceiling(cfg, args.run_dir, llm)
    else:
        result = naive(cfg, args.run_dir, llm, Path(args.out).with_suffix("") / "parquet")
    result["engine_startup_s"] = round(startup, 2)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
