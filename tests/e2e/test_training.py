"""``bft train`` and what it makes, end to end, as the README's seed-data workflow runs it:

1. a backward adapter on the quickstart's seed pairs, killed mid-training and resumed;
2. a forward (seed-model) adapter, trained straight to S3 (moto);
3. a run generating with the backward adapter and curating with the forward one (one
   shared engine serving both), checked against an engine of the test's own: the run's
   replies are the adapter's, not the base model's;
4. the second iteration: a forward adapter trained on the seed pairs plus that run's final
   pairs (``--add-run``), then the run rescored from curate with it (on ray.data.llm
   pools, which serve the adapter per row).

A few minutes of Ray Train and engine start-up: ``make test-train`` (CI runs it after
``make test``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, BftProcess
from .conftest import run_bft as _run_bft

pytestmark = pytest.mark.train

QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")
SEED_PAIRS = sum(1 for line in (ROOT / "examples" / "seed.jsonl").read_text().splitlines() if line.strip())
# Greedy generation, so the run's replies can be compared with the test's own engine. The
# adapter's greedy replies are mostly spaces (it learnt the seed texts' commonest token),
# which clean to a few characters: any length is kept.
GREEDY_SETTINGS = ["generate.sampling.temperature=0", "generate.min_instruction_chars=1"]
GREEDY = [arg for setting in GREEDY_SETTINGS for arg in ("--set", setting)]


# Every bft command this module ran (checked against the README's seed-data workflow).
INVOKED: list[tuple[str, ...]] = []


def run_bft(*args: str, env: dict[str, str] | None = None):
    INVOKED.append(args)
    return _run_bft(*args, env=env)


def shape(args: list[str] | tuple[str, ...]) -> set[str]:
    """A command's subcommand and flags, with ``--set`` keys but no paths or values."""
    out, words = set(), list(args)
    for i, word in enumerate(words):
        if word.startswith("--"):
            out.add(word)
            if word == "--set":
                out.add("--set " + words[i + 1].split("=", 1)[0])
            elif word in ("--direction", "--from-stage"):
                out.add(f"{word} {words[i + 1]}")
        elif i == 0:
            out.add(word)
    return out


