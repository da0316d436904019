"""Run configuration: pydantic models loaded from YAML, the single source of defaults.

- ``models.py``: the sections (input, storage, filters, the LLM stage base, engine, ray, ...);
- ``run.py``: ``BftConfig``, the whole run, with one section per LLM stage of the registry;
- ``loading.py``: YAML files, ``--set`` overrides, relative paths;
- ``reference.py``: the config reference table of the README.

Names are imported on first use: the step modules import ``bft.config.models`` for their
sections, and ``BftConfig`` is built from the registry of those step modules, so importing
``run.py`` here eagerly would be circular.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    **dict.fromkeys(["REDACTED", "ConfigError", "CostConfig", "EngineConfig", "FewShotConfig", "FilterConfig", "InputConfig",
                     "LLMStageConfig", "NearDedupConfig", "OutputConfig", "RayConfig", "ReportConfig", "ResourcesConfig", "SamplingConfig",
                     "SeedConfig", "StageConfig", "StorageConfig", "TrainConfig"], "models"),
    "BftConfig": "run",
    **dict.fromkeys(["apply_overrides", "load_config", "load_report_settings", "read_config_text"], "loading"),
    "reference_markdown": "reference",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bft.config' has no attribute {name!r}")
    return getattr(import_module(f"bft.config.{_WHERE[name]}"), name)
