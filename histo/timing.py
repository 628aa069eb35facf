"""Wall-clock timing for every room: a stopwatch and a dict of named durations.

>>> with stopwatch() as sw:  # doctest: +SKIP
...     work()
>>> sw.s  # seconds the block took (still running inside the block)
>>> timings = Timings()
>>> with timings.time("read_s"):  # adds the block's seconds to timings["read_s"]
...     read()

Clocks: ``time.perf_counter`` (monotonic, high resolution). Imports nothing from histo, so any
module may use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Stopwatch", "stopwatch", "Timings"]


class Stopwatch:
    """Seconds since it started (``s``), frozen by :meth:`stop` (or at the end of a ``with`` block)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.end: float | None = None

    @property
    def s(self) -> float:
        """Elapsed seconds: up to now while running, up to :meth:`stop` after it."""
        return (time.perf_counter() if self.end is None else self.end) - self.start

    def stop(self) -> float:
        """Stop the clock (the first call counts); returns the elapsed seconds."""
        if self.end is None:
            self.end = time.perf_counter()
        return self.s

    def __enter__(self) -> Stopwatch:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stopwatch() -> Stopwatch:
    """A started :class:`Stopwatch`; as a context manager it stops when the block ends."""
    return Stopwatch()


class Timings(dict):
    """Named durations in seconds (keys ending ``_s`` by histo's convention); a plain ``dict`` otherwise."""

    @contextmanager
    def time(self, key: str) -> Iterator[Stopwatch]:
        """Add the seconds the ``with`` block takes to ``self[key]`` (also when it raises)."""
        sw = Stopwatch()
        try:
            yield sw
        finally:
            self[key] = self.get(key, 0.0) + sw.stop()