def checkpointed_step(out: Path) -> int:
    """The last step whose checkpoint Ray Train has registered (its run snapshot lists
    it) under ``out/checkpoints``: a checkpoint folder written but not yet registered
    when the kill lands is not one a restart can resume from (on a loaded machine the
    controller registers them seconds later)."""
    try:
        snapshot = json.loads((out / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or being written
        return 0
    steps = [0]
    for result in snapshot.get("checkpoint_results", []):
        state = out / "checkpoints" / result["checkpoint_dir_name"] / "state.json"
        try:
            steps.append(json.loads(state.read_text())["step"])
        except (OSError, ValueError):
            pass
    return max(steps)


@pytest.fixture(scope="module")
def backward(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("train") / "backward"
    args = ["train", QUICKSTART, "--direction", "backward", "--out", str(out), "--set", f"model={tiny_model}"]
    INVOKED.append(tuple(args))
    first = BftProcess(args, env={})
    first.wait_until(lambda: checkpointed_step(out) >= 4, "a checkpoint of step 4", timeout=600)
    first.kill()
    killed_at = checkpointed_step(out)
    second = run_bft(*args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"out": out, "killed_at": killed_at, "first": first.output, "second": second,
            "record": json.loads((out / "training_record.json").read_text())}


def test_a_killed_training_resumes_from_its_last_checkpoint(backward):
    record = backward["record"]
    assert record["direction"] == "backward" and record["steps"] == record["steps_done"] == 12  # 48 pairs / 8 x 2
    assert record["resumed_from_step"] is not None and 2 <= record["resumed_from_step"] <= backward["killed_at"] < 12
    # one loss per step, no step twice, none missing
    assert [h["step"] for h in record["loss"]] == list(range(1, 13))
    assert "resuming from the checkpoint of step" in backward["second"].stdout + backward["second"].stderr
    # progress: step, loss and ETA while it runs
    assert "bft train: step 1/12" in backward["first"] and "ETA" in backward["first"]


def test_another_training_into_the_same_out_is_refused_before_ray_starts(backward, tiny_model):
    proc = run_bft("train", QUICKSTART, "--direction", "backward", "--out", str(backward["out"]),
                   "--set", f"model={tiny_model}", "--set", "train.learning_rate=0.01")
    assert proc.returncode == 2 and "holds checkpoints of another training" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_the_training_record_has_data_counts_loss_and_plot(backward):
    out, record = backward["out"], backward["record"]
    assert record["data"]["seed"]["pairs"] == record["data"]["examples"] == SEED_PAIRS
    assert record["data"]["seed"]["unusable"] == 0 and record["data"]["left_out_too_long"] == 0
    assert record["train"]["epochs"] == 2 and (record["s_per_step"] or 0) >= 0
    losses = [h["loss"] for h in record["loss"]]
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    adapter_info = json.loads((out / "adapter" / "bft_adapter.json").read_text())
    assert adapter_info["direction"] == "backward" and adapter_info["steps"] == 12


@pytest.fixture(scope="module")
def forward(s3_server, tiny_model, tmp_path_factory):
    fs = s3_server.fs()
    fs.mkdir("train-bucket")
    out = "s3://train-bucket/adapters/forward"
    proc = run_bft("train", QUICKSTART, "--direction", "forward", "--out", out, "--set", f"model={tiny_model}",
                   "--set", "train.epochs=1", env=s3_server.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "fs": fs, "record": json.loads(fs.cat(f"{out}/training_record.json"))}


def test_forward_training_writes_its_checkpoints_and_adapter_to_s3(forward):
    fs, out, record = forward["fs"], forward["out"], forward["record"]
    assert record["direction"] == "forward" and record["steps_done"] == 6
    assert fs.exists(f"{out}/adapter/adapter_config.json") and fs.exists(f"{out}/loss.png")
    assert fs.glob(f"{out}/checkpoints/checkpoint_*/state.json")


@pytest.fixture(scope="module")
def with_adapters(backward, forward, s3_server, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-runs")
    proc = run_bft("run", QUICKSTART, "--set", f"model={tiny_model}", "--set", f"output.uri={out}",
                   "--set", f"generate.lora={backward['out']}", "--set", f"curate.lora={forward['out']}",
                   *GREEDY, "--run-id", "iteration-1", "--report", env=s3_server.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads(Path(proc.manifest_uri).read_text())
    return {"out": out, "run": out / "iteration-1", "manifest": manifest}


def test_the_run_records_which_adapter_made_each_stage(with_adapters, backward, forward):
    adapters = with_adapters["manifest"]["adapters"]
    assert adapters["generate"]["sha256"] == backward["record"]["adapter"]["sha256"]
    assert adapters["generate"]["direction"] == "backward"
    assert adapters["curate"]["sha256"] == forward["record"]["adapter"]["sha256"]
    assert adapters["curate"]["uri"] == forward["out"] + "/adapter"
    assert "rewrite" not in adapters
    assert with_adapters["manifest"]["reconciled"] and with_adapters["manifest"]["final_rows"] > 0
    report = json.loads((with_adapters["run"] / "report" / "report.json").read_text())
    assert report["adapters"] == adapters
    page = (with_adapters["run"] / "report" / "report.html").read_text()
    assert adapters["generate"]["sha256"][:16] in page and adapters["curate"]["uri"] in page


def test_the_engine_served_the_adapter_not_the_base_model(with_adapters, backward, tiny_model, tmp_path):
    """The run's greedy replies, next to an engine of the test's own answering the same
    prompts with and without the adapter."""
    result = tmp_path / "replies.json"
    subprocess.run([sys.executable, str(Path(__file__).with_name("lora_check.py")), QUICKSTART,
                    str(with_adapters["run"]), str(backward["out"] / "adapter"), str(result),
                    f"model={tiny_model}", f"generate.lora={backward['out']}", *GREEDY_SETTINGS],
                   cwd=ROOT, check=True, timeout=600, capture_output=True)
    replies = json.loads(result.read_text())
    n = len(replies["run"])
    like_lora = sum(r == a for r, a in zip(replies["run"], replies["lora"])) / n
    like_base = sum(r == b for r, b in zip(replies["run"], replies["base"])) / n
    assert n >= 10 and like_base < 0.5 < like_lora, (like_lora, like_base)


@pytest.fixture(scope="module")
def iteration_2(with_adapters, s3_server, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "forward-2"
    run = with_adapters["run"]
    trained = run_bft("train", QUICKSTART, "--direction", "forward", "--out", str(out), "--add-run", str(run),
                      "--merge", "--set", f"model={tiny_model}", "--set", "train.epochs=1")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    rescored = run_bft("run", QUICKSTART, "--from-stage", "curate", "--from-run", "iteration-1",
                       "--run-id", "iteration-2", "--set", f"model={tiny_model}",
                       "--set", f"output.uri={with_adapters['out']}", "--set", f"curate.lora={out}",
                       # a ray.data.llm pool per stage: its own way of serving adapters (per row)
                       "--set", "engine.sharing=per_stage", env=s3_server.env)
    assert rescored.returncode == 0, rescored.stdout[-3000:] + rescored.stderr[-3000:]
    return {"record": json.loads((out / "training_record.json").read_text()),
            "manifest": json.loads(Path(rescored.manifest_uri).read_text()), "out": out}


def test_the_second_iteration_trains_on_seed_and_run_pairs_and_rescores(iteration_2, with_adapters):
    record, manifest = iteration_2["record"], iteration_2["manifest"]
    first_run = with_adapters["manifest"]
    assert record["data"]["runs"] == [{"uri": str(with_adapters["run"]), "pairs": first_run["final_rows"]}]
    assert record["data"]["pairs"] == SEED_PAIRS + first_run["final_rows"]
    assert manifest["from_stage"] == "curate" and manifest["reconciled"]
    # curate got every pair the first iteration generated, and scored it with the new adapter
    assert manifest["stages"]["curate"]["in"] == first_run["stages"]["generate"]["out"]
    assert manifest["adapters"]["curate"]["sha256"] == record["adapter"]["sha256"]
    assert manifest["engines"] == [{"stages": ["curate"], "kind": "per_stage"}, {"stages": ["rewrite"], "kind": "per_stage"}]


def test_merge_writes_the_base_model_with_the_adapter_folded_in(iteration_2, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = iteration_2["out"] / "merged"
    assert iteration_2["record"]["merged"] == str(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    AutoTokenizer.from_pretrained(merged_dir)  # loadable on its own
    assert not any("lora" in name for name, _ in merged.named_parameters())
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(merged.named_parameters())[weight], dict(base.named_parameters())[weight])
    assert torch.equal(dict(merged.named_parameters())["model.embed_tokens.weight"],
                       dict(base.named_parameters())["model.embed_tokens.weight"])


def test_the_readme_seed_workflow_is_what_this_module_ran(iteration_2):
    """Each command of the README's seed-data section, flags and --set keys, is one this
    module ran (with its own paths, the tiny model and test settings on top)."""
    import shlex

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Seed data", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in section.split("```bash")[1:]:
        text = block.split("```", 1)[0].replace("\\\n", " ")
        commands += [shlex.split(line) for line in text.splitlines() if line.startswith("bft ")]
    assert len(commands) == 6
    ran = [shape(args) for args in INVOKED]
    for command in commands:
        assert any(shape(command[1:]) <= done for done in ran), command
