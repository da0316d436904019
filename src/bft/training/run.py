"""``bft train``: LoRA fine-tuning on the seed pairs with Ray Train, start to end.

    seed pairs (+ runs' final pairs) -> examples (examples.py) -> TorchTrainer (loop.py)
      -> <out>/adapter/, <out>/training_record.json, <out>/loss.png, [<out>/merged/]

Checkpoints live under ``<out>/checkpoints/`` (Ray Train's run folder, local or S3): the
same command after a kill resumes from the last one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bft.config import BftConfig, ConfigError
from bft.engines.adapters import INFO_FILE, fingerprint
from bft.planning import load_templates
from bft.seed import SeedSet, load_seed
from bft.storage import Storage, is_remote, join
from bft.tokenization import load_tokenizer
from bft.training.examples import STAGE_OF, Direction, base_model, build_examples, run_pairs, training_config
from bft.training.loop import ADAPTER_DIR, STATE_FILE, train_loop
from bft.training.record import plot_loss

log = logging.getLogger("bft.train")

CHECKPOINTS = "checkpoints"
RECORD_FILE = "training_record.json"
PLOT_FILE = "loss.png"
MERGED_DIR = "merged"


@dataclass
class TrainResult:
    out_uri: str
    adapter_uri: str
    record: dict[str, Any]


def _upload(storage: Storage, local: str, uri: str) -> None:
    for root, _, names in os.walk(local):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                storage.write_bytes(join(uri, os.path.relpath(path, local)), fh.read())


def _run_config(storage: Storage, out_uri: str) -> Any:
    import ray.train

    # The last two checkpoints are kept: the newest may be half-written when a kill lands.
    keep = ray.train.CheckpointConfig(num_to_keep=2)
    if not is_remote(out_uri):
        os.makedirs(out_uri, exist_ok=True)
        return ray.train.RunConfig(name=CHECKPOINTS, storage_path=os.path.abspath(out_uri), checkpoint_config=keep)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return ray.train.RunConfig(name=CHECKPOINTS, storage_path=Storage.fs_path(out_uri), checkpoint_config=keep,
                               storage_filesystem=PyFileSystem(FSSpecHandler(storage.fs(out_uri))))


def _fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def train(cfg: BftConfig, direction: Direction, out_uri: str, add_runs: list[str] | None = None,
          merge: bool = False) -> TrainResult:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from bft.graph import init_ray

    started = time.time()
    storage = Storage(cfg.storage)
    out_uri = out_uri.rstrip("/") if is_remote(out_uri) else os.path.abspath(out_uri)
    storage.check_writable(out_uri)
    seeds: SeedSet = load_seed(cfg.seed, storage)
    pairs = list(seeds.pairs)
    runs = []
    for run_uri in add_runs or []:
        extra = run_pairs(storage, run_uri)
        runs.append({"uri": run_uri, "pairs": len(extra)})
        pairs += extra
    model = base_model(cfg, direction)
    cfg = training_config(cfg, direction)
    tokenizer_path = cfg.llm_stage(STAGE_OF[direction]).tokenizer_path
    examples = build_examples(pairs, direction, cfg, load_templates(cfg, seeds), tokenizer_path)
    if not examples.input_ids:
        raise ValueError(f"no training example fits train.max_length={cfg.train.max_length} tokens "
                         f"({len(examples.too_long)} pairs are longer); raise it")
    data = {"seed": seeds.summary(), "runs": runs, "pairs": len(pairs), "examples": len(examples.input_ids),
            "left_out_too_long": len(examples.too_long), "left_out_ids": examples.too_long[:20],
            "prompt_tokens": examples.prompt_tokens, "target_tokens": examples.target_tokens}
    settings = cfg.train.model_dump(mode="json")
    fingerprint_of = _fingerprint({"direction": direction, "base_model": model, "train": settings,
                                   "input_ids": examples.input_ids, "labels": examples.labels})
    tokenizer = load_tokenizer(tokenizer_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log.info("bft train (%s): %d examples from %d seed pairs and %d run pairs (%d left out: longer than "
             "%d tokens), base model %s, %d worker(s), out %s", direction, len(examples.input_ids),
             len(seeds.pairs), len(pairs) - len(seeds.pairs), len(examples.too_long), cfg.train.max_length, model,
             cfg.train.workers, out_uri)

    _check_same_training(storage, out_uri, fingerprint_of)
    init_ray(cfg)
    import ray

    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"train": settings, "base_model": model, "input_ids": examples.input_ids,
                               "labels": examples.labels, "pad_token_id": pad, "fingerprint": fingerprint_of,
                               "out": out_uri},
            scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                         resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
            run_config=_run_config(storage, out_uri))
        result = trainer.fit()
        if result.error:
            raise result.error
        with result.checkpoint.as_directory() as folder:
            with open(os.path.join(folder, STATE_FILE)) as fh:
                state = json.load(fh)
            adapter_uri = join(out_uri, ADAPTER_DIR)
            _upload(storage, os.path.join(folder, ADAPTER_DIR), adapter_uri)
            if merge:
                _merge(storage, model, tokenizer_path, os.path.join(folder, ADAPTER_DIR), join(out_uri, MERGED_DIR))
    finally:
        ray.shutdown()

    info = {"direction": direction, "base_model": model, "steps": state["step"], "served_by_stage": STAGE_OF[direction],
            "data": {"seed_sha256": data["seed"]["sha256"], "seed_pairs": data["seed"]["pairs"], "runs": runs,
                     "examples": data["examples"]}}
    storage.write_bytes(join(adapter_uri, INFO_FILE), json.dumps(info, indent=2).encode())
    adapter = fingerprint(storage, adapter_uri, "--out")
    history = state["history"]
    trained = [h for h in history if state.get("resumed_from") is None or h["step"] > state["resumed_from"]]
    timed = trained[1:]  # the first step of a process carries its warm-up
    record = {
        "direction": direction, "base_model": model, "out": out_uri,
        "adapter": {"uri": adapter_uri, "sha256": adapter.sha256, "rank": adapter.rank},
        "merged": join(out_uri, MERGED_DIR) if merge else None,
        "data": data, "train": settings, "workers": cfg.train.workers, "use_gpu": cfg.train.use_gpu,
        "steps": state["total"], "steps_done": state["step"], "resumed_from_step": state.get("resumed_from"),
        "s_per_step": round((timed[-1]["t"] - timed[0]["t"]) / max(1, len(timed) - 1), 4) if len(timed) > 1 else None,
        "loss": history, "wall_s": round(time.time() - started, 2),
        "checkpoints": join(out_uri, CHECKPOINTS),
    }
    storage.write_bytes(join(out_uri, RECORD_FILE), (json.dumps(record, indent=2) + "\n").encode())
    storage.write_bytes(join(out_uri, PLOT_FILE), plot_loss(history, f"bft train --direction {direction}"))
    return TrainResult(out_uri, adapter_uri, record)


def _check_same_training(storage: Storage, out_uri: str, fingerprint_of: str) -> None:
    """Checkpoints already in ``out_uri`` must be of this training (same data, base model
    and settings), or resuming from them would mix two trainings in one adapter."""
    states = [uri for uri in storage.list_files(join(out_uri, CHECKPOINTS)) if uri.endswith(f"/{STATE_FILE}")]
    for uri in states[-1:]:
        found = json.loads(storage.read_bytes(uri)).get("fingerprint")
        if found != fingerprint_of:
            raise ConfigError(
                f"--out {out_uri} holds checkpoints of another training (its seed data, base model, direction "
                f"or train.* settings differ); use another --out, or the settings it was started with")


def _merge(storage: Storage, model: str, tokenizer_path: str, adapter_dir: str, uri: str) -> None:
    """The base model with the adapter folded into its weights (``--merge``): a plain model
    for engines or tools without LoRA support."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), adapter_dir).merge_and_unload()
    with tempfile.TemporaryDirectory() as folder:
        merged.save_pretrained(folder)
        load_tokenizer(tokenizer_path).save_pretrained(folder)
        _upload(storage, folder, uri)
