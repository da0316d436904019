"""What every step needs at run time, bundled so it pickles into Ray tasks in one piece."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bft.config import BftConfig
from bft.filters.dedup import Deduplicator
from bft.filters.near_dedup import NearDeduplicator
from bft.filters.token_length import TokenBudget
from bft.prompts import PromptTemplate
from bft.storage import Storage
from bft.writers.parquet import StageWriter


@dataclass
class RunContext:
    config: BftConfig
    storage: Storage
    run_uri: str
    templates: dict[str, PromptTemplate]
    token_budgets: list[TokenBudget] = field(default_factory=list)
    dedup: Deduplicator | None = None
    near_dedup: NearDeduplicator | None = None
    # Rows earlier attempts of this run finished (``resume.FinishedRows``), as a Ray
    # object reference so the arrays travel once per node, not once per task.
    finished: Any = None
    # The LoRA adapter of each stage that runs with one (``engines/adapters.py``).
    adapters: dict[str, Any] = field(default_factory=dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled in a Ray worker: that process masks the config's secrets too (an
        # engine error quoting a token from engine_kwargs, a failure record), not only the
        # ones in its environment.
        from bft.redaction import learn

        self.__dict__.update(state)
        learn(self.config)

    @property
    def writer(self) -> StageWriter:
        return StageWriter(self.storage, self.run_uri)

    def finished_rows(self) -> Any:
        """The resolved ``FinishedRows`` (``None`` on a first attempt)."""
        import ray

        return ray.get(self.finished) if isinstance(self.finished, ray.ObjectRef) else self.finished
