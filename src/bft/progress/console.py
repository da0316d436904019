"""A quiet console while a run goes: Ray's, vLLM's and bft's own logs go to a log file,
the console keeps the progress view, bft's warnings and every error.

A run on a few dozen documents used to print hundreds of lines of engine start-up and
teardown logs, with the summary at the very end. The routing works on the process's
standard streams (the masked ones of :func:`redaction.masked_console`, whose handlers
every logger, Ray's included, writes through) and on the root logger's handlers, so
whatever prints, a library or a Ray worker whose output Ray forwards to the driver, ends
up in the file, masked like the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

from bft.redaction import MaskedStream

LOG_DIR_ENV = "BFT_LOG_DIR"
# Lines of forwarded or library output that still reach the console.
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def default_log_path() -> Path:
    home = os.environ.get("HOME") or "/tmp"  # (a job environment may have no HOME)
    folder = Path(os.environ.get(LOG_DIR_ENV) or Path(home) / ".cache" / "bft" / "logs")
    return folder / f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _fileno(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None


class ConsoleSink:
    """The user's console while output is routed: log lines and errors are written here;
    while a live progress view is drawn, they are printed above it instead of through it."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.live: object | None = None  # a rich Live, set by the progress view while it draws
        self.failed = False  # the routed block ended with an unexplained error

    def write(self, text: str) -> int:
        live = self.live
        if live is not None:
            for line in text.rstrip("\n").split("\n"):
                live.console.print(line, markup=False, highlight=False, soft_wrap=True)  # type: ignore[attr-defined]
        else:
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())


class _Router:
    """Everything to the log; whole lines that look like errors to the console too."""

    def __init__(self, log: TextIO, console: TextIO):
        self.log, self.console = log, console
        self.pending = ""

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        if "\n" in self.pending:
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                if _ERROR_LINE.search(line):
                    self.console.write(line + "\n")
            if len(self.pending) > 65536:  # a stream without newlines: stop holding it
                self.pending = ""
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> object:
        return getattr(self.log, name)


class _ConsoleFilter(logging.Filter):
    """bft's own messages from ``level`` up (the driver's: what a run decides, its
    warnings) and anyone's errors. Workers' logs reach the driver as text, through the
    router, not as records."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.levelno >= self.level and
                                                   record.name.split(".")[0] == "bft")


@contextlib.contextmanager
def quiet_run(log_path: Path, level: int = logging.INFO,
              explained: tuple[type[BaseException], ...] = ()) -> Iterator[ConsoleSink]:
    """Route the process's output to ``log_path`` for the block; yields the user's console
    (masked), for the progress view and what is meant for the user. Every change is
    undone on the way out, however the block ends; a block that fails with an error not
    in ``explained`` (those that say what is wrong in one line) also shows the last lines
    of the log: a native crash writes to the descriptors, not through the filter."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Ray Data's own progress bars would only fill the log with redraws.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with contextlib.ExitStack() as undo:
        raw = undo.enter_context(open(log_path, "a", buffering=1, encoding="utf-8", errors="replace"))
        log_file = MaskedStream(raw)  # type: ignore[arg-type]
        out, err = sys.stdout, sys.stderr
        console_err = err._stream if isinstance(err, MaskedStream) else err
        # What Ray's core, vLLM's kernels and other native code write goes to the file
        # descriptors, past Python's streams: point descriptors 1 and 2 at the log too,
        # and give the console a descriptor of its own.
        for stream in (out, err):
            stream.flush()
        if _fileno(console_err) == 2 and _is_open(2):
            console_err = undo.enter_context(os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8",
                                                       errors="replace"))
        sink = ConsoleSink(MaskedStream(console_err))  # type: ignore[arg-type]
        undo.callback(_show_tail_on_error, undo, log_path, sink)
        for fd in (1, 2):
            if _is_open(fd):
                saved = os.dup(fd)
                undo.callback(os.close, saved)
                undo.callback(os.dup2, saved, fd)
                undo.callback(raw.flush)
                os.dup2(raw.fileno(), fd)

        root = logging.getLogger()
        undo.callback(setattr, root, "handlers", root.handlers[:])
        undo.callback(root.setLevel, root.level)
        file_handler = logging.StreamHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        console_handler = logging.StreamHandler(sink)  # type: ignore[arg-type]
        console_handler.setFormatter(logging.Formatter(_FORMAT))
        console_handler.addFilter(_ConsoleFilter(level))
        # The console handler of logging.basicConfig gives way; others (a test's capture) stay.
        kept = [h for h in root.handlers if not (type(h) is logging.StreamHandler and h.stream in (out, err))]
        root.handlers = [*kept, file_handler, console_handler]
        root.setLevel(min(root.level or logging.INFO, logging.INFO))

        # Handlers made earlier (Ray's own) hold the masked streams: send what they carry
        # through the router by swapping what those streams write to.
        for stream in (out, err):
            if isinstance(stream, MaskedStream):
                undo.callback(setattr, stream, "_stream", stream._stream)
                # (what reaches it is masked already; the sink masks again, harmlessly)
                stream._stream = _Router(raw, sink)  # type: ignore[arg-type, assignment]
        # Loggers with handlers of their own (Ray's "ray" tree) may hold the console
        # streams themselves, whenever they were made: those handlers write to the router.
        consoles = {id(x) for x in (out, err, console_err, sys.__stdout__, sys.__stderr__) if x is not None}
        for name in list(logging.Logger.manager.loggerDict):
            library = name.split(".")[0] in ("ray", "vllm")
            for handler in getattr(logging.getLogger(name), "handlers", []):
                stream = getattr(handler, "stream", None)
                # handlers on the console streams, or (Ray's, vLLM's) on descriptors 1 and 2 (a
                # handler writing to a buffer of its own, a test's capture, is left alone)
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                        and (id(stream) in consoles or (library and _fileno(stream) in (1, 2))):
                    try:
                        previous = handler.setStream(_Router(log_file, sink))  # type: ignore[arg-type]
                    except (AttributeError, ValueError):  # a fixed stream (logging's last resort), a closed one
                        continue
                    if previous is not None:
                        undo.callback(handler.setStream, previous)
        undo.callback(setattr, sys, "stdout", out)
        undo.callback(setattr, sys, "stderr", err)
        if not isinstance(out, MaskedStream):
            sys.stdout = _Router(log_file, sink)  # type: ignore[arg-type, assignment]
        if not isinstance(err, MaskedStream):
            sys.stderr = _Router(log_file, sink)  # type: ignore[arg-type, assignment]
        try:
            yield sink
        except explained:
            raise
        except BaseException:
            sink.failed = True
            raise


TAIL_LINES = 15


def _show_tail_on_error(undo: contextlib.ExitStack, log_path: Path, sink: ConsoleSink) -> None:
    if not sink.failed:
        return
    try:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-TAIL_LINES:]
    except OSError:
        return
    sink.write(f"the last {len(tail)} lines of {log_path}:\n" + "".join(f"  {line}\n" for line in tail))
