"""LoRA adapters a stage runs with (``<stage>.lora``): found and fingerprinted on the
driver, fetched to local disk on the engine's node, served by vLLM next to the base model.

An adapter is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``),
local or on S3. ``bft train --out DIR`` writes one at ``DIR/adapter/``, so either ``DIR``
or ``DIR/adapter`` may be given. Its digest (SHA-256 over the adapter's files) goes into
the manifest, so a dataset names the exact weights that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bft.config import BftConfig, ConfigError
from bft.stages import LLM_STAGES
from bft.storage import Storage, is_remote, join

log = logging.getLogger("bft.engines.adapters")

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Written by `bft train` next to the adapter: how it was made.
INFO_FILE = "bft_adapter.json"
# Where a run keeps copies of remote adapters for ray.data.llm's pools (run_copy).
ADAPTERS_DIR = "_adapters"
# Ranks vLLM's LoRA support accepts as max_lora_rank.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Adapter:
    stage: str
    uri: str
    """The folder holding the adapter's files (``DIR/adapter`` when given ``DIR``)."""
    sha256: str
    rank: int
    files: tuple[str, ...]
    """The adapter's files that vLLM loads and the digest covers: config, then weights."""
    base_model: str | None = None
    info: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        """Its name in vLLM: one per distinct adapter (stages with the same weights share it)."""
        return f"lora-{self.sha256[:16]}"

    def summary(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "rank": self.rank, "base_model": self.base_model,
                "direction": self.info.get("direction"), "trained_on": self.info.get("data")}


def _adapter_folder(storage: Storage, uri: str, field_name: str) -> str:
    uri = uri.rstrip("/")
    for folder in (join(uri, "adapter"), uri):
        if storage.exists(join(folder, CONFIG_FILE)):
            return folder
    raise ConfigError(f"{field_name}: no {CONFIG_FILE} in {uri} or {join(uri, 'adapter')} "
                      f"(a PEFT LoRA folder; `bft train --out DIR` writes one at DIR/adapter)")


def fingerprint(storage: Storage, uri: str, field_name: str, stage: str = "") -> Adapter:
    """Find the adapter at ``uri``, read its config and hash its files."""
    folder = _adapter_folder(storage, uri, field_name)
    try:
        config = json.loads(storage.read_bytes(join(folder, CONFIG_FILE)))
    except ValueError as exc:
        raise ConfigError(f"{field_name}: {join(folder, CONFIG_FILE)} is not valid JSON ({exc})") from None
    weights = [name for name in WEIGHT_FILES if storage.exists(join(folder, name))]
    if not weights:
        raise ConfigError(f"{field_name}: {folder} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    names = [CONFIG_FILE, weights[0]]
    info_data = storage.read_if_exists(join(folder, INFO_FILE))
    info = json.loads(info_data) if info_data else {}
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{field_name}: {folder} is a {config.get('peft_type')} adapter; vLLM serves LoRA only")
    rank = int(config.get("r", 16))
    if rank > VLLM_RANKS[-1]:
        raise ConfigError(f"{field_name}: {folder} has LoRA rank {rank}; vLLM serves ranks up to {VLLM_RANKS[-1]}")
    return Adapter(stage=stage, uri=folder, sha256=digest(lambda name: storage.read_bytes(join(folder, name)), names),
                   rank=rank, files=tuple(names), base_model=info.get("base_model") or config.get("base_model_name_or_path"),
                   info=info)


def digest(read: Any, names: list[str] | tuple[str, ...]) -> str:
    """SHA-256 over the adapter's files (``read(name)`` gives one's bytes), in order."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + hashlib.sha256(read(name)).digest())
    return h.hexdigest()


def resolve_adapters(cfg: BftConfig, storage: Storage) -> dict[str, Adapter]:
    """The adapter of every stage that names one (fails on the driver, naming the field)."""
    adapters = {}
    for name in LLM_STAGES:
        if not (lora := cfg.llm_stage(name).lora):
            continue
        adapter = adapters[name] = fingerprint(storage, lora, f"{name}.lora", name)
        model = cfg.llm_stage(name).model
        if adapter.base_model and adapter.base_model.rstrip("/") != model.rstrip("/"):
            # Paths differ between machines (a training node, the cluster), so this warns:
            # an adapter on another base model fails to load or writes nonsense.
            log.warning("%s.lora %s was trained on %s, but %s.model is %s: check they are the same model",
                        name, adapter.uri, adapter.base_model, name, model)
    return adapters


def engine_lora_kwargs(adapters: list[Adapter], user: dict[str, Any] | None = None) -> dict[str, Any]:
    """vLLM engine arguments to serve ``adapters`` (none: no LoRA support switched on); a
    larger ``max_loras`` / ``max_lora_rank`` in the stage's own ``engine_kwargs`` wins."""
    if not adapters:
        return {}
    user = user or {}
    rank = max(a.rank for a in adapters)
    rank = next((r for r in VLLM_RANKS if r >= rank), rank)
    return {"enable_lora": True, "max_loras": max(len({a.sha256 for a in adapters}), int(user.get("max_loras", 0))),
            "max_lora_rank": max(rank, int(user.get("max_lora_rank", 0)))}


def local_copy(storage: Storage, adapter: Adapter) -> str:
    """A local folder with the adapter's files: the folder itself when local, else a
    download into a cache folder named by its digest (a replica restarted on the node
    finds it there)."""
    if not is_remote(adapter.uri):
        return adapter.uri
    target = os.path.join(tempfile.gettempdir(), "bft-adapters", adapter.sha256)
    if not os.path.exists(os.path.join(target, adapter.files[-1])):
        partial = f"{target}.{os.getpid()}.tmp"
        os.makedirs(partial, exist_ok=True)
        for name in adapter.files:
            with open(os.path.join(partial, name), "wb") as fh:
                fh.write(storage.read_bytes(join(adapter.uri, name)))
        found = digest(lambda name: Path(partial, name).read_bytes(), adapter.files)
        if found != adapter.sha256:  # replaced on S3 since the run started: not what the manifest names
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"{adapter.stage}.lora {adapter.uri} changed during the run "
                               f"(sha256 {found[:16]}… != {adapter.sha256[:16]}…)")
        try:
            os.replace(partial, target)  # whole or not at all
        except OSError:  # another process of this node got there first
            shutil.rmtree(partial, ignore_errors=True)
    return target


def run_copy(storage: Storage, adapter: Adapter, run_uri: str) -> str:
    """The adapter copied into the run folder (``_adapters/<digest>/``), for ray.data.llm's
    per-row LoRA loading: it names an adapter by its folder below one prefix, so each one
    gets a folder named by its digest (``bft train`` writes every adapter as ``adapter/``)."""
    folder = join(run_uri, ADAPTERS_DIR, adapter.name)
    for name in adapter.files:
        storage.write_bytes(join(folder, name), storage.read_bytes(join(adapter.uri, name)))
    if digest(lambda name: storage.read_bytes(join(folder, name)), adapter.files) != adapter.sha256:
        raise RuntimeError(f"{adapter.stage}.lora {adapter.uri} changed while it was copied into the run")
    return folder


def lora_request(storage: Storage, adapter: Adapter, int_id: int) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.name, int_id, local_copy(storage, adapter))
