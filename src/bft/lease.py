"""One driver per run id: a lease object in the run folder (``_run/lease.json``).

Two drivers on one run (a manual re-run while the scheduled one runs, two retries of a
job) would both write stage files, each with dedup actors of its own that know nothing
of the other's documents. So a driver takes the run's lease before it plans anything:

- taken by creating the object only if there is none (S3 ``If-None-Match``, local
  ``O_EXCL``), so of two drivers starting together exactly one gets it;
- renewed every ``ttl/4`` while the run lives, by a conditional overwrite (S3
  ``If-Match``) of the version this driver wrote last;
- taken over only when stale: last renewed more than ``output.lease_ttl_s`` ago, or held
  by a process of this machine that no longer exists (a killed driver is resumed at
  once); the takeover is itself conditional on the stale version;
- given back (removed) when the attempt ends, however it ends.

A driver that finds the lease held exits with a message naming the holder. One that
loses its lease mid-run (its renewals stalled past the TTL and another driver took
over) stops: the other one now owns the run.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from bft.storage import Storage, join

LEASE_FILE = "_run/lease.json"
log = logging.getLogger("bft")


class LeaseHeld(RuntimeError):
    """Another live driver holds the run's lease."""


class LeaseLost(LeaseHeld):
    """This driver lost the run's lease mid-run; another driver owns the run now."""


def lease_uri(run_uri: str) -> str:
    return join(run_uri, LEASE_FILE)


def is_lease_file(uri: str, run_uri: str) -> bool:
    return uri.startswith(lease_uri(run_uri))  # the lease and its local lock file


def stale_reason(lease: dict[str, Any], default_ttl_s: float, now: float | None = None) -> str | None:
    """Why a lease may be taken over (its driver is gone), or None while its holder may
    be alive: unreadable, not renewed within its TTL, or held by an ended process of
    this machine."""
    if lease.get("unreadable"):
        return "it could not be read (a driver died while writing it)"
    age = (time.time() if now is None else now) - float(lease.get("renewed_at", 0))
    if age > float(lease.get("ttl_s", default_ttl_s)):
        return f"last renewed {age:.0f} s ago"
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int) and process_gone(lease["pid"]):
        return f"its process {lease['pid']} on this machine has ended"
    return None


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


class RunLease:
    def __init__(self, storage: Storage, run_uri: str, ttl_s: float, command: str = "bft run",
                 on_lost: Callable[[], None] = _thread.interrupt_main):
        self.storage, self.run_uri, self.ttl_s = storage, run_uri, ttl_s
        self.uri = lease_uri(run_uri)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.holder = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.command = command
        self.version: str | None = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.lost_to: str | None = None
        self.on_lost = on_lost  # default: stop the driver's main thread (KeyboardInterrupt)

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.holder, "host": self.host, "pid": self.pid, "command": self.command,
                           "renewed_at": now, "ttl_s": self.ttl_s,
                           "renewed_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}).encode()

    def _current(self) -> tuple[dict[str, Any], str] | None:
        found = self.storage.read_versioned(self.uri)
        if found is None:
            return None
        data, version = found
        try:
            return json.loads(data), version
        except ValueError:
            # Local creates write under the lock readers take and S3 puts are atomic, so a
            # lease that does not parse was left by a writer that died mid-write: stale.
            return {"holder": "?", "unreadable": True}, version

    def acquire(self) -> RunLease:
        for _ in range(3):
            body = self._body()
            created = self.storage.create_new(self.uri, body)
            current = self._current()
            if created and current is not None and current[0].get("holder") == self.holder:
                self.version = current[1]
                break
            if current is None:
                continue  # given back just now: try to create it again
            lease, version = current
            if lease.get("holder") == self.holder:  # our create landed; its reply was lost
                self.version = version
                break
            why = stale_reason(lease, self.ttl_s)
            if why is None:
                age = time.time() - float(lease.get("renewed_at", 0))
                raise LeaseHeld(
                    f"run {self.run_uri} is being worked on by another driver ({lease.get('command', 'bft')} "
                    f"on {lease.get('host', '?')}, pid {lease.get('pid', '?')}; its lease {self.uri} was renewed "
                    f"{age:.0f} s ago). Two drivers on one run would both write it: wait for that one to end. "
                    f"If it is dead, this command takes the run over once the lease is "
                    f"{lease.get('ttl_s', self.ttl_s):.0f} s old (output.lease_ttl_s).")
            new = self.storage.replace_if(self.uri, body, version)
            if new is not None:
                log.warning("run %s: took over the lease of %s (%s)", self.run_uri, lease.get("holder"), why)
                self.version = new
                break
        else:
            raise LeaseHeld(f"run {self.run_uri}: another driver keeps taking its lease {self.uri}; try again later")
        self.thread = threading.Thread(target=self._renew, name="bft-lease", daemon=True)
        self.thread.start()
        return self

    def _renew(self) -> None:
        while not self.stopped.wait(self.ttl_s / 4):
            try:
                body = self._body()
                new = self.storage.replace_if(self.uri, body, self.version or "")
                if new is None:
                    current = self._current()
                    if current is not None and current[0].get("holder") == self.holder:
                        new = current[1]  # our write landed; its reply was lost
                    else:
                        self.lost_to = current[0].get("holder") if current else "nobody (removed)"
                        log.error("run %s: lost its lease to %s; stopping this driver", self.run_uri, self.lost_to)
                        self.on_lost()
                        return
                self.version = new
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next renewal retries
                log.warning("run %s: could not renew its lease (%s); retrying", self.run_uri, exc)

    def release(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        if self.lost_to is not None:
            return
        current = self._current()
        if current is not None and current[0].get("holder") == self.holder:
            self.storage.remove([self.uri], missing_ok=True)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.release()
        # The interrupt on_lost sent is ours, not the user's Ctrl-C: say what happened in
        # one line instead of a KeyboardInterrupt traceback from wherever the run was.
        if self.lost_to is not None and (exc_type is None or issubclass(exc_type, KeyboardInterrupt)):
            if exc_type is None:  # the block ended first: take the interrupt still on its way here
                try:
                    time.sleep(0.5)
                except KeyboardInterrupt:
                    pass
            raise LeaseLost(
                f"run {self.run_uri}: this driver lost its lease {self.uri} to {self.lost_to} (its renewals "
                f"stalled past output.lease_ttl_s={self.ttl_s:.0f} s) and stopped; that driver owns the run now"
            ) from None
