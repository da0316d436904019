"""Training examples: (prompt, target) token ids from seed pairs (and a run's final pairs).

- ``backward`` (response -> instruction, the backtranslation model): generate's prompt,
  rendered by the function generate's requests are rendered with
  (:func:`bft.steps.llm.stage_prompt`), the pair's response in the document's place; the
  target is the instruction. The adapter sees at inference exactly the form it learnt.
- ``forward`` (instruction -> response, Humpback's seed model): the final dataset's own
  chat form (``output.system_prompt``, then the instruction as the user's turn); the
  target is the response. As in Humpback, the seed model then curates when prompted with
  curate's rating prompt: an instruction like any other for a chat model.

Only the target's tokens are learnt (the prompt's labels are masked). An example longer
than ``train.max_length`` is left out and counted, never cut: a cut target teaches the
model to stop mid-sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from bft.seed import SeedPair
from bft.stages import FINAL, STEPS
from bft.steps.llm import stage_prompt
from bft.steps.sft import to_messages
from bft.storage import Storage, join
from bft.tokenization import load_tokenizer, render_chat

Direction = Literal["backward", "forward"]
# The LLM stage whose model a direction adapts, by default, and serves with the adapter.
STAGE_OF = {"backward": "generate", "forward": "curate"}
IGNORE = -100  # label of a token that is not learnt


@dataclass
class ExampleSet:
    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    too_long: list[str] = field(default_factory=list)
    """Ids of pairs left out: prompt + target over ``train.max_length`` tokens."""
    prompt_tokens: int = 0
    target_tokens: int = 0


def base_model(cfg: Any, direction: Direction) -> str:
    return cfg.train.base_model or cfg.llm_stage(STAGE_OF[direction]).model


def training_config(cfg: Any, direction: Direction) -> Any:
    """``cfg`` as the adapter will be served: the stage it is for runs on the base model,
    so prompts are rendered with that model's chat template and tokenizer."""
    if not cfg.train.base_model:
        return cfg
    out = cfg.model_copy(deep=True)
    stage = out.llm_stage(STAGE_OF[direction])
    stage.model, stage.tokenizer = cfg.train.base_model, None
    return out


def training_prompt(pair: SeedPair, direction: Direction, cfg: Any, templates: dict[str, Any]) -> tuple[str, str]:
    """(prompt text, target text) of one pair."""
    if direction == "backward":
        # The adapter is served without examples (few_shot and lora exclude each other).
        plain = {**templates, "generate": replace(templates["generate"], shots_per_prompt=0)}
        prompt, _ = stage_prompt({"text": pair.response, "id": pair.id}, STEPS["generate"], cfg, plain)
        return prompt, pair.instruction
    messages = to_messages(cfg.output.system_prompt, pair.instruction, pair.response)[:-1]
    return render_chat(cfg.llm_stage(STAGE_OF[direction]).tokenizer_path, messages), pair.response


def build_examples(pairs: list[SeedPair], direction: Direction, cfg: Any, templates: dict[str, Any],
                   tokenizer_path: str) -> ExampleSet:
    tokenizer = load_tokenizer(tokenizer_path)
    # The target ends where the model should stop: its end-of-sequence token, added as an
    # id. The target's own text is split as text: a pair (a run's, from the web) holding
    # "<|eot_id|>" must not teach the model a turn ending there.
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = ExampleSet()
    for pair in pairs:
        prompt, target = training_prompt(pair, direction, cfg, templates)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False, split_special_tokens=True)["input_ids"] + eos
        if len(prompt_ids) + len(target_ids) > cfg.train.max_length:
            out.too_long.append(pair.id)
            continue
        out.input_ids.append(prompt_ids + target_ids)
        out.labels.append([IGNORE] * len(prompt_ids) + target_ids)
        out.prompt_tokens += len(prompt_ids)
        out.target_tokens += len(target_ids)
    return out


def run_pairs(storage: Storage, run_uri: str) -> list[SeedPair]:
    """The final (web-derived) pairs of a finished run (``--add-run``): its ``sft/`` files,
    first user and first assistant turn of each example."""
    import pyarrow.parquet as pq

    from bft.stages import FOLDERS
    from bft.writers.parquet import parquet_files

    files = parquet_files(storage, join(run_uri.rstrip("/"), FOLDERS[FINAL]))
    if not files:
        raise ValueError(f"--add-run {run_uri}: no final pairs there ({FOLDERS[FINAL]}/ is empty or missing)")
    pairs = []
    for uri in files:
        with storage.open(uri, "rb") as fh:
            rows = pq.read_table(fh, columns=["messages", "id", "source", "source_row"]).to_pylist()
        for row in rows:
            turns = {m["role"]: m["content"] for m in reversed(row["messages"])}
            pairs.append(SeedPair(f"{run_uri.rstrip('/').rsplit('/', 1)[-1]}:{row['id']}", turns["user"],
                                  turns["assistant"], row["source"], row["source_row"]))
    return pairs
