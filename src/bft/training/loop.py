"""The training loop each Ray Train worker runs: LoRA (peft) on a causal LM, data parallel.

Every ``checkpoint_every`` steps and at the end, rank 0 reports a checkpoint to Ray Train
(the adapter, the optimizer and schedule, the step and the loss history so far), which
Ray Train stores under ``<out>/checkpoints/``. A training started again with the same
``--out`` gets the latest one from ``ray.train.get_checkpoint()`` and goes on from its
step, with the same order of examples (the shuffle is a function of the seed and epoch).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
ADAPTER_DIR = "adapter"


def schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then linear decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def batch_indices(step: int, n: int, batch_size: int, world: int, rank: int, seed: int,
                  steps_per_epoch: int) -> list[int]:
    """Which examples rank ``rank`` trains on at ``step``: a fresh permutation per epoch
    (from the seed and the epoch, so a resumed training continues the same order); the
    last step of an epoch wraps around so every rank gets a full batch."""
    import random

    epoch, within = divmod(step, steps_per_epoch)
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    start = (within * world + rank) * batch_size
    return [order[(start + i) % n] for i in range(batch_size)]


def _say(line: str) -> None:
    # Straight to stdout, which Ray forwards to the driver's console: Ray Train turns
    # print() into records of the worker's root logger, which shows each line twice.
    sys.stdout.write(f"bft train: {line}\n")
    sys.stdout.flush()


def _pad(rows: list[list[int]], value: int) -> list[list[int]]:
    width = max(map(len, rows))
    return [row + [value] * (width - len(row)) for row in rows]


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bft.training.examples import IGNORE

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    settings = config["train"]
    torch.manual_seed(settings["seed"])
    device = ray.train.torch.get_device()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=dtype)
    model = get_peft_model(model, LoraConfig(
        r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"], task_type="CAUSAL_LM"))

    input_ids, labels = config["input_ids"], config["labels"]
    n, batch_size = len(input_ids), settings["batch_size"]
    steps_per_epoch = max(1, math.ceil(n / (batch_size * world)))
    total = steps_per_epoch * settings["epochs"]
    step, history, resumed_from, saved = 0, [], None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, STATE_FILE)) as fh:
                state = json.load(fh)
            if state["fingerprint"] != config["fingerprint"]:
                raise ValueError(
                    f"the checkpoints in {config['out']} are of another training (its data or settings "
                    f"differ: {state['fingerprint'][:12]} != {config['fingerprint'][:12]}); use another --out")
            set_peft_model_state_dict(model, load_file(os.path.join(folder, ADAPTER_DIR, "adapter_model.safetensors")))
            saved = torch.load(os.path.join(folder, OPTIMIZER_FILE), weights_only=True)
            step, history, resumed_from = state["step"], state["history"], state["step"]
        if rank == 0:
            _say(f"resuming from the checkpoint of step {step}/{total}")

    model = ray.train.torch.prepare_model(model)  # DDP across workers; on the worker's device
    peft_model = model.module if hasattr(model, "module") else model
    # The optimizer is made (and its saved state loaded) once the parameters are on the
    # device: its state then lands there too.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["learning_rate"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total, settings["warmup_steps"]))
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    pad = config["pad_token_id"]
    model.train()
    started = time.time()
    first_step = step

    def save(step_done: int) -> None:
        metrics = {"step": step_done, "loss": history[-1]["loss"] if history else None}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(os.path.join(folder, ADAPTER_DIR))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       os.path.join(folder, OPTIMIZER_FILE))
            with open(os.path.join(folder, STATE_FILE), "w") as fh:
                json.dump({"step": step_done, "total": total, "history": history, "resumed_from": resumed_from,
                           "fingerprint": config["fingerprint"]}, fh)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    while step < total:
        picks = batch_indices(step, n, batch_size, world, rank, settings["seed"], steps_per_epoch)
        ids = torch.tensor(_pad([input_ids[i] for i in picks], pad), device=device)
        target = torch.tensor(_pad([labels[i] for i in picks], IGNORE), device=device)
        mask = torch.tensor(_pad([[1] * len(input_ids[i]) for i in picks], 0), device=device)
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        value = loss.detach()
        if world > 1:
            torch.distributed.all_reduce(value)
            value /= world
        step += 1
        history.append({"step": step, "epoch": (step - 1) // steps_per_epoch + 1, "loss": round(float(value), 5),
                        "learning_rate": scheduler.get_last_lr()[0], "t": round(time.time() - started, 3)})
        if rank == 0:
            per_step = (time.time() - started) / (step - first_step)
            _say(f"step {step}/{total}  epoch {history[-1]['epoch']}/{settings['epochs']}  "
                 f"loss {float(value):.4f}  {per_step:.2f} s/step  ETA {per_step * (total - step):.0f} s")
        if step % settings["checkpoint_every"] == 0 or step == total:
            save(step)
