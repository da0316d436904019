"""How long each engine replica of a run held its accelerators: the GPU-seconds of the
manifest's ``cost`` (``writers/cost.py``).

A replica notes its start (before its engine loads: a loading GPU is paid for too) and,
after every batch it finishes, the time it was last busy, in one small file per replica
(``_run/replicas/``). Idle time after its last batch, until Ray removes it, is not in it:
that depends on the cluster's idle timeout, not on the run.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

from bft.storage import Storage, join

REPLICAS_DIR = "_run/replicas"


class ReplicaClock:
    def __init__(self, storage: Storage, run_uri: str, stages: tuple[str, ...], gpus: float):
        self.storage, self.stages, self.gpus = storage, list(stages), gpus
        self.uri = join(run_uri, REPLICAS_DIR, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        self.started_at = time.time()
        self.node_id = _node_id()
        self.tick()

    def tick(self) -> None:
        """The replica was busy until now. Never raises: the accounting must not fail a batch."""
        record = {"stages": self.stages, "gpus": self.gpus, "node_id": self.node_id, "started_at": self.started_at,
                  "last_active": time.time()}
        try:
            self.storage.write_bytes(self.uri, json.dumps(record).encode())
        except Exception:  # noqa: BLE001
            pass


def _node_id() -> str | None:
    """The Ray node the replica runs on (where the autoscaler put it)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


def read_replicas(storage: Storage, run_uri: str) -> list[dict[str, Any]]:
    return storage.read_json_files(join(run_uri, REPLICAS_DIR))
