"""Seed data: reading it (bad rows named and counted), few-shot examples, the training
prompt format shared with inference, seed mixing, adapters and the training schedule."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bft.config import BftConfig, ConfigError, SeedConfig, StorageConfig
from bft.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
STORAGE = Storage(StorageConfig())
SHIPPED = ROOT / "examples" / "seed.jsonl"


def seed_config(uri, **kwargs) -> SeedConfig:
    return SeedConfig(uri=str(uri), **kwargs)


def test_the_shipped_seed_file_is_clean_and_varied():
    from bft.seed import load_seed

    seeds = load_seed(seed_config(SHIPPED), STORAGE)
    assert 40 <= len(seeds.pairs) <= 60 and not seeds.problems
    assert len({p.instruction for p in seeds.pairs}) == len(seeds.pairs)
    assert all(len(p.response) >= 300 for p in seeds.pairs)
    assert seeds.summary()["sha256"] == load_seed(seed_config(SHIPPED), STORAGE).sha256  # stable


def test_unusable_rows_are_named_by_file_and_row_and_counted(tmp_path, caplog):
    from bft.seed import load_seed

    path = tmp_path / "seed.jsonl.gz"
    lines = [
        json.dumps({"instruction": "How do I boil an egg?", "response": "Put it in boiling water for 8 minutes."}),
        json.dumps({"instruction": "No answer here"}),
        json.dumps({"instruction": "Empty answer", "response": "   "}),
        json.dumps({"instruction": 42, "response": "a number as instruction"}),
        "{not json",
        json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi?"},
                                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"id": "same", "instruction": "One", "response": "First."}),
        json.dumps({"id": "same", "instruction": "Two", "response": "Second."}),
    ]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with caplog.at_level("WARNING"):
        seeds = load_seed(seed_config(path), STORAGE)
    assert [(p.instruction, p.response) for p in seeds.pairs] == [
        ("How do I boil an egg?", "Put it in boiling water for 8 minutes."), ("Hi?", "Hello."), ("One", "First.")]
    assert [p.id for p in seeds.pairs] == ["seed-1", "seed-6", "same"]
    assert seeds.rows == 9 and len(seeds.problems) == 6
    expected = {2: "no 'response' field", 3: "'response' is empty", 4: "'instruction' is int, not a string",
                5: "invalid JSON", 7: "has no assistant turn", 9: "id 'same' appears twice"}
    for row, why in expected.items():
        assert any(p.startswith(f"{path}, row {row}: ") and why in p for p in seeds.problems), (row, seeds.problems)
    assert "6 of 9 rows cannot be used" in caplog.text and f"{path}, row 4" in caplog.text


def test_default_ids_are_unique_across_a_folder_and_any_field_name_is_fine(tmp_path):
    from bft.seed import load_seed

    (tmp_path / "seeds" / "more").mkdir(parents=True)
    row = {"instruction": "Why?", "response": "Because.", "reason": "a field like any other"}
    for path in (tmp_path / "seeds" / "a.jsonl", tmp_path / "seeds" / "more" / "a.jsonl"):
        path.write_text(json.dumps(row) + "\n")
    (tmp_path / "seeds" / "README.txt").write_text("not seed data")
    seeds = load_seed(seed_config(tmp_path / "seeds"), STORAGE)
    assert [p.id for p in seeds.pairs] == ["a-1", "more/a-1"] and not seeds.problems


def test_parquet_seeds_with_mapped_columns(tmp_path):
    from bft.seed import load_seed

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"q": ["What is 2+2?"], "a": ["4."], "key": ["k1"]}), path)
    seeds = load_seed(seed_config(path, instruction_column="q", response_column="a", id_column="key"), STORAGE)
    assert [(p.id, p.instruction, p.response) for p in seeds.pairs] == [("k1", "What is 2+2?", "4.")]


def test_a_seed_set_with_no_usable_pair_fails_naming_the_columns(tmp_path):
    from bft.seed import load_seed

    path = tmp_path / "seed.jsonl"
    path.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(ConfigError, match=r"no usable .* seed.instruction_column"):
        load_seed(seed_config(path), STORAGE)
    with pytest.raises(ConfigError, match="nothing found"):
        load_seed(seed_config(tmp_path / "missing.jsonl"), STORAGE)


def test_seed_settings_that_need_seed_data_fail_before_ray(minimal_config_data):
    with pytest.raises(ValueError, match="output.seed_mix needs seed.uri"):
        BftConfig(**minimal_config_data, output={"seed_mix": True})
    with pytest.raises(ValueError, match="generate.few_shot.k needs seed.uri"):
        BftConfig(**minimal_config_data, generate={"few_shot": {"k": 2}})
    with pytest.raises(ValueError, match="generate.few_shot and generate.lora: choose one"):
        BftConfig(**minimal_config_data, seed={"uri": str(SHIPPED)}, generate={"few_shot": {"k": 2}, "lora": "/a"})


@pytest.fixture()
def few_shot_run(minimal_config_data):
    from bft.planning import load_templates
    from bft.seed import load_seed

    cfg = BftConfig(**minimal_config_data, seed={"uri": str(SHIPPED)}, generate={"few_shot": {"k": 3, "seed": 7}})
    seeds = load_seed(cfg.seed, STORAGE)
    return cfg, seeds, load_templates(cfg, seeds)


def test_few_shot_examples_come_before_the_document_and_are_recorded(few_shot_run):
    from bft.stages import STEPS
    from bft.steps.llm import build_request, request_messages

    cfg, seeds, templates = few_shot_run
    row = {"id": "doc-1", "text": "THE-DOCUMENT-BODY"}
    messages = request_messages(row, STEPS["generate"], templates)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2 + ["user"]
    request = build_request(row, STEPS["generate"], cfg, templates)
    pairs = seeds.by_id()
    assert len(request["few_shot_ids"]) == 3 and len(set(request["few_shot_ids"])) == 3
    for i, shot_id in enumerate(request["few_shot_ids"]):
        # each example: the seed response in the document's place, its instruction as the answer
        assert pairs[shot_id].response in messages[1 + 2 * i]["content"]
        assert messages[2 + 2 * i]["content"] == pairs[shot_id].instruction
    assert "THE-DOCUMENT-BODY" in messages[-1]["content"] and "THE-DOCUMENT-BODY" not in request["prompt"][:200]
    # the same document gets the same examples (any process); others get others
    assert build_request(row, STEPS["generate"], cfg, templates)["few_shot_ids"] == request["few_shot_ids"]
    draws = {tuple(build_request({"id": f"d{i}", "text": "x"}, STEPS["generate"], cfg, templates)["few_shot_ids"])
             for i in range(20)}
    assert len(draws) > 10
    # curate and rewrite show no examples
    assert "few_shot_ids" not in build_request({**row, "instruction": "q?"}, STEPS["curate"], cfg, templates)


def test_the_token_budget_leaves_room_for_the_longest_examples(few_shot_run, minimal_config_data):
    from bft.filters.token_length import token_budgets
    from bft.planning import load_templates

    cfg, _, templates = few_shot_run
    plain = BftConfig(**minimal_config_data)
    with_shots = {b.stage: b.max_document_tokens for b in token_budgets(cfg, templates)}
    without = {b.stage: b.max_document_tokens for b in token_budgets(plain, load_templates(plain))}
    assert with_shots["generate"] < without["generate"] - 300
    assert with_shots["curate"] == without["curate"]


def test_training_prompts_are_the_run_s_own_prompts(minimal_config_data):
    """One function renders both: a backward adapter is trained on exactly the prompt
    generate sends it, a forward one on the final dataset's chat form."""
    from bft.planning import load_templates
    from bft.seed import load_seed
    from bft.stages import STEPS
    from bft.steps.llm import build_request
    from bft.steps.sft import to_messages
    from bft.tokenization import load_tokenizer
    from bft.training.examples import IGNORE, build_examples, training_prompt

    cfg = BftConfig(**minimal_config_data, seed={"uri": str(SHIPPED)}, generate={"lora": "/adapters/backward"})
    templates = load_templates(cfg)
    seeds = load_seed(cfg.seed, STORAGE)
    pair = seeds.pairs[0]
    # a config with few-shot examples trains on plain prompts all the same
    shots = BftConfig(**minimal_config_data, seed={"uri": str(SHIPPED)}, generate={"few_shot": {"k": 2}})
    assert training_prompt(pair, "backward", shots, load_templates(shots, seeds)) == training_prompt(
        pair, "backward", cfg, templates)
    prompt, target = training_prompt(pair, "backward", cfg, templates)
    assert prompt == build_request({"id": "any-doc", "text": pair.response}, STEPS["generate"], cfg, templates)["prompt"]
    assert target == pair.instruction
    forward, answer = training_prompt(pair, "forward", cfg, templates)
    tokenizer = load_tokenizer(cfg.curate.tokenizer_path)
    whole = tokenizer.apply_chat_template(to_messages(cfg.output.system_prompt, pair.instruction, pair.response),
                                          tokenize=False)
    assert answer == pair.response and whole.startswith(forward)
    examples = build_examples([pair], "backward", cfg, templates, cfg.generate.tokenizer_path)
    labels, ids = examples.labels[0], examples.input_ids[0]
    learnt = [t for t, label in zip(ids, labels) if label != IGNORE]
    assert tokenizer.decode(learnt).strip().startswith(pair.instruction[:20])  # only the target is learnt
    assert labels[:examples.prompt_tokens] == [IGNORE] * examples.prompt_tokens


