"""The contract every LLM step module (``generate.py``, ``curate.py``, ``rewrite.py``) keeps.

The stage registry (``bft/stages.py``) lists the step modules in order; the config, the
stage's Parquet columns, the engines and the manifest are derived from what a module
declares here, so a new LLM stage is one module like these, one template
(``templates/<NAME>.txt``) and one registry line.
"""

from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa

from bft.config.models import StageConfig
from bft.filters.base import Drop


class LLMStep(Protocol):
    NAME: str
    """The stage's name: its config section, template file and drop records' ``stage``."""

    Config: type[StageConfig]
    """Its config section, with the stage's own defaults."""

    DESCRIPTION: str
    """One line for the config reference."""

    PLACEHOLDERS: set[str]
    """The placeholders ``prompt_values`` fills; a template may use these and no others."""

    REQUIRED_PLACEHOLDERS: set[str]
    """Placeholders its template must use (``{{document}}``, ``{{instruction}}``)."""

    INPUT_COLUMNS: tuple[str, ...]
    """Columns of the incoming row that ``prompt_values`` reads."""

    OUTPUT_COLUMNS: dict[str, pa.DataType]
    """Columns a kept row gains (besides ``<NAME>_raw`` and the token counts every LLM
    stage records)."""

    DROP_COLUMNS: tuple[str, ...]
    """Which of ``OUTPUT_COLUMNS`` every drop record (of any later stage) keeps, so a row
    dropped later still shows them (the instruction, the score)."""

    def prompt_values(self, row: dict[str, Any]) -> dict[str, str]:
        """The value of each of ``PLACEHOLDERS`` for one row."""

    def parse(self, raw: str, cfg: Any, row: dict[str, Any]) -> dict[str, Any] | Drop:
        """The model's reply to the fields a kept row gains, or why the row is dropped
        (``row``: the incoming row, e.g. to refuse a reply copied from its document).
        Replies cut off at ``max_tokens`` are dropped (``truncated``) before this is called."""

    # Optional, for a stage whose Config has ``few_shot`` (generate): ``shot(pair)`` gives
    # a seed pair as a worked example, ``(prompt values, answer)``.
