"""Shared fixtures: a Dask LocalCluster for the session, generated slides, and the pipeline bundles that
several modules read (made once per session). Plain helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def client():
    """A real dask.distributed LocalCluster of two worker processes (TensorFlow lives there only)."""
    from histo.run.cluster import dask_client

    with dask_client(n_workers=2) as c:
        yield c


@pytest.fixture(scope="session")
def generated(tmp_path_factory):
    """``generated(kind, size, seed, mpp)`` → path of a generated slide (cached per session)."""
    from histo_sample import write_sample

    cache: dict = {}
    folder = tmp_path_factory.mktemp("slides")

    def make(kind: str = "lymph-node", size: int = 1536, seed: int = 3, mpp: float = 0.5) -> Path:
        key = (kind, size, seed, mpp)
        if key not in cache:
            path = folder / f"{kind}-{size}-{seed}-{str(mpp).replace('.', 'p')}.ome.tif"
            write_sample(kind, path, size=size, seed=seed, mpp=mpp)
            cache[key] = path
        return cache[key]

    return make


def _bundle(generated, client, tmp_path_factory, kind, size, seed, workflow):
    from histo.run.pipeline import run_slide

    slide = generated(kind, size, seed)
    return slide, run_slide(slide, tmp_path_factory.mktemp(kind), workflow, client=client, show_progress=False)


@pytest.fixture(scope="session")
def lymph_node_bundle(generated, client, tmp_path_factory) -> tuple[Path, Path]:
    """(slide, bundle): ``run_slide`` of the default generated lymph node (1536² px at 0.5 µm/px, seed 3)
    with lymph-node-he and the shipped model, made once per session for every module that reads it.
    Read only: copy it (``shutil.copytree``) before changing anything in it."""
    return _bundle(generated, client, tmp_path_factory, "lymph-node", 1536, 3, "lymph-node-he")


@pytest.fixture(scope="session")
def synovium_bundle(generated, client, tmp_path_factory) -> tuple[Path, Path]:
    """(slide, bundle): ``run_slide`` of a generated synovium (1024² px at 0.5 µm/px, seed 3: tissue-1 and
    one aggregate) with synovium-he, made once per session. Read only: copy it before changing it."""
    return _bundle(generated, client, tmp_path_factory, "synovium", 1024, 3, "synovium-he")


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    """napari (``gui``) tests and the rest cannot share a process: TensorFlow, which the model tests
    load, and a napari viewer in one process segfault (STACK.md). Without a display they skip."""
    if len({item.get_closest_marker("gui") is not None for item in items}) == 2:
        raise pytest.UsageError(
            "the napari tests (marker gui) need a process without TensorFlow: run "
            "`pytest -m 'not gui'` and `pytest -m gui` separately (as `make test` does)"
        )
    # pytest-xvfb has started Xvfb and set DISPLAY by now, where Xvfb is installed; without a display
    # Qt aborts the whole process in pytest-qt's qapp, so the napari tests skip instead
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        skip = pytest.mark.skip(
            reason="napari tests need a display: install Xvfb (Debian: apt-get install xvfb; "
            "pytest-xvfb starts it) or set DISPLAY"
        )
        for item in items:
            if item.get_closest_marker("gui"):
                item.add_marker(skip)