def test_examples_over_max_length_are_left_out_and_counted(minimal_config_data):
    from bft.planning import load_templates
    from bft.seed import load_seed
    from bft.training.examples import build_examples

    cfg = BftConfig(**minimal_config_data, seed={"uri": str(SHIPPED)}, train={"max_length": 300})
    pairs = load_seed(cfg.seed, STORAGE).pairs
    examples = build_examples(pairs, "backward", cfg, load_templates(cfg), cfg.generate.tokenizer_path)
    assert examples.too_long and len(examples.too_long) + len(examples.input_ids) == len(pairs)
    assert all(len(ids) <= 300 for ids in examples.input_ids)


def test_every_example_is_seen_once_per_epoch_on_every_rank_count():
    from bft.training.loop import batch_indices, schedule

    n, batch, world = 48, 8, 2
    per_epoch = 3  # ceil(48 / (8 * 2))
    for epoch in range(2):
        seen = [i for step in range(epoch * per_epoch, (epoch + 1) * per_epoch) for rank in range(world)
                for i in batch_indices(step, n, batch, world, rank, 0, per_epoch)]
        assert sorted(seen) == list(range(n))
    assert batch_indices(4, n, batch, world, 1, 0, per_epoch) == batch_indices(4, n, batch, world, 1, 0, per_epoch)
    assert schedule(0, 10, 2) == 0.5 and schedule(2, 10, 2) == 1.0 and schedule(10, 10, 2) == 0.0


