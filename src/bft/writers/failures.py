"""Why batches failed: the engine's (or Ray's) own first error line for every batch that
failed, kept in the run folder (``_run/failures/``), so the ``batch_failed`` drop records,
the manifest and the summary can say what went wrong instead of pointing at logs that a
scheduled run's operator may never see.

Two writers: an engine replica that is about to exit because its engine died (the error
it met is lost with the process otherwise), and the driver, which sees every block Ray
Data gives up on (:class:`RayDataFailures`)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from bft.redaction import mask
from bft.storage import Storage, join

FAILURES_DIR = "_run/failures"
MAX_LINE = 300
_RAY_DATA_ERROR = 'An exception was raised from a task of operator "'


def root_cause(exc: BaseException) -> BaseException:
    """The innermost error: Ray's task errors carry the original as ``cause``, ours chain
    with ``raise ... from``."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)
        inner = inner if isinstance(inner, BaseException) else exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def error_line(exc: BaseException) -> str:
    """``Type: first line of its text`` of the innermost error, cut to a readable length."""
    cause = root_cause(exc)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0][:MAX_LINE] if lines else '(no message)'}"


def record_failure(storage: Storage, run_uri: str, where: str, error: str, origin: str) -> None:
    """Keep one failure (``origin``: ``engine`` or ``ray``); never raises, since it runs
    on the way out of something that already failed."""
    name = f"{time.time_ns()}-{os.getpid()}.json"
    record = {"where": where, "error": mask(error)[:MAX_LINE * 2], "origin": origin, "time": time.time()}
    try:
        storage.write_bytes(join(run_uri, FAILURES_DIR, name), json.dumps(record).encode())
    except Exception:  # noqa: BLE001 - the failure itself is logged by the caller
        logging.getLogger("bft").warning("could not record the failure %r in %s", record, run_uri)


def read_failures(storage: Storage, run_uri: str) -> list[dict[str, Any]]:
    """The recorded failures, oldest first."""
    return sorted(storage.read_json_files(join(run_uri, FAILURES_DIR)), key=lambda r: r.get("time", 0))


def first_error(failures: list[dict[str, Any]]) -> str | None:
    """The error to show for a failed batch: an engine's own line wins over Ray's account
    of it (a replica that exited shows in Ray only as "the actor died")."""
    for origin in ("engine", "ray"):
        for record in failures:
            if record.get("origin") == origin:
                return record["error"]
    return None


class RayDataFailures(logging.Handler):
    """Records every block Ray Data gives up on, from the error it logs in the driver
    (``DataContext.max_errored_blocks``), while attached to the ``ray.data`` logger."""

    def __init__(self, storage: Storage, run_uri: str):
        super().__init__(level=logging.ERROR)
        self.storage, self.run_uri = storage, run_uri
        self.logger = logging.getLogger("ray.data")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith(_RAY_DATA_ERROR) or not record.exc_info or record.exc_info[1] is None:
            return
        operator = message[len(_RAY_DATA_ERROR):].split('"', 1)[0]
        record_failure(self.storage, self.run_uri, operator, error_line(record.exc_info[1]), "ray")

    def __enter__(self) -> RayDataFailures:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self)
