"""The stage registry is the one list of stages: folders, columns, config sections, restart
points, engine pools, the final dataset's provenance and the manifest all follow it. A
fourth LLM stage added the way the registry's docstring says (one step module, one
template, one registry entry) runs through config, the shared pool's programs, the final
dataset and a reconciled manifest without touching anything else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa

from bft import stages
from bft.schema import DOC_COLUMNS, FILTERED_COLUMNS

SRC = Path(__file__).resolve().parents[1] / "src" / "bft"


def test_everything_about_a_stage_follows_from_the_registry():
    assert stages.ORDER == ("read", "filter", "generate", "curate", "rewrite", "sft")
    assert stages.LLM_STAGES == ("generate", "curate", "rewrite")
    assert stages.RESTARTABLE == ("filter", "generate", "curate", "rewrite")
    assert stages.FOLDERS == {"filter": "filtered", "generate": "generated", "curate": "curated",
                              "rewrite": "rewritten", "sft": "sft"}
    assert stages.PREVIOUS["curate"] == "generate" and stages.PREVIOUS["sft"] == "rewrite"
    assert stages.COLUMNS["read"] == DOC_COLUMNS and stages.COLUMNS["filter"] == FILTERED_COLUMNS
    for name in stages.LLM_STAGES:
        before = stages.COLUMNS[stages.PREVIOUS[name]]
        own = stages.COLUMNS[name]
        assert list(own)[:len(before)] == list(before)  # cumulative: every stage is a restart point
        assert {f"{name}_raw", f"{name}_prompt_tokens", f"{name}_completion_tokens", f"{name}_cached_tokens",
                *stages.STEPS[name].OUTPUT_COLUMNS} == set(own) - set(before)
    sft = stages.COLUMNS["sft"]
    assert sft["messages"] == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert {f"{n}_{k}" for n in stages.LLM_STAGES for k in ("model", "prompt_sha256")} <= set(sft)
    assert stages.producer_of("instruction") == "generate" and stages.producer_of("document") is None
    assert list(stages.DROPPED_COLUMNS) == ["id", "url", "source", "source_row", "segment", "stage", "reason", "detail", "text",
                                            "instruction", "few_shot_ids", "score", "raw_output", "prompt_tokens",
                                            "completion_tokens", "cached_tokens"]


def test_a_step_placed_before_the_stage_that_makes_its_input_is_refused():
    import pytest
    from types import SimpleNamespace

    early = SimpleNamespace(NAME="polish", INPUT_COLUMNS=("text", "response"), OUTPUT_COLUMNS={})
    with pytest.raises(ValueError, match=r"'polish' reads \['response'\], which no stage before it writes"):
        stages._llm_stage(early, "polished", stages.PIPELINE[1])  # right after filter


POLISH = '''
"""Polish: tighten the rewritten answer (a fourth pass, for the registry test)."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from bft.config.models import StageConfig
from bft.filters.base import Drop

NAME = "polish"
DESCRIPTION = "Tightening the rewritten answers."
PLACEHOLDERS = {"document", "instruction", "response"}
REQUIRED_PLACEHOLDERS = {"instruction", "response"}
INPUT_COLUMNS = ("text", "instruction", "response")
OUTPUT_COLUMNS = {"response": pa.string(), "polish_changed": pa.bool_()}
DROP_COLUMNS = ()


class Config(StageConfig):
    stage_defaults: ClassVar[dict[str, Any]] = {"sampling": {"temperature": 0.3, "max_tokens": 64}}

    min_words: int = Field(default=3, ge=1)
    """Drop polished answers with fewer words."""


def prompt_values(row: dict[str, Any]) -> dict[str, str]:
    return {"document": row["text"], "instruction": row["instruction"], "response": row["response"]}


def parse(raw: str, cfg: Config, row: dict[str, Any]) -> dict[str, Any] | Drop:
    if len(raw.split()) < cfg.min_words:
        return Drop("too_terse", f"{len(raw.split())} words < polish.min_words {cfg.min_words}")
    return {"response": raw.strip(), "polish_changed": True}
'''

TEMPLATE = """### system
You help turn web documents into training data for an AI assistant.
### user
<document>
{{document}}
</document>

Request: {{instruction}}
Answer: {{response}}
Make the answer tighter without changing what it says.
"""

# What the subprocess checks, in a copy of bft with the fourth stage added.
CHECKS = '''
import asyncio, json, sys
from pathlib import Path
import pyarrow.parquet as pq

from bft import stages
from bft.cli import build_parser
from bft.config import StorageConfig, load_config, reference_markdown
from bft.context import RunContext
from bft.engines import layout
from bft.engines.programs import BatchLedger, Passes, run_batch
from bft.filters.token_length import token_budgets
from bft.planning import load_templates
from bft.resume import SCHEDULING_FIELDS
from bft.steps.llm import EngineReply
from bft.steps.read import stats_uri
from bft.steps.sft import build_sft
from bft.storage import Storage
from bft.writers.manifest import build_manifest
from bft.writers.parquet import StageWriter
import pyarrow as pa