def test_seed_mix_adds_seed_rows_counted_apart(tmp_path, minimal_config_data):
    from bft.seed import load_seed
    from bft.stages import COLUMNS
    from bft.steps.sft import write_seed_pairs
    from bft.writers.manifest import build_manifest
    from bft.writers.parquet import parquet_files

    cfg = BftConfig(**minimal_config_data, seed={"uri": str(SHIPPED)}, output={"seed_mix": True})
    seeds = load_seed(cfg.seed, STORAGE)
    run = str(tmp_path / "run")
    assert write_seed_pairs(STORAGE, run, cfg, seeds) == len(seeds.pairs)
    table = pq.read_table(tmp_path / "run" / "sft" / "seed-pairs.parquet")
    assert table.schema.names == list(COLUMNS["sft"])
    rows = table.to_pylist()
    assert {r["origin"] for r in rows} == {"seed"}
    assert rows[0]["messages"][0] == {"role": "system", "content": cfg.output.seed_system_prompt}
    assert cfg.output.seed_system_prompt != cfg.output.system_prompt
    assert [r["id"] for r in rows] == [p.id for p in seeds.pairs]
    assert parquet_files(STORAGE, f"{run}/sft") == []  # not a stage file: resume and tallies skip it
    manifest = build_manifest(STORAGE, run, run_id="r", config={}, started_at=0.0)
    assert manifest["seed_rows"] == len(seeds.pairs) and manifest["dataset_rows"] == len(seeds.pairs)
    assert manifest["final_rows"] == 0 and manifest["reconciled"]


