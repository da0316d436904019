"""Loading a run config: YAML (local or ``s3://``), ``--set`` overrides, relative paths.

Validation happens here, before Ray starts, and errors name the file and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from bft.config.models import ConfigError, ReportConfig, StorageConfig, _Strict
from bft.config.run import BftConfig
from bft.stages import LLM_STAGES


def _deep_set(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; values are parsed as YAML scalars (``5``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. input.uri=s3://bucket/crawl/")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError):  # ValueError: e.g. an impossible date
            value = raw
        # A URI like s3://a/b parses as a string anyway; dicts from YAML are kept.
        _deep_set(data, key, value)
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check spelling; see README's config reference)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def read_config_text(path: str, storage: StorageConfig | None = None) -> str:
    """Read a config file from a local path or an ``s3://`` URI."""
    if "://" in path:
        from bft.storage import Storage

        try:
            with Storage(storage or StorageConfig()).open(path, "rb") as fh:
                return fh.read().decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: config file not found")
    return file.read_text("utf-8")


def _unshared(node: Any) -> Any:
    """A copy in which no two places share a dict or list. YAML anchors (``&engine`` /
    ``*engine`` in the quickstart) load as one shared object, and ``--set`` on one stage
    must not change the others."""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(value) for value in node]
    return node


def load_config(path: str | None, overrides: list[str] | None = None) -> BftConfig:
    """Load and validate a config file (local or ``s3://``) plus ``--set`` overrides."""
    source = path or "(defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(read_config_text(path))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = _unshared(loaded)
        config_dir = Path(path).parent if "://" not in path else None
    else:
        config_dir = None
    apply_overrides(data, overrides or [])
    _resolve_relative_paths(data, config_dir)
    try:
        return BftConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


class _ReportSettings(_Strict):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


def load_report_settings(path: str | None, overrides: list[str] | None = None) -> tuple[StorageConfig, ReportConfig]:
    """Storage and report settings for ``bft report``: from a run config when one is given,
    else defaults (credentials from the environment) plus ``--set storage.*`` / ``report.*``."""
    if path:
        cfg = load_config(path, overrides)
        return cfg.storage, cfg.report
    data = apply_overrides({}, overrides or [])
    try:
        settings = _ReportSettings(**data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "--set (without --config only storage.* and "
                                                         "report.* apply)")) from None
    return settings.storage, settings.report


def _absolute_if_local(value: Any, base: Path) -> Any:
    """Ray workers may run in another directory than the driver, so local paths are made
    absolute. Hub ids (``org/model``) that do not exist locally are left alone."""
    if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
        return value
    candidate = (base / value)
    return str(candidate.resolve()) if candidate.exists() or value.startswith(".") else value


def _resolve_relative_paths(data: dict[str, Any], config_dir: Path | None) -> None:
    """Prompt templates are relative to the config file (they travel with it); data and
    model paths are relative to the working directory, like any command-line path."""
    cwd = Path.cwd()
    if isinstance(data.get("model"), str):
        data["model"] = _absolute_if_local(data["model"], cwd)
    for section, key in (("train", "base_model"), ("seed", "uri")):
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = _absolute_if_local(data[section][key], cwd)
    for name in LLM_STAGES:
        stage = data.get(name)
        if not isinstance(stage, dict):
            continue
        for key in ("model", "tokenizer", "lora"):
            if key in stage:
                stage[key] = _absolute_if_local(stage[key], cwd)
        template = stage.get("prompt_template")
        if isinstance(template, str) and config_dir is not None and not Path(template).is_absolute():
            stage["prompt_template"] = str((config_dir / template).resolve())
