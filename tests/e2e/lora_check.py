"""Greedy replies of the base model and of the base model + adapter to a run's generate
prompts, from an engine of their own: what the run's engine would have answered with and
without the adapter. ``python lora_check.py CONFIG RUN_DIR ADAPTER_DIR OUT_JSON [KEY=VALUE...]``."""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    config, run_dir, adapter_dir, out, *sets = sys.argv[1:]

    import pyarrow.parquet as pq
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from bft.config import load_config
    from bft.engines.vllm_engine import engine_kwargs, sampling_params
    from bft.planning import load_templates
    from bft.stages import STEPS
    from bft.steps.llm import build_request

    cfg = load_config(config, sets)
    rows = pq.read_table(os.path.join(run_dir, "generated")).to_pylist()
    requests = [build_request(row, STEPS["generate"], cfg, load_templates(cfg)) for row in rows]
    kwargs = {k: v for k, v in engine_kwargs(cfg.generate).items() if k != "distributed_executor_backend"}
    llm = LLM(cfg.generate.model, enable_lora=True, max_lora_rank=16, distributed_executor_backend="uni", **kwargs)
    params = sampling_params(requests[0]["sampling_params"], final_only=False)
    prompts = [r["prompt"] for r in requests]
    base = [o.outputs[0].text for o in llm.generate(prompts, params)]
    lora = [o.outputs[0].text for o in llm.generate(prompts, params, lora_request=LoRARequest("a", 1, adapter_dir))]
    with open(out, "w") as fh:
        json.dump({"run": [r["generate_raw"] for r in rows], "base": base, "lora": lora}, fh)