model, run = sys.argv[1], sys.argv[2]
cfg = load_config(None, [f"model={model}", "polish.min_words=4", "curate.threshold=1", "rewrite.min_response_chars=5"])
out = {"order": stages.ORDER, "folders": stages.FOLDERS, "polish_columns": list(stages.COLUMNS["polish"]),
       "min_words": cfg.polish.min_words, "temperature": cfg.polish.sampling.temperature,
       "reference": "| `polish.min_words` | `3` |" in reference_markdown(),
       "from_stage": build_parser()._subparsers._group_actions[0].choices["run"]._option_string_actions[
           "--from-stage"].choices,
       "pools": [(p.stages, p.kind) for p in layout(cfg)],
       "scheduling": "polish.replicas" in SCHEDULING_FIELDS,
       "budgets": [b.stage for b in token_budgets(cfg, load_templates(cfg))]}

storage = Storage(StorageConfig())
writer = StageWriter(storage, run)
docs = [{"id": f"d{i}", "url": None, "source": "in.jsonl", "source_row": i, "text": f"document {i} " * 30,
         "n_chars": 300, "n_tokens": 60} for i in range(1, 4)]
storage.write_bytes(stats_uri(run, "in.jsonl"), json.dumps(
    {"source": "in.jsonl", "rows_seen": 3, "rows_ok": 3, "started_at": 0.0, "finished_at": 1.0}).encode())
writer.write("filter", docs, [], 1.0)
replies = {"generate": "How is it done?", "curate": "Fine.\\nScore: 5", "rewrite": "[RES]Do it like this.[/RES]"}

async def submit(stage, request):
    text = replies.get(stage) or ("Short." if "document 2 " in request["prompt"] else "Do it like this, carefully.")
    return EngineReply(text=text, prompt_tokens=10, completion_tokens=5, cached_tokens=4)

templates = load_templates(cfg)
ledger = BatchLedger(stages.LLM_STAGES, {"generate": docs})
starts = ledger.restore(writer.read_batch)

async def write(stage, kept, dropped, started, replace):
    writer.write(stage, kept, dropped, started, replace)

final = asyncio.run(run_batch(ledger, starts, Passes(stages.LLM_STAGES, cfg, templates), submit, write))
ctx = RunContext(config=cfg, storage=storage, run_uri=run, templates=templates)
build_sft(pa.Table.from_pylist(final), ctx)
manifest = build_manifest(storage, run, run_id="r", config={}, started_at=0.0)
sft = pq.read_table(f"{run}/sft").to_pylist()
out.update(reconciled=manifest["reconciled"], manifest_stages=list(manifest["stages"]),
           polish=manifest["stages"]["polish"], final=sorted(r["id"] for r in sft),
           answer=sft[0]["messages"][-1]["content"], sft_has=["polish_model" in sft[0], "polish_prompt_sha256" in sft[0]])
print(json.dumps(out))
'''


def test_a_new_llm_stage_is_a_module_a_template_and_a_registry_line(tmp_path, tiny_model):
    import json

    copy = tmp_path / "src" / "bft"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "steps" / "polish.py").write_text(POLISH)
    (copy / "templates" / "polish.txt").write_text(TEMPLATE)
    registry = (copy / "stages.py").read_text()
    registry = registry.replace("from bft.steps import curate, generate, rewrite",
                                "from bft.steps import curate, generate, polish, rewrite")
    registry = registry.replace('    (rewrite, "rewritten"),\n', '    (rewrite, "rewritten"),\n    (polish, "polished"),\n')
    assert registry.count("polish") == 3  # the import and the one registry line
    (copy / "stages.py").write_text(registry)

    script = tmp_path / "checks.py"
    script.write_text(textwrap.dedent(CHECKS))
    proc = subprocess.run([sys.executable, str(script), str(tiny_model), str(tmp_path / "run")],
                          env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["order"] == ["read", "filter", "generate", "curate", "rewrite", "polish", "sft"]
    assert out["folders"]["polish"] == "polished"
    assert {"polish_changed", "polish_raw", "polish_cached_tokens"} <= set(out["polish_columns"])
    assert (out["min_words"], out["temperature"]) == (4, 0.3) and out["reference"]
    assert out["from_stage"][-1] == "polish" and out["scheduling"]
    assert out["pools"] == [[["generate", "curate", "rewrite", "polish"], "shared"]]
    assert out["budgets"] == ["generate", "curate", "rewrite", "polish"]
    # the run: d2's polished answer is too terse; the others end polished in sft
    assert out["reconciled"] and out["manifest_stages"][-2:] == ["polish", "sft"]
    assert out["polish"]["dropped_by_reason"] == {"too_terse": 1} and out["polish"]["cached_prompt_tokens"] == 12
    assert out["final"] == ["d1", "d3"] and out["answer"] == "Do it like this, carefully."
    assert out["sft_has"] == [True, True]
