"""The filter and LLM-output steps on real batches, without Ray or engines."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from bft.config import load_config
from bft.context import RunContext
from bft.engines.per_stage import finish_batch
from bft.planning import load_templates
from bft.schema import DOC_COLUMNS, FILTERED_COLUMNS, to_table
from bft.stages import COLUMNS
from bft.steps import curate
from bft.steps.filter import filter_documents
from bft.steps.llm import build_request
from bft.storage import Storage

GOOD = ("Repotting a plant is easiest in spring, when new growth helps it recover. Choose a pot "
        "slightly wider than the old one and make sure it drains. Water the day before, ease the "
        "plant out, loosen circling roots and set it at the same depth in fresh compost. Keep it "
        "out of direct sun for a week while it settles, and wait before feeding it again, because "
        "fresh compost already holds enough nutrients for the first month or two.")


def context(tmp_path, tiny_model, *overrides: str) -> RunContext:
    cfg = load_config(None, [f"model={tiny_model}", f"output.uri={tmp_path}", *overrides])
    return RunContext(config=cfg, storage=Storage(cfg.storage), run_uri=str(tmp_path / "run"),
                      templates=load_templates(cfg))


def doc(i: int, text: str) -> dict:
    return {"id": f"d{i}", "url": None, "source": "in.jsonl", "source_row": i, "text": text}


def test_filter_step_keeps_writes_and_drops(tmp_path, tiny_model):
    ctx = context(tmp_path, tiny_model, "filters.min_chars=100")
    batch = to_table([doc(1, GOOD), doc(2, "too short"), doc(3, GOOD.upper())], DOC_COLUMNS)
    out = filter_documents(batch, ctx)
    assert out.schema.names == list(FILTERED_COLUMNS)
    assert out.column("id").to_pylist() == ["d1"] and out.column("n_chars").to_pylist() == [len(GOOD)]
    written = pq.read_table(tmp_path / "run" / "filtered")
    assert written.column("id").to_pylist() == ["d1"]
    dropped = pq.read_table(tmp_path / "run" / "dropped").to_pylist()
    assert {(r["id"], r["stage"], r["reason"]) for r in dropped} == {("d2", "filter", "too_short"),
                                                                    ("d3", "filter", "uppercase")}
    assert all(r["text"] for r in dropped)  # nothing lost


def test_llm_request_and_parse_round_trip(tmp_path, tiny_model):
    ctx = context(tmp_path, tiny_model, "curate.threshold=4")
    row = {**doc(1, GOOD), "n_chars": len(GOOD), "n_tokens": 90, "instruction": "How do I repot a plant?",
           "generate_raw": "x", "generate_prompt_tokens": 1, "generate_completion_tokens": 1}
    request = build_request(dict(row), curate, ctx.config, ctx.templates)
    assert "How do I repot a plant?" in request["prompt"] and GOOD in request["prompt"]
    assert request["prompt"].endswith("<|assistant|>\n")  # the model's chat template
    assert "structured_outputs" not in request["sampling_params"]  # no regex by default
    ctx.config.curate.structured_output_regex = "[a-z ,.]{10,60}\nScore: [1-5]"  # the quickstart's
    request = build_request(dict(row), curate, ctx.config, ctx.templates)
    assert request["sampling_params"]["structured_outputs"] == {"regex": ctx.config.curate.structured_output_regex}

    engine_out = {"generated_text": "Good.\nScore: 5", "num_input_tokens": 300, "num_generated_tokens": 6,
                  "__inference_error__": "", "prompt": request["prompt"], "__t_start": request["__t_start"]}
    rows = [
        {**row, **engine_out},
        {**row, **engine_out, "id": "d2", "text": GOOD + " 2", "generated_text": "Meh.\nScore: 2"},
        {**row, **engine_out, "id": "d3", "text": GOOD + " 3", "generated_text": "no verdict"},
        {**row, **engine_out, "id": "d4", "text": GOOD + " 4", "generated_text": "",
         "__inference_error__": "EngineDeadError: boom"},
    ]
    kept = finish_batch(pa.Table.from_pylist(rows), "curate", ctx)
    assert kept.column("id").to_pylist() == ["d1"]
    assert kept.column("score").to_pylist() == [5] and kept.column("curate_prompt_tokens").to_pylist() == [300]
    dropped = {r["id"]: r for r in pq.read_table(tmp_path / "run" / "dropped").to_pylist()}
    assert {k: v["reason"] for k, v in dropped.items()} == {
        "d2": "below_threshold", "d3": "unparseable_score", "d4": "engine_error"}
    assert dropped["d2"]["score"] == 2 and dropped["d2"]["raw_output"] == "Meh.\nScore: 2"
    assert "EngineDeadError" in dropped["d4"]["detail"] and dropped["d4"]["instruction"]
    assert pq.read_table(tmp_path / "run" / "curated").num_rows == 1
    assert set(COLUMNS["generate"]) <= set(kept.schema.names)


def test_rows_of_an_older_run_without_cached_token_columns_read_back(tmp_path, tiny_model):
    """--from-stage over a run written before ``*_cached_tokens`` existed: the rows come
    back with every column of the stage, the missing one null, nothing lost."""
    from bft.steps.read import read_stage_outputs

    ctx = context(tmp_path, tiny_model)
    columns = COLUMNS["generate"]
    rows = [{**doc(i, GOOD), "instruction": f"q{i}", "generate_cached_tokens": 5} for i in range(3)]
    old = to_table(rows, columns).drop_columns(["generate_cached_tokens"])
    path = tmp_path / "old.parquet"
    pq.write_table(old, path)
    out = pa.concat_tables(read_stage_outputs(pa.table({"path": [str(path)]}), ctx, "curate", columns))
    assert out.schema.names == list(columns) and out.num_rows == 3
    assert out.column("generate_cached_tokens").null_count == 3
    assert out.column("instruction").to_pylist() == ["q0", "q1", "q2"]
