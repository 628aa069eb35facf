"""Peak resident memory of a process tree, sampled in a background thread (for the benchmarks)."""

from __future__ import annotations

import os
import threading
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (Dask nannies and workers included)."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # it has ended
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.bytes``: the largest summed RSS of ``pid`` (default
    this process) and its children seen every ``interval`` s while the block ran."""

    def __init__(self, pid: int | None = None, interval: float = 0.2):
        self.proc, self.interval, self.bytes = psutil.Process(pid or os.getpid()), interval, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.bytes = max(self.bytes, tree_rss(self.proc))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, tree_rss(self.proc))

    @property
    def gb(self) -> float:
        return self.bytes / 1e9


def timed(fn, *args, **kwargs):
    """(result, wall seconds, peak GB of this process tree) of ``fn(*args, **kwargs)``."""
    with PeakRSS() as peak:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        wall = time.perf_counter() - t
    return out, wall, peak.gb
