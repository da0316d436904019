"""The live progress view of a run, drawn while the driver runs it.

On a terminal: a progress bar over the run with rows done per stage, drops, tokens/s,
elapsed time and ETA, redrawn in place (rich). Anywhere else (a Ray job's log, CI, a
file): one line every ``interval_s``. Both come from :func:`snapshot.snapshot`, polled
from the run's files in a background thread, so they show what ``bft status`` would.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from bft.progress.snapshot import FileTallies, RunProgress, snapshot
from bft.stages import ORDER
from bft.storage import Storage

log = logging.getLogger("bft")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def counts(p: RunProgress, final: bool = False) -> str:
    """``34% · 120/352 rows done · 15 final · 28 dropped`` (``final``: the stream ended)."""
    fraction = 1.0 if final else p.fraction
    return " · ".join([f"{fraction:.0%}" if fraction is not None else "estimating",
                       f"{p.rows_done}/{p.expected_rows if p.expected_rows is not None else '?'} rows done",
                       f"{p.final_rows} final", f"{sum(p.dropped_by_reason.values())} dropped"])


def headline(p: RunProgress, final: bool = False) -> str:
    """``34% · 120/352 rows done · 15 final · 28 dropped · 41.2 tok/s · elapsed 1m02s · ETA 2m10s``"""
    parts = [counts(p, final)]
    if p.tokens_per_s:
        parts.append(f"{p.tokens_per_s:,.1f} tok/s")
    parts.append(f"elapsed {duration(p.elapsed_s)}")
    if p.state == "running" and not final:
        parts.append(f"ETA {duration(p.eta_s)}")
    return " · ".join(parts)


def stage_line(p: RunProgress) -> str:
    """``read 3/3 files · filter 40 · generate 31 · ...`` (rows each stage finished)."""
    files = f"{p.files_read}/{p.files_total if p.files_total is not None else '?'} files"
    return " · ".join([f"read {files}", *(f"{name} {p.stages[name].done}" for name in ORDER[1:])])


def render_table(p: RunProgress, final: bool = False) -> Any:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, show_edge=False)
    for column, justify in (("stage", "left"), ("done", "right"), ("kept", "right"), ("dropped", "right"),
                            ("tokens", "right"), ("top drop reasons", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name in ORDER:
        s = p.stages[name]
        done = f"{p.files_read}/{p.files_total or '?'} files" if name == "read" else f"{s.done:,}"
        reasons = ", ".join(f"{r}={n}" for r, n in s.dropped.most_common(3))
        table.add_row(name, done, f"{s.out:,}", f"{sum(s.dropped.values()):,}",
                      f"{s.tokens:,}" if s.tokens else "", reasons)
    fraction = 1.0 if final else p.fraction or 0.0
    return Group(Text(f"run {p.run_uri}"), ProgressBar(total=1.0, completed=fraction, width=60),
                 Text(headline(p, final)), table)


class ProgressView:
    """Polls the run's files every ``interval_s`` and shows where it stands on ``console``."""

    def __init__(self, storage: Storage, run_uri: str, console: Any, interval_s: float = 5.0,
                 live: bool | None = None):
        """``console``: a stream, or the :class:`console.ConsoleSink` of a quiet run (log
        lines then print above the live view)."""
        self.storage, self.run_uri, self.console = storage, run_uri, console
        self.interval_s = interval_s
        self.live = console.isatty() if live is None else live
        self.tallies = FileTallies(storage, run_uri)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.last: RunProgress | None = None
        self.shown: str | None = None
        self.shown_at = 0.0
        self._live: Any = None

    def poll(self) -> RunProgress | None:
        try:
            self.last = snapshot(self.storage, self.run_uri, self.tallies)
        except Exception as exc:  # noqa: BLE001 - the view must never stop the run
            log.debug("progress: could not read %s (%s)", self.run_uri, exc)
        return self.last

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            if (p := self.poll()) is not None:
                self._show(p)

    def _show(self, p: RunProgress, final: bool = False) -> None:
        if self._live is not None:
            self._live.update(render_table(p, final))
            return
        # The same counts again (the last look after the last tick, a pause) add nothing;
        # a long pause (engines loading) is still shown once a minute.
        key = f"{counts(p, final)} | {stage_line(p)}"
        if key != self.shown or time.monotonic() - self.shown_at >= 60:
            self.console.write(f"progress: {headline(p, final)} | {stage_line(p)}\n")
            self.console.flush()
            self.shown, self.shown_at = key, time.monotonic()

    def __enter__(self) -> ProgressView:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            target = getattr(self.console, "stream", self.console)  # the sink's own stream
            self._live = Live(console=Console(file=target), refresh_per_second=2, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
            if hasattr(self.console, "live"):
                self.console.live = self._live
        self.thread = threading.Thread(target=self._loop, name="bft-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.stopped.set()
        try:
            if self.thread is not None:
                self.thread.join(timeout=60)
            if (p := self.poll()) is not None:  # the final state, whatever the last tick showed
                self._show(p, final=exc_type is None)
        finally:
            if self._live is not None:
                if hasattr(self.console, "live"):
                    self.console.live = None
                self._live.stop()  # (shows the cursor again)
