"""A document's passes on one engine: generate -> parse -> curate -> parse -> rewrite.

Each pass is submitted as soon as the previous one parsed, so an engine with many documents
in flight mixes all passes in its continuous batches, and a document's next pass arrives
while its prompt prefix (system message + document, the same in every built-in template)
is still in the prefix cache. The code here knows no engine and no storage: the shared
pool's replicas (``shared.py``) run it on their vLLM engine and write stage files, the
throughput benchmark's ceiling runs it on a bare engine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from bft.prompts import PromptTemplate
from bft.stages import LLM_STAGES, STEPS
from bft.steps.llm import RECORDED_REQUEST_FIELDS, EngineReply, build_request, outcome
from bft.writers.parquet import identities

# (stage, request) -> the engine's reply
Submit = Callable[[str, dict[str, Any]], Awaitable[EngineReply]]
# (stage, kept?, kept row or drop record, when its request was built)
OnResult = Callable[[str, bool, dict[str, Any], float], None]


@dataclass(frozen=True)
class Passes:
    """Consecutive LLM stages run on one engine, with what their requests are built from."""

    names: tuple[str, ...]
    config: Any  # BftConfig
    templates: dict[str, PromptTemplate]


def pass_priority(name: str) -> int:
    """vLLM scheduling priority of a stage's requests (lower goes first): a document's
    later passes go ahead of new documents' first ones, so they run while the document's
    prefix is still cached, and documents finish (and free their memory) sooner."""
    return -LLM_STAGES.index(name)


async def run_passes(row: dict[str, Any], first: int, passes: Passes, submit: Submit, on_result: OnResult) -> None:
    """``row`` through ``passes.names[first:]``, until a pass drops it."""
    for name in passes.names[first:]:
        step = STEPS[name]
        request = {**build_request(row, step, passes.config, passes.templates), "priority": pass_priority(name)}
        reply = await submit(name, request)
        recorded = {key: request[key] for key in RECORDED_REQUEST_FIELDS if key in request}
        kept, record = outcome({**row, **recorded}, step, passes.config.llm_stage(name), reply)
        on_result(name, kept, record, request["__t_start"])
        if not kept:
            return
        row = record


class BatchLedger:
    """One batch's results, stage by stage, and when each stage's files may be written.

    A stage is *complete* once every row that entered it has a result: the rows that join
    the batch there (resume, ``--from-stage``) and those the stage before kept, which is
    known once that stage is complete. Stage files are written whole and in stage order, so
    no stage file holds a row whose earlier stage has none (resume relies on it), and a
    batch that runs again can pick up where its earlier run stopped (:meth:`restore`).
    """

    def __init__(self, names: tuple[str, ...], joining: dict[str, list[dict]]):
        self.names = names
        self.joining = {name: list(joining.get(name, [])) for name in names}
        self.kept: dict[str, list[dict]] = {name: [] for name in names}
        self.dropped: dict[str, list[dict]] = {name: [] for name in names}
        self.started: dict[str, float | None] = dict.fromkeys(names)
        self.written = dict.fromkeys(names, False)  # its files already exist (restored)
        self.replace = dict.fromkeys(names, False)  # an earlier run left part of its files
        self.complete: dict[str, asyncio.Event] = {}

    def entering(self, index: int) -> list[dict]:
        """Rows entering stage ``index`` (known once the stage before is complete)."""
        previous = self.kept[self.names[index - 1]] if index else []
        return self.joining[self.names[index]] + previous

    def restore(self, read_batch: Callable[[str, list[dict]], tuple[list | None, list | None]]) -> list[tuple[dict, int]]:
        """Take over what an earlier run of this batch wrote (``read_batch(stage, rows)``
        gives a stage's kept and dropped files for those rows, ``None`` for a missing one);
        returns the rows still to run, with the index of the pass each starts at."""
        for index, name in enumerate(self.names):
            entering = self.entering(index)
            kept, dropped = read_batch(name, entering) if entering else ([], [])
            if identities((kept or []) + (dropped or [])) == identities(entering):
                self.kept[name], self.dropped[name], self.written[name] = kept or [], dropped or [], True
                continue
            # The first stage this batch did not finish: a side it did write is replaced.
            self.replace[name] = kept is not None or dropped is not None
            later = [(row, j) for j in range(index + 1, len(self.names)) for row in self.joining[self.names[j]]]
            return [(row, index) for row in entering] + later
        return []

    def start(self) -> None:
        """Call in the event loop that runs the batch, after :meth:`restore`."""
        self.complete = {name: asyncio.Event() for name in self.names}
        self._settle()

    def record(self, name: str, kept: bool, row: dict[str, Any], started: float) -> None:
        (self.kept if kept else self.dropped)[name].append(row)
        self.started[name] = started if self.started[name] is None else min(self.started[name], started)
        self._settle()

    def _settle(self) -> None:
        for index, name in enumerate(self.names):
            if self.complete[name].is_set():
                continue
            if len(self.kept[name]) + len(self.dropped[name]) < len(self.entering(index)):
                return
            self.complete[name].set()


async def run_batch(ledger: BatchLedger, starts: list[tuple[dict, int]], passes: Passes, submit: Submit,
                    write: Callable[[str, list[dict], list[dict], float, bool], Awaitable[None]] | None) -> list[dict]:
    """Run a batch's rows (``starts``, from :meth:`BatchLedger.restore`) through their
    passes, writing each stage's files once the stage is complete; returns the rows the
    last pass kept."""
    ledger.start()

    async def write_in_order() -> None:
        for name in ledger.names:
            await ledger.complete[name].wait()
            if write is not None and not ledger.written[name] and (ledger.kept[name] or ledger.dropped[name]):
                await write(name, ledger.kept[name], ledger.dropped[name], ledger.started[name],
                            ledger.replace[name])
                ledger.written[name] = True

    tasks = [asyncio.ensure_future(run_passes(row, first, passes, submit, ledger.record)) for row, first in starts]
    tasks.append(asyncio.ensure_future(write_in_order()))
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        # Collect the cancelled tasks' outcomes (no "exception never retrieved" noise). A
        # stage write already in its thread may still land: harmless, the retry of this
        # batch writes the same file names and replaces them.
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return ledger.kept[ledger.names[-1]]
