"""One driver per run id (lease.py) on local storage; the S3 form is tested against the moto
server (tests/e2e/test_pipeline_s3.py), two real drivers in tests/e2e/test_errors.py."""

from __future__ import annotations

import json
import threading
import time

import pytest

from bft.config import StorageConfig
from bft.lease import LEASE_FILE, LeaseHeld, LeaseLost, RunLease
from bft.storage import Storage

STORAGE = Storage(StorageConfig())


def plant(run_uri, **lease) -> None:
    path = run_uri / LEASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"holder": "h", "host": "elsewhere", "pid": 1, "ttl_s": 120, **lease}))


def test_a_second_driver_is_refused_naming_the_holder_until_the_first_gives_back(tmp_path):
    first = RunLease(STORAGE, str(tmp_path), ttl_s=120).acquire()
    with pytest.raises(LeaseHeld, match=rf"another driver \(bft run on .*, pid {first.pid};"):
        RunLease(STORAGE, str(tmp_path), ttl_s=120).acquire()
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    RunLease(STORAGE, str(tmp_path), ttl_s=120).acquire().release()


def test_of_drivers_starting_together_exactly_one_gets_the_lease(tmp_path):
    results, barrier = [], threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        try:
            results.append(RunLease(STORAGE, str(tmp_path), ttl_s=120).acquire())
        except LeaseHeld:
            results.append(None)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1


def test_a_stale_lease_is_taken_over_and_a_fresh_one_from_elsewhere_is_not(tmp_path):
    plant(tmp_path, renewed_at=time.time() - 5)
    with pytest.raises(LeaseHeld, match="renewed 5 s ago"):
        RunLease(STORAGE, str(tmp_path), ttl_s=120).acquire()
    plant(tmp_path, renewed_at=time.time() - 500)
    lease = RunLease(STORAGE, str(tmp_path), ttl_s=120).acquire()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["holder"] == lease.holder
    lease.release()


def test_a_lease_of_an_ended_process_on_this_machine_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    plant(tmp_path, host=socket.gethostname(), pid=gone.pid, renewed_at=time.time())
    lease = RunLease(STORAGE, str(tmp_path), ttl_s=120).acquire()  # raises LeaseHeld if not taken over
    assert json.loads((tmp_path / LEASE_FILE).read_text())["holder"] == lease.holder
    lease.release()


def test_the_lease_is_renewed_while_held_and_a_lost_lease_stops_its_driver(tmp_path):
    lost = threading.Event()
    lease = RunLease(STORAGE, str(tmp_path), ttl_s=0.4, on_lost=lost.set).acquire()
    first = json.loads((tmp_path / LEASE_FILE).read_text())["renewed_at"]
    time.sleep(0.5)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["renewed_at"] > first and not lost.is_set()
    plant(tmp_path, holder="usurper", renewed_at=time.time())  # another driver took it over
    assert lost.wait(2) and lease.lost_to == "usurper"
    lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["holder"] == "usurper"  # not removed: not ours


def test_a_driver_that_loses_its_lease_stops_with_one_clear_error(tmp_path):
    with pytest.raises(LeaseLost, match="lost its lease .* to usurper"):
        with RunLease(STORAGE, str(tmp_path), ttl_s=0.4):  # default on_lost: interrupt the main thread
            plant(tmp_path, holder="usurper", renewed_at=time.time())
            time.sleep(5)  # the run's work; the interrupt ends it
    assert json.loads((tmp_path / LEASE_FILE).read_text())["holder"] == "usurper"


def test_a_lease_left_empty_by_a_driver_that_died_writing_it_is_taken_over(tmp_path):
    (tmp_path / LEASE_FILE).parent.mkdir(parents=True)
    (tmp_path / LEASE_FILE).write_bytes(b"")  # created, never written
    lease = RunLease(STORAGE, str(tmp_path), ttl_s=60).acquire()
    try:
        assert json.loads((tmp_path / LEASE_FILE).read_text())["holder"] == lease.holder
    finally:
        lease.release()
