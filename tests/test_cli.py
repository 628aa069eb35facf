"""The ``histo`` command as a user runs it: bad input ends in one clear line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from histo.bundle import is_complete


def histo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "histo.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_clean_error(result, path, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr
    for word in words:
        assert word in lines[0].lower(), lines[0]


def test_truncated_slide(generated, tmp_path):
    data = generated("lymph-node", size=1024, seed=2).read_bytes()
    bad = tmp_path / "cut.ome.tif"
    bad.write_bytes(data[: len(data) // 2])
    assert_clean_error(histo("run", bad, "--out", tmp_path / "out"), bad, "truncated")
    assert not (tmp_path / "out" / "cut").exists()


def test_not_a_slide(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not an image\n" * 20)
    assert_clean_error(histo("run", bad, "--out", tmp_path / "out"), bad, "not a slide")


def test_missing_file(tmp_path):
    assert_clean_error(histo("run", tmp_path / "nope.svs", "--out", tmp_path), tmp_path / "nope.svs")


def _plain_tiff(path, image, resolution=None):
    kwargs = {"resolution": resolution, "resolutionunit": "CENTIMETER"} if resolution else {}
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", **kwargs)


@pytest.mark.slow
def test_no_pixel_size_needs_mpp_and_glass_gives_an_empty_bundle(tmp_path):
    glass = np.full((768, 768, 3), 238, np.uint8) + np.random.default_rng(0).integers(0, 4, (768, 768, 3), dtype=np.uint8)
    path = tmp_path / "glass.tif"
    _plain_tiff(path, glass)
    assert_clean_error(histo("run", path, "--out", tmp_path / "out"), path, "pixel size", "--mpp")
    done = histo("run", path, "--out", tmp_path / "out", "--mpp", "0.5", "--quiet", "--workers", "1")
    assert done.returncode == 0, done.stderr
    bundle = tmp_path / "out" / "glass"
    assert is_complete(bundle)
    assert len(pd.read_parquet(bundle / "cells.parquet")) == 0
    run = json.loads((bundle / "run.json").read_text())
    assert run["n_cells"] == 0 and run["input"]["mpp_source"] == "argument" and run["warnings"]


def test_unknown_workflow_key(tmp_path, generated):
    wf = tmp_path / "mine.yaml"
    wf.write_text("name: mine\nsegmentaton: {}\n")
    slide = generated("lymph-node", size=1024, seed=2)
    assert_clean_error(histo("run", slide, "--out", tmp_path, "--workflow", wf), wf, "segmentaton")
