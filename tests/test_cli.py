"""The ``histo`` command as a user runs it: bad input ends in one clear line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import assert_clean_error, histo

from histo.io.bundle import is_complete


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
    glass = np.full((768, 768, 3), 238, np.uint8) + np.random.default_rng(0).integers(
        0, 4, (768, 768, 3), dtype=np.uint8
    )
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


def test_version_exit_codes_and_options_after_the_subcommand(capsys):
    from histo.cli import parser

    with pytest.raises(SystemExit):
        parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("histo 0.")
    assert "exit codes:" in parser().format_help() and "130" in parser().format_help()
    args = parser().parse_args(["run", "s.svs", "--out", "o", "--debug", "-v", "--log-level", "INFO"])
    assert args.debug and args.verbose and args.log_level == "INFO"
    args = parser().parse_args(["--debug", "run", "s.svs", "--out", "o"])  # before it too
    assert args.debug and not args.verbose and args.log_level is None
    assert parser().parse_args(["batch", "d", "--out", "o", "--scheduler-file", "s.json"]).scheduler_file == "s.json"


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, monkeypatch):
    from histo.cli import main
    from histo.errors import HistoError

    monkeypatch.setenv("HISTO_VERBOSE", "0")  # restored after: main sets it with --debug
    assert main(["run", str(tmp_path / "nope.svs"), "--out", str(tmp_path)]) == 2
    with pytest.raises(HistoError):
        main(["run", str(tmp_path / "nope.svs"), "--out", str(tmp_path), "--debug"])


def test_scheduler_file_and_environment(tmp_path, capsys):
    import dask

    from histo.cli import main
    from histo.run.cluster import scheduler_address

    (tmp_path / "scheduler.json").write_text(json.dumps({"address": "tcp://10.0.0.1:8786", "type": "Scheduler"}))
    assert scheduler_address(None, str(tmp_path / "scheduler.json")) == "tcp://10.0.0.1:8786"
    assert scheduler_address("tcp://a:1", str(tmp_path / "scheduler.json")) == "tcp://a:1"
    with dask.config.set({"scheduler-address": "tcp://10.0.0.2:8786"}):  # what DASK_SCHEDULER_ADDRESS sets
        assert scheduler_address() == "tcp://10.0.0.2:8786"
    missing = str(tmp_path / "no.json")
    assert main(["batch", str(tmp_path), "--out", str(tmp_path / "o"), "--scheduler-file", missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no.json" in err[0] and "scheduler file" in err[0]


def test_export_needs_a_bundle_and_a_format(tmp_path, capsys):
    from histo.cli import main

    assert main(["export", str(tmp_path), "--spatialdata"]) == 2
    assert "not a complete histo bundle" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2
    assert "--spatialdata" in capsys.readouterr().err


QUIET_SCRIPT = """
import logging

def work():
    import squidpy  # docrep's SyntaxWarnings, spatialdata's logger
    import tensorflow  # absl / oneDNN lines on load
    logging.getLogger("spatialdata._logging").info("an INFO line")
    return "ok"

if __name__ == "__main__":
    from histo.cli import _setup_output, parser
    from histo.run.cluster import dask_client

    _setup_output(parser().parse_args(["export", "x"]))
    with dask_client(n_workers=1) as client:
        print(client.submit(work).result())
"""


@pytest.mark.slow
def test_workers_start_quiet(tmp_path):
    """A worker that imports squidpy and TensorFlow and logs spatialdata INFO prints nothing (histo.run.cluster)."""
    script = tmp_path / "quiet.py"
    script.write_text(QUIET_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert done.stderr == "", done.stderr


def test_sample_builds_a_post_treatment_section_and_refuses_it_for_synovium(tmp_path):
    """`histo sample --section 1 --treatment belimumab`: the same patient's node with smaller, fewer follicles."""
    import geopandas as gpd

    def follicle_area_um2(*extra):
        out = tmp_path / f"ln{len(extra)}.ome.tif"
        result = histo("sample", "lymph-node", out, "--size", 3072, "--seed", 4, *extra)
        assert result.returncode == 0, result.stderr
        truth = gpd.read_file(out.with_name(out.name.replace(".ome.tif", ".truth.geojson")))
        return truth.loc[truth["kind"] == "follicle"].area.sum()

    before, after = follicle_area_um2(), follicle_area_um2("--section", 1, "--treatment", "belimumab")
    assert 0 < after < 0.8 * before, (before, after)
    refused = histo("sample", "synovium", tmp_path / "s.ome.tif", "--size", 512, "--treatment", "belimumab")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "lymph-node samples only" in refused.stderr and not (tmp_path / "s.ome.tif").exists()
