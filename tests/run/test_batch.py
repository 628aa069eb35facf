"""``histo batch`` end to end on generated slides: bundles and summary, failures recorded, re-runs
that reuse complete bundles, SIGKILL and restart, a cluster of separate ``dask`` processes, the
cohort table. Real LocalCluster, real scheduler and worker processes, the shipped model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histo.errors import HistoError
from histo.io.bundle import is_complete
from histo.run.batch import is_current, read_input, run_batch
from histo.run.cluster import WORKER_ENV
from histo.workflow import load_workflow
from histo_sample import write_sample

GOOD = {"a": ("lymph-node", 11), "b": ("synovium", 12), "c": ("lymph-node", 13)}
SIZE, MPP = 512, 0.5  # px, µm/px of the generated slides
BIN = Path(sys.executable).parent


def histo_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "histo.cli", *map(str, args)]


def bundles(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def cells(bundle: Path) -> pd.DataFrame:
    return pd.read_parquet(bundle / "cells.parquet")


def assert_same_tables(out: Path, reference: Path) -> None:
    for name in GOOD:
        assert is_complete(out / name)
        pd.testing.assert_frame_equal(cells(out / name), cells(reference / name))


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """A folder of three good generated slides and a truncated copy of the first."""
    folder = tmp_path_factory.mktemp("slides")
    for name, (kind, seed) in GOOD.items():
        write_sample(kind, folder / f"{name}.ome.tif", size=SIZE, seed=seed, mpp=MPP)
    data = (folder / "a.ome.tif").read_bytes()
    (folder / "cut.ome.tif").write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="module")
def reference(slides, client, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """An uninterrupted batch over the folder on the session's LocalCluster."""
    out = tmp_path_factory.mktemp("reference")
    return out, run_batch(read_input(slides), out, client, show_progress=False)


pytestmark = pytest.mark.slow


def test_three_bundles_and_the_broken_file_in_the_summary(slides, reference):
    out, returned = reference
    assert bundles(out) == sorted(GOOD) and all(is_complete(out / n) for n in GOOD)
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    summary = pd.read_csv(out / "summary.csv").set_index("name")
    assert list(summary.index) == ["a", "b", "c", "cut"] and len(returned) == 4
    assert (summary.loc[list(GOOD), "status"] == "ok").all()
    assert summary.loc["cut", "status"] == "failed"
    assert str(slides / "cut.ome.tif") in summary.loc["cut", "error"] and "truncated" in summary.loc["cut", "error"]
    for name in GOOD:  # slide-level metrics of each bundle
        run = json.loads((out / name / "run.json").read_text())
        slide_row = pd.read_csv(out / name / "metrics.csv").set_index("region_id").loc["slide"]
        assert run["n_cells"] == len(cells(out / name)) >= summary.loc[name, "n_cells"] == slide_row["n_cells"] > 0
        assert summary.loc[name, "area_mm2"] == pytest.approx(slide_row["area_mm2"]) and slide_row["area_mm2"] > 0
        assert summary.loc[name, "n_tiles"] == run["n_tiles"] > 0
        assert run["fingerprint"] and summary.loc[name, "reused"] == False  # noqa: E712


def test_second_run_redoes_nothing(slides, reference, client):
    out, _ = reference
    before = {n: [(out / n / f).stat().st_mtime_ns for f in ("run.json", "cells.parquet", "metrics.csv")] for n in GOOD}
    t = time.perf_counter()
    summary = run_batch(read_input(slides), out, client, show_progress=False).set_index("name")
    elapsed = time.perf_counter() - t
    after = {n: [(out / n / f).stat().st_mtime_ns for f in ("run.json", "cells.parquet", "metrics.csv")] for n in GOOD}
    assert after == before and summary.loc[list(GOOD), "reused"].all()
    assert summary.loc["cut", "status"] == "failed"  # tried again: the file may have been replaced
    assert elapsed < 20, elapsed


