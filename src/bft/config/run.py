"""``BftConfig``: a whole run, assembled from the section models and the LLM stages of the
stage registry (each step module brings its own section, ``steps/<stage>.py: Config``)."""

from __future__ import annotations

import datetime
import os
from typing import Any

from pydantic import Field, create_model, field_validator, model_validator

from bft.config.models import (CostConfig, EngineConfig, redact_value, FilterConfig, InputConfig,
                               LLMStageConfig, OutputConfig, RayConfig, ReportConfig, SeedConfig, StorageConfig,
                               TrainConfig, _Strict)
from bft.stages import LLM_STAGES, STEPS


class _RunSettings(_Strict):
    """A whole run. Load with :func:`bft.config.load_config`."""

    model: str | None = None
    """Model for every LLM stage that names none (e.g. one instruct model for all three)."""

    date: str | None = None
    """Fills ``{date}`` in ``input.uri`` / ``output.uri`` (``bft run --date``; default: today, UTC). A
    run over a dated input is recorded under ``<output.uri>/_completed/<date>.json``; the same
    date is not processed twice unless ``--force``."""

    catch_up_days: int = Field(default=1, ge=0)
    """When ``bft run`` is given no ``--date``: a dated run of one of this many days before
    today that started and never completed (a retry that began after midnight UTC, a run
    abandoned after its retries) is finished first, then today's is run."""

    input: InputConfig = Field(default_factory=InputConfig)
    """What to read."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Object store access (credentials, endpoint)."""

    filters: FilterConfig = Field(default_factory=FilterConfig)
    """Length, dedup and quality filters."""

    output: OutputConfig = Field(default_factory=OutputConfig)
    """Where and how results are written."""

    seed: SeedConfig = Field(default_factory=SeedConfig)
    """Human-written seed pairs (few-shot examples, training data, seed mixing)."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    """LoRA fine-tuning on the seed pairs (``bft train``)."""

    engine: EngineConfig = Field(default_factory=EngineConfig)
    """How the LLM stages share vLLM engines."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Ray connection and scheduling."""

    report: ReportConfig = Field(default_factory=ReportConfig)
    """The quality report of a run."""

    cost: CostConfig = Field(default_factory=CostConfig)
    """GPU pricing for the cost estimate."""

    def llm_stage(self, name: str) -> LLMStageConfig:
        """The section of LLM stage ``name``."""
        return getattr(self, name)

    @field_validator("date", mode="before")
    @classmethod
    def _date_as_text(cls, value: Any) -> Any:
        # YAML (and --set) read 2026-11-22 as a date object.
        return value.isoformat() if isinstance(value, datetime.date) else value

    @model_validator(mode="after")
    def _check(self) -> Any:
        if self.date is not None:
            try:
                datetime.date.fromisoformat(self.date)
            except ValueError:
                raise ValueError(f"date must be YYYY-MM-DD, got {self.date!r}") from None
        if any("{date}" in uri for uri in (self.input.uri, self.output.uri)):
            self.date = self.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
            self.input.uri = self.input.uri.replace("{date}", self.date)
            self.output.uri = self.output.uri.replace("{date}", self.date)
        else:
            self.date = None  # nothing dated: no per-date bookkeeping
        # Ray workers may run elsewhere than the driver: pin local data paths down.
        for block in (self.input, self.output):
            if "://" not in block.uri:
                block.uri = os.path.abspath(block.uri)
        if self.filters.max_chars < self.filters.min_chars:
            raise ValueError(
                f"filters.max_chars ({self.filters.max_chars}) < filters.min_chars ({self.filters.min_chars})")
        for name in LLM_STAGES:
            stage = self.llm_stage(name)
            if not stage.model and self.model:
                stage.model = self.model
            if not stage.model:
                raise ValueError(f"{name}.model is required: set it, or the top-level model for all stages")
            if stage.max_model_len is not None and stage.sampling.max_tokens >= stage.max_model_len:
                raise ValueError(
                    f"{name}.sampling.max_tokens ({stage.sampling.max_tokens}) must be below "
                    f"{name}.engine_kwargs.max_model_len ({stage.max_model_len})")
        if self.output.seed_mix and not self.seed.uri:
            raise ValueError("output.seed_mix needs seed.uri: the seed pairs to add to the final dataset")
        for name in LLM_STAGES:
            if not (shots := getattr(self.llm_stage(name), "few_shot", None)) or not shots.k:
                continue
            if not self.seed.uri:
                raise ValueError(f"{name}.few_shot.k needs seed.uri: the pairs the examples are drawn from")
            if self.llm_stage(name).lora:
                raise ValueError(
                    f"{name}.few_shot and {name}.lora: choose one. An adapter was trained on prompts "
                    "without examples (bft train) and expects its prompts in that form")
        if self.engine.sharing == "shared" and (differ := self._engine_differences()):
            raise ValueError(
                "engine.sharing is 'shared', but the LLM stages do not resolve to the same model and "
                "engine settings: " + "; ".join(differ) + ". Make them equal, or use engine.sharing: "
                "auto (stages on different engines get pools of their own)")
        return self

    def _engine_differences(self) -> list[str]:
        """Fields in which an LLM stage's engine differs from the first stage's."""
        first = LLM_STAGES[0]
        base = self.llm_stage(first).engine_settings()
        out = []
        for name in LLM_STAGES[1:]:
            settings = self.llm_stage(name).engine_settings()
            out += [f"{name}.{key} ({settings[key]!r}) != {first}.{key} ({base[key]!r})"
                    for key in base if settings[key] != base[key]]
        return out

    def engine_groups(self) -> list[tuple[str, ...]]:
        """The LLM stages, in order, grouped by the engine pool they run on
        (``engine.sharing``): one group of all stages when shared, one per stage when
        per_stage, runs of consecutive stages on the same engine when auto."""
        if self.engine.sharing == "per_stage":
            return [(name,) for name in LLM_STAGES]
        groups: list[list[str]] = []
        for name in LLM_STAGES:
            same = groups and (self.llm_stage(groups[-1][-1]).engine_settings()
                               == self.llm_stage(name).engine_settings())
            if same:
                groups[-1].append(name)
            else:
                groups.append([name])
        return [tuple(group) for group in groups]

    def redacted(self) -> dict[str, Any]:
        """JSON-able snapshot with every secret replaced by ``'**********'``: the
        ``storage`` credentials, any value of ``env_vars`` or ``engine_kwargs`` (at any
        depth) whose name suggests a secret (``HF_TOKEN``, ``hf_token``, ``*_SECRET*``, ``*_KEY``,
        ``*PASSWORD*``, ``*_PASS``, ``*_PWD``, ``*_CONNECTION_STRING``), and the
        ``user:password@`` part of any URL (an ``endpoint_url`` or a proxy with credentials)."""
        return redact_value("", self.model_dump(mode="json"))


def _stage_field(step: Any) -> tuple[type, Any]:
    return step.Config, Field(default_factory=step.Config, description=step.DESCRIPTION)


# One section per LLM stage of the registry, after the run-wide sections.
BftConfig = create_model(  # type: ignore[call-overload]
    "BftConfig", __base__=_RunSettings, __module__=__name__, __doc__=_RunSettings.__doc__,
    **{name: _stage_field(step) for name, step in STEPS.items()})