def _adapter(folder: Path, rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank,
                                                            "base_model_name_or_path": "/models/base"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_adapters_are_found_fingerprinted_and_sized_for_vllm(tmp_path):
    from bft.engines.adapters import engine_lora_kwargs, fingerprint

    _adapter(tmp_path / "out" / "adapter", rank=12)
    by_out = fingerprint(STORAGE, str(tmp_path / "out"), "generate.lora")
    by_folder = fingerprint(STORAGE, str(tmp_path / "out" / "adapter"), "generate.lora")
    assert by_out.uri == by_folder.uri == str(tmp_path / "out" / "adapter") and by_out.sha256 == by_folder.sha256
    assert by_out.rank == 12 and by_out.base_model == "/models/base"
    (tmp_path / "out" / "adapter" / "adapter_model.safetensors").write_bytes(b"other weights")
    assert fingerprint(STORAGE, str(tmp_path / "out"), "generate.lora").sha256 != by_out.sha256
    assert engine_lora_kwargs([by_out]) == {"enable_lora": True, "max_loras": 1, "max_lora_rank": 16}
    assert engine_lora_kwargs([]) == {}
    assert engine_lora_kwargs([by_out], {"max_lora_rank": 64, "max_loras": 4}) == {
        "enable_lora": True, "max_loras": 4, "max_lora_rank": 64}  # the user's larger values win
    with pytest.raises(ConfigError, match=r"curate.lora: no adapter_config.json in .*nowhere"):
        fingerprint(STORAGE, str(tmp_path / "nowhere"), "curate.lora")


def test_a_pool_per_stage_serves_the_adapter_per_row(tmp_path, minimal_config_data):
    """ray.data.llm runs a row on a LoRA when its ``model`` differs from the base model: a
    local adapter is named by its folder, one on S3 by its name below the prefix
    ray.data.llm downloads from."""
    from dataclasses import replace

    from bft.engines.adapters import fingerprint
    from bft.engines.per_stage import _request, lora_model, processor_config
    from bft.planning import load_templates
    from bft.stages import STEPS

    adapter = fingerprint(STORAGE, str(_adapter(tmp_path / "bwd" / "adapter", rank=16).parent), "generate.lora")
    cfg = BftConfig(**minimal_config_data, generate={"lora": str(tmp_path / "bwd")})
    proc = processor_config(cfg.generate, adapter)
    assert proc.engine_kwargs["enable_lora"] is True and proc.engine_kwargs["max_lora_rank"] == 16
    assert proc.dynamic_lora_loading_path is None
    model, _ = lora_model(adapter)
    request = _request({"id": "d", "text": "x"}, STEPS["generate"], cfg, load_templates(cfg), model)
    assert request["model"] == adapter.uri != cfg.generate.model
    on_s3 = replace(adapter, uri="s3://bucket/adapters/backward/adapter")
    copied = f"s3://bucket/runs/r1/_adapters/{on_s3.name}"
    assert lora_model(on_s3, copied) == (on_s3.name, "s3://bucket/runs/r1/_adapters")
    assert lora_model(on_s3, "/runs/r1/_adapters/x") == ("/runs/r1/_adapters/x", None)
    assert lora_model(None) == (None, None) and "enable_lora" not in processor_config(cfg.curate).engine_kwargs


def test_a_resumed_run_must_use_the_same_adapters_and_seed_pairs(tmp_path, minimal_config_data):
    from bft.resume import check_same_run, write_run_record

    cfg = BftConfig(**minimal_config_data)
    run = str(tmp_path / "run")
    write_run_record(STORAGE, run, cfg, {"generate": "t"}, {"seed pairs": "s1", "generate.lora": "a1"})
    check_same_run(STORAGE, run, cfg, {"generate": "t"}, {"seed pairs": "s1", "generate.lora": "a1"})
    # training settings do not change a run's rows
    check_same_run(STORAGE, run, BftConfig(**minimal_config_data, train={"epochs": 9}), {"generate": "t"},
                   {"seed pairs": "s1", "generate.lora": "a1"})
    with pytest.raises(ValueError, match=r"sha256 of generate.lora: 'a1' -> 'a2'"):
        check_same_run(STORAGE, run, cfg, {"generate": "t"}, {"seed pairs": "s1", "generate.lora": "a2"})