def test_fingerprint_follows_content_and_parameters(slides, reference, monkeypatch):
    out, _ = reference
    wf = load_workflow("lymph-node-he")
    slide, bundle = slides / "a.ome.tif", out / "a"
    assert is_current(bundle, slide, wf, None, None)
    stat = slide.stat()
    os.utime(slide, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same content: still current
    assert is_current(bundle, slide, wf, None, None)
    os.utime(slide, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = wf.replace(segmentation=wf.segmentation.replace(prob_thresh=0.7))
    assert not is_current(bundle, slide, changed, None, None)
    assert is_current(bundle, slide, wf.replace(endpoints=wf.endpoints.replace(rest=False)), None, None)  # cohort only
    assert not is_current(bundle, slide, load_workflow("synovium-he"), None, None)
    assert not is_current(bundle, slide, wf, None, MPP)  # an --mpp override is a parameter
    assert not is_current(bundle, slides / "c.ome.tif", wf, None, None)  # another slide's content
    made_in = json.loads((bundle / "run.json").read_text())["parameters"]["precision"]
    monkeypatch.setenv("HISTO_PRECISION", "float32" if made_in == "bfloat16" else "bfloat16")
    assert not is_current(bundle, slide, wf, None, None)  # the network's arithmetic differs


def test_killed_run_restarts_to_the_same_tables(slides, reference, client, tmp_path):
    ref, _ = reference
    out = tmp_path / "out"
    log = tmp_path / "batch.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            histo_cmd("batch", slides, "--out", out, "--workers", 2, "--quiet"),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and any(is_complete(out / n) for n in GOOD):
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:  # the killed run's worker processes
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "Dask dashboard: http://127.0.0.1:" in log.read_text()
    done = [n for n in GOOD if is_complete(out / n)]
    assert 1 <= len(done) < len(GOOD), f"not killed mid-way: {done}"
    kept = {n: (out / n / "run.json").stat().st_mtime_ns for n in done}

    summary = run_batch(read_input(slides), out, client, show_progress=False).set_index("name")
    assert {n: (out / n / "run.json").stat().st_mtime_ns for n in done} == kept
    assert summary.loc[done, "reused"].all() and not summary.loc[sorted(set(GOOD) - set(done)), "reused"].any()
    assert bundles(out) == sorted(GOOD) and not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert_same_tables(out, ref)


@pytest.fixture
def dask_processes(tmp_path):
    """A scheduler and two single-threaded workers, each its own ``dask`` process on 127.0.0.1;
    yields the scheduler's address."""
    env = {**os.environ, **WORKER_ENV}
    file = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                BIN / "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                file,
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 120
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        procs += [
            subprocess.Popen(
                [
                    BIN / "dask",
                    "worker",
                    "--scheduler-file",
                    file,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                ],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(2)
        ]
        yield json.loads(file.read_text())["address"]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_cluster_of_separate_processes_gives_the_same_tables(slides, reference, dask_processes, tmp_path):
    from distributed import Client

    ref, _ = reference
    with Client(dask_processes) as c:
        c.wait_for_workers(2, timeout=300)
        workers = c.nthreads()
        assert len(workers) == 2 and all(a.startswith("tcp://127.0.0.1:") for a in workers)
    out = tmp_path / "out"
    done = subprocess.run(
        histo_cmd("batch", slides, "--out", out, "--scheduler", dask_processes, "--quiet"),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr
    assert "Dask dashboard: http://127.0.0.1:" in done.stdout and "3 ok (0 reused), 1 failed" in done.stdout
    assert_same_tables(out, ref)


def test_generated_cohort_gives_paired_rows(slides, reference, client, tmp_path):
    ref, _ = reference
    more = tmp_path / "more"
    more.mkdir()
    write_sample("synovium", more / "d.ome.tif", size=SIZE, seed=14, mpp=MPP)
    write_sample("lymph-node", more / "e.ome.tif", size=SIZE, seed=15, mpp=MPP)
    out = tmp_path / "out"
    for name in GOOD:  # bundles from the folder run, to be reused where the workflow is the same
        shutil.copytree(ref / name, out / name)
    sheet_dir = tmp_path / "sheet"
    sheet_dir.mkdir()
    rows = [
        ("a", slides, "P1", "pre", "lymph node", "H&E"),
        ("c", slides, "P1", "post", "lymph node", "H&E"),
        ("b", slides, "P2", "Pre", "synovium", "H&E"),
        ("d", more, "P2", "Post", "synovium", "H&E"),
        ("e", more, "P3", "pre", "lymph node", "H&E"),
        ("cut", slides, "P3", "post", "lymph node", "H&E"),
    ]
    sheet = pd.DataFrame(
        [(os.path.relpath(folder / f"{n}.ome.tif", sheet_dir), *rest) for n, folder, *rest in rows],
        columns=["slide", "patient", "timepoint", "tissue", "stain"],
    )
    sheet.to_csv(sheet_dir / "sheet.csv", index=False)

    summary = run_batch(read_input(sheet_dir / "sheet.csv"), out, client, show_progress=False).set_index("name")
    assert list(summary.status) == ["ok"] * 5 + ["failed"]
    # a, c: same content and workflow as the folder run; b: now synovium-he, so redone
    assert list(summary.reused) == [True, True, False, False, False, False]
    assert json.loads((out / "b" / "run.json").read_text())["workflow"]["name"] == "synovium-he"
    assert (summary.patient == sheet.patient.to_numpy()).all()

    cohort = pd.read_csv(out / "cohort.csv")
    assert set(zip(cohort.tissue, cohort.patient)) == {("lymph node", "P1"), ("synovium", "P2")}
    density = cohort[cohort.metric == "density_cells_per_mm2"].set_index("patient")
    assert density.loc["P1", "pre"] == pytest.approx(summary.loc["a", "density_cells_per_mm2"])
    assert density.loc["P1", "post"] == pytest.approx(summary.loc["c", "density_cells_per_mm2"])
    assert density.loc["P2", "slides_pre"] == "b" and density.loc["P2", "slides_post"] == "d"
    assert density.loc["P1", "area_mm2_pre"] == pytest.approx(summary.loc["a", "area_mm2"])
    assert np.allclose(cohort["change"], cohort["post"] - cohort["pre"])
    assert not cohort.metric.str.endswith("_n_cells").any() and "n_cells" not in set(cohort.metric)
    tests = pd.read_csv(out / "cohort_tests.csv")
    assert tests.n.isin([0, 1]).all() and (tests.n == 1).any() and tests.p_value.isna().all()
    # a declared endpoint without a paired value (no follicle, so no mantle) keeps its row and says why
    assert tests.loc[tests.n == 0, "test"].str.startswith("not tested").all()
    primary = tests[tests.family == "primary"]  # each tissue's preset declares its primary endpoints
    assert {"fraction_area_follicle", "krenn_sum"} <= set(primary.metric)
    assert (out / "cohort.html").stat().st_size > 0


def test_sample_sheet_errors_name_the_file(tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("path,patient\nx.svs,P1\n")
    with pytest.raises(HistoError, match="sheet.csv: the sample sheet needs a 'slide' column"):
        read_input(sheet)
    sheet.write_text("slide,patient\none/x.svs,P1\ntwo/x.svs,P2\n")
    with pytest.raises(HistoError, match="share the bundle name 'x'"):
        read_input(sheet)
    sheet.write_text("slide,mpp\nx.svs,0.25µm\n")
    with pytest.raises(HistoError, match="mpp must be a number of µm per px, got '0.25µm'"):
        read_input(sheet)
    done = subprocess.run(
        histo_cmd("batch", tmp_path / "nothing", "--out", tmp_path / "out"), capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(tmp_path / "nothing") in done.stderr
