"""The Analyze widget under Xvfb: a drawn rectangle becomes a bundle placed on the slide, with the
analysis in Dask worker processes and TensorFlow never imported in the viewer's process."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from histo.matching import match_points

pytestmark = [pytest.mark.gui, pytest.mark.slow]


def test_analyze_rectangle(generated, client, make_napari_viewer, qtbot, tmp_path):
    from napari_histo._analyze import AnalyzeWidget

    slide = generated("synovium", size=1024, seed=3)
    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="napari-histo")
    box = np.array([[100.0, 150.0], [100.0, 330.0], [260.0, 330.0], [260.0, 150.0]])  # (y, x) µm
    shapes = viewer.add_shapes([box], shape_type="rectangle", name="roi")
    widget = AnalyzeWidget(viewer, client=client)
    form = widget.form
    form.region.value, form.workflow.value, form.out.value = shapes, "synovium-he", tmp_path
    widget.run_button.click()
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=600_000)
    assert "tensorflow" not in sys.modules
    assert widget.status.text().startswith("bundle written"), widget.status.text()

    nuclei = next(lyr for lyr in viewer.layers if lyr.name.endswith(" nuclei"))
    bundle = nuclei.metadata["bundle"]
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
