"""The Analyze widget under Xvfb, opened from the Plugins menu: a drawn rectangle becomes a bundle
placed on the slide, with the analysis in Dask worker processes and TensorFlow never imported in the
viewer's process; the bars (the widget's, the activity panel's) count tiles; Cancel stops the tasks
and leaves no bundle."""

import json
import sys

import numpy as np
import pandas as pd
import pytest

from histo.io.bundle import is_complete, partial_dir, slide_name
from histo.train.matching import match_points

pytestmark = [pytest.mark.gui, pytest.mark.slow]


def analyze_widget(viewer, client):
    """The Analyze widget as the Plugins menu opens it, on ``client``'s scheduler."""
    widget = viewer.window.add_plugin_dock_widget("napari-histo", "Analyze")[1]
    widget.form.scheduler.value = client.scheduler.address
    return widget


def test_analyze_rectangle(generated, client, make_napari_viewer, qtbot, tmp_path):
    slide = generated("synovium", size=1024, seed=3)
    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="napari-histo")
    box = np.array([[100.0, 150.0], [100.0, 330.0], [260.0, 330.0], [260.0, 150.0]])  # (y, x) µm
    shapes = viewer.add_shapes([box], shape_type="rectangle", name="roi")
    widget = analyze_widget(viewer, client)
    form = widget.form
    form.region.value, form.workflow.value, form.out.value = shapes, "synovium-he", tmp_path
    values = []
    widget.progress.valueChanged.connect(values.append)
    widget.run_button.click()
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=600_000)
    assert "tensorflow" not in sys.modules
    assert widget.status.text().startswith("bundle written"), widget.status.text()

    nuclei = next(lyr for lyr in viewer.layers if lyr.name.endswith(" nuclei"))
    bundle = nuclei.metadata["bundle"]
    n_tiles = json.loads(open(f"{bundle}/run.json").read())["n_tiles"]
    assert n_tiles >= 1 and widget.progress.maximum() == n_tiles and values[-1] == n_tiles
    assert values == sorted(values) and widget.progress.text().endswith("(100%)")
    assert widget.bar.total == widget.bar.n == n_tiles  # the activity panel's bar
    cells = pd.read_parquet(f"{bundle}/cells.parquet", columns=["x_um", "y_um"])
    grid = nuclei.scale[-1]
    assert np.allclose(nuclei.translate, np.array([100.0, 150.0]) + grid / 2)  # the crop's corner on the slide
    assert cells.x_um.max() <= 180 and cells.y_um.max() <= 160
    # nuclei found in the crop, moved by the crop's origin, are the slide's true nuclei there
    truth = pd.read_parquet(str(slide).replace(".ome.tif", ".truth.parquet"))
    inside = truth[truth.x_um.between(155, 325) & truth.y_um.between(105, 255)]
    m = match_points(cells[["x_um", "y_um"]].to_numpy() + (150.0, 100.0), inside[["x_um", "y_um"]].to_numpy(), 3.0)
    assert len(inside) > 50 and len(m.true_idx) > 0.9 * len(inside)
    assert not list(tmp_path.glob(".*.partial"))


def scheduled(client, name: str) -> list:
    """Keys of tasks still on the scheduler whose name holds ``name``."""
    return client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks if name in str(k)])


def executing(client) -> dict:
    """Tasks executing on each worker."""
    return client.run(lambda dask_worker: len(dask_worker.state.executing))


def test_cancel_leaves_no_bundle(generated, client, make_napari_viewer, qtbot, tmp_path):
    slide = generated("lymph-node", size=3072, seed=4)  # 1.5 mm: dozens of tiles
    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="napari-histo")
    widget = analyze_widget(viewer, client)
    widget.form.workflow.value, widget.form.out.value = "lymph-node-he", tmp_path  # region: the whole slide
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.progress.value() >= 1, timeout=600_000)  # a tile is done
    total = widget.progress.maximum()
    assert total > 10 and scheduled(client, "segment-")
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=120_000)
    assert widget.status.text().startswith("cancelled"), widget.status.text()
    assert widget.progress.value() < total
    name = slide_name(slide)
    assert not is_complete(tmp_path / name) and not partial_dir(tmp_path, name).exists()
    assert "tensorflow" not in sys.modules
    # the tile tasks are gone from the scheduler; those running at the cancel ended without a trace
    qtbot.waitUntil(lambda: not scheduled(client, "segment-") and not any(executing(client).values()), timeout=120_000)
    assert not partial_dir(tmp_path, name).exists() and not is_complete(tmp_path / name)
