"""Peak memory of a process and everything it starts (Ray's raylet, workers, vLLM engines).

Sampled from /proc every ``interval`` seconds. Three peaks are kept: RSS of the root
process (the driver), the summed RSS of its descendants (workers), and the summed PSS
of the whole tree. PSS splits shared pages (Ray's object store, shared libraries)
between the processes that map them, so the tree total is not inflated by sharing;
it is the figure the scaling check uses.
"""

from __future__ import annotations

import subprocess
import threading
import time

import psutil

MB = 1024 * 1024


class TreeMemory:
    def __init__(self, pid: int, interval: float = 0.5):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_driver_rss = 0
        self.peak_workers_rss = 0
        self.peak_total_pss = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        driver = workers = pss = 0
        for proc in procs:
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue  # exited between listing and reading
            if proc.pid == self.root.pid:
                driver = info.rss
            else:
                workers += info.rss
            pss += getattr(info, "pss", info.rss)
        self.peak_driver_rss = max(self.peak_driver_rss, driver)
        self.peak_workers_rss = max(self.peak_workers_rss, workers)
        self.peak_total_pss = max(self.peak_total_pss, pss)
        self.max_processes = max(self.max_processes, len(procs))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def summary(self) -> dict[str, float]:
        return {"peak_rss_driver_mb": round(self.peak_driver_rss / MB, 1),
                "peak_rss_workers_mb": round(self.peak_workers_rss / MB, 1),
                "peak_pss_total_mb": round(self.peak_total_pss / MB, 1),
                "max_processes": self.max_processes}


def run_measured(cmd: list[str], log_path, env=None) -> dict:
    """Run ``cmd`` to completion, output to ``log_path``; wall time and memory peaks."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        with TreeMemory(proc.pid) as mem:
            rc = proc.wait()
        wall = time.perf_counter() - started
    if rc != 0:
        tail = "".join(open(log_path, errors="replace").readlines()[-30:])
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {rc}); last lines of {log_path}:\n{tail}")
    return {"wall_s": round(wall, 2), **mem.summary()}
