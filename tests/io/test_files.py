"""histo.io.files (atomic writes, JSON) and histo.timing (stopwatch, timings)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from histo.io.files import atomic_write, read_json, write_json
from histo.timing import Timings, stopwatch


def test_atomic_write_text_bytes_and_context_manager(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write(p, "µm\n")
    assert p.read_text(encoding="utf-8") == "µm\n"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    with atomic_write(tmp_path / "b.bin", unique=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f"b.bin.tmp{os.getpid()}"
        tmp.write_bytes(b"x")
        assert not (tmp_path / "b.bin").exists()  # only replaced at the end of the block
    assert (tmp_path / "b.bin").read_bytes() == b"x"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    p = tmp_path / "keep.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["keep.json"]


def test_json_round_trip_with_numpy_values_and_missing_files(tmp_path):
    p = write_json(tmp_path / "c.json", {"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(2), "p": Path("m")})
    assert read_json(p) == {"n": 3, "x": 0.5, "a": [0, 1], "p": "m"}
    assert json.loads(p.read_text())["n"] == 3 and p.read_text().startswith("{\n  ")
    assert read_json(tmp_path / "none.json", missing=None) is None
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "none.json")
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json(tmp_path / "d.json", {"o": object()})
    assert not (tmp_path / "d.json").exists()


def test_stopwatch_and_timings():
    with stopwatch() as sw:
        running = sw.s
        time.sleep(0.02)
        assert sw.s >= running + 0.02  # it runs inside the block
    frozen = sw.s
    time.sleep(0.01)
    assert sw.s == frozen and sw.stop() == frozen
    t = Timings()
    with t.time("a_s"):
        pass
    with pytest.raises(ValueError):
        with t.time("a_s"):
            raise ValueError
    assert set(t) == {"a_s"} and t["a_s"] > 0 and isinstance(t, dict)
