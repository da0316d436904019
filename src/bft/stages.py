"""The stage registry: every stage of a run, in order, and what each one writes.

Everything else derives from this list: the folders of a run, the columns of each stage's
Parquet, the config sections of the LLM stages, which stages ``--from-stage`` accepts, the
manifest's rows, the engines' passes. A new LLM stage is one step module (the contract is
in ``steps/base.py``), one template (``templates/<name>.txt``) and one line in
``LLM_STEPS`` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from bft.schema import DOC_COLUMNS, DROPPED_HEAD, DROPPED_TAIL, FILTERED_COLUMNS, LLM_RECORD_COLUMNS, MESSAGE_TYPE
from bft.steps import curate, generate, rewrite
from bft.steps.base import LLMStep

# The LLM stages in pipeline order, each with the folder its kept rows go to.
LLM_STEPS: tuple[tuple[LLMStep, str], ...] = (
    (generate, "generated"),
    (curate, "curated"),
    (rewrite, "rewritten"),
)


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str | None
    """Where its kept rows go under ``<output>/<run_id>/``; ``None`` for ``read``, whose
    rows go on to filter in memory (its drops and per-file counts are still written)."""
    columns: dict[str, pa.DataType] = field(hash=False)
    """The columns of its Parquet (cumulative: the previous stage's columns and its own)."""
    step: LLMStep | None = None
    """The LLM step module, for LLM stages."""


def _llm_stage(step: LLMStep, folder: str, previous: Stage) -> Stage:
    missing = [c for c in step.INPUT_COLUMNS if c not in previous.columns]
    if missing:  # a step placed before the stage that makes its input
        raise ValueError(f"LLM step {step.NAME!r} reads {missing}, which no stage before it writes")
    own = {**step.OUTPUT_COLUMNS, **{f"{step.NAME}_{suffix}": dtype for suffix, dtype in LLM_RECORD_COLUMNS.items()}}
    return Stage(step.NAME, folder, {**previous.columns, **own}, step)


def _sft_columns(llm_names: list[str]) -> dict[str, pa.DataType]:
    return {
        "messages": pa.list_(MESSAGE_TYPE),
        "id": pa.string(),
        "url": pa.string(),
        "source": pa.string(),
        "source_row": pa.int64(),
        "segment": pa.int64(),
        "score": pa.int64(),
        # "web" (derived from a document) or "seed" (a seed pair, output.seed_mix).
        "origin": pa.string(),
        **{f"{name}_model": pa.string() for name in llm_names},
        **{f"{name}_prompt_sha256": pa.string() for name in llm_names},
    }


def _build() -> tuple[Stage, ...]:
    stages = [Stage("read", None, DOC_COLUMNS), Stage("filter", "filtered", FILTERED_COLUMNS)]
    for step, folder in LLM_STEPS:
        stages.append(_llm_stage(step, folder, stages[-1]))
    stages.append(Stage("sft", "sft", _sft_columns([step.NAME for step, _ in LLM_STEPS])))
    return tuple(stages)


PIPELINE: tuple[Stage, ...] = _build()

# Derived views, by stage name.
ORDER: tuple[str, ...] = tuple(stage.name for stage in PIPELINE)
PREVIOUS: dict[str, str] = {b.name: a.name for a, b in zip(PIPELINE, PIPELINE[1:])}
FOLDERS: dict[str, str] = {stage.name: stage.folder for stage in PIPELINE if stage.folder}
COLUMNS: dict[str, dict[str, pa.DataType]] = {stage.name: stage.columns for stage in PIPELINE}
LLM_STAGES: tuple[str, ...] = tuple(stage.name for stage in PIPELINE if stage.step)
STEPS: dict[str, LLMStep] = {stage.name: stage.step for stage in PIPELINE if stage.step}
# Stages a run can start from (``--from-stage``): all but the first and the last.
RESTARTABLE: tuple[str, ...] = ORDER[1:-1]
# The stage that writes the final dataset.
FINAL: str = ORDER[-1]
# Stages rows can join at on resume (read back from the stage before).
JOINABLE: tuple[str, ...] = ORDER[2:]
# Every dropped row, from any stage: where it came from, why it left, the outputs each LLM
# step keeps in its drop records, and the engine's reply.
DROPPED_COLUMNS: dict[str, pa.DataType] = {
    **DROPPED_HEAD,
    **{name: dtype for step in STEPS.values() for name, dtype in step.OUTPUT_COLUMNS.items() if name in step.DROP_COLUMNS},
    **DROPPED_TAIL,
}


def producer_of(column: str) -> str | None:
    """The LLM stage whose step adds ``column`` (e.g. ``instruction``: generate)."""
    return next((name for name, step in STEPS.items() if column in step.OUTPUT_COLUMNS), None)
