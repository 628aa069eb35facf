"""napari-spatialdata (scverse's napari plugin) opens the store ``histo export --spatialdata`` writes, the
way a user opens it (``napari --plugin napari-spatialdata BUNDLE/spatialdata.zarr``: its reader docks the
SpatialData widget; an element double-clicked there becomes a layer; its View widget colours a layer by
a column). The labels, the nuclei and the regions become layers placed in µm with the bundle's own
values, and the cells table's columns (``cell_type``) colour the labels in ``cell_type_colors``.

One real bundle of a generated synovium slide (1024² px at 0.5 µm/px: tissue and one aggregate) made by
the real pipeline (conftest's session ``synovium_bundle``, shared with test_napari_plugin.py; the store
is written into a copy). The store holds no image (the slide is referenced in ``attrs["histo"]``) and no
points (nuclei are polygons): neither is offered as an element.

napari-spatialdata 0.7.2 does not import under PySide6, histo's Qt binding: ``_scatterwidgets`` takes
the PyQt-only name ``pyqtSignal`` from pyqtgraph's Qt shim (scverse/napari-spatialdata#399, open, is the
fix). Until a release has it, :func:`napari_spatialdata_module` gives that name PySide6's ``Signal``,
as a user must (README), and only when the import fails for that reason.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import shapely

from histo.outputs.spatialdata_store import LABELS, NUCLEI, REGIONS, TABLE, write_spatialdata

pytestmark = [pytest.mark.gui, pytest.mark.slow]


@pytest.fixture(scope="module")
def store(synovium_bundle, tmp_path_factory):
    """(bundle, its spatialdata.zarr): a copy of the session's synovium bundle, its store written by
    ``histo export``'s function."""
    _, made = synovium_bundle
    bundle = shutil.copytree(made, tmp_path_factory.mktemp("store") / made.name)
    return bundle, write_spatialdata(bundle)


@pytest.fixture(scope="module")
def napari_spatialdata_module():
    """``napari_spatialdata``, imported under PySide6 (the alias only where 0.7.2's import fails)."""
    try:
        import napari_spatialdata
    except ImportError as error:
        if "pyqtSignal" not in str(error):
            raise
        import pyqtgraph.Qt.QtCore as QtCore

        QtCore.pyqtSignal = QtCore.Signal
        import napari_spatialdata
    return napari_spatialdata


def sdata_widget(viewer):
    """napari-spatialdata's SpatialData widget, docked by its reader."""
    from napari_spatialdata._sdata_widgets import SdataWidget

    return next(w for w in viewer.window.dock_widgets.values() if isinstance(w, SdataWidget))


def item(list_widget, text):
    return next(list_widget.item(i) for i in range(list_widget.count()) if list_widget.item(i).text() == text)


def test_store_opens_in_napari_spatialdata(store, napari_spatialdata_module, make_napari_viewer, qtbot):
    from napari.layers import Labels, Shapes

    QtAdataViewWidget = napari_spatialdata_module.QtAdataViewWidget

    bundle, path = store
    cells = pd.read_parquet(bundle / "cells.parquet", columns=["label", "x_um", "y_um", "cell_type", "polygon"])
    features = json.loads((bundle / "regions.geojson").read_text(encoding="utf-8"))["features"]
    regions = [shapely.from_wkt(f["properties"]["geometry_um"]) for f in features]
    assert len(cells) > 100 and len(regions) >= 2

    viewer = make_napari_viewer()
    assert viewer.open(str(path), plugin="napari-spatialdata") == []  # its reader docks widgets, adds no layer
    widget = sdata_widget(viewer)
    systems = widget.coordinate_system_widget
    assert [systems.item(i).text() for i in range(systems.count())] == ["global"]
    systems.setCurrentItem(item(systems, "global"))  # the user picks the coordinate system
    elements = widget.elements_widget
    assert sorted(elements.item(i).text() for i in range(elements.count())) == sorted([LABELS, NUCLEI, REGIONS])

    for name in (LABELS, NUCLEI, REGIONS):  # double-clicked: loaded in the widget's thread, then added
        elements.itemDoubleClicked.emit(item(elements, name))
        qtbot.waitUntil(
            lambda name=name: name in viewer.layers and not widget.worker_thread.isRunning(), timeout=60_000
        )

    labels = viewer.layers[LABELS]
    assert isinstance(labels, Labels) and labels.multiscale and len(labels.data) == 3
    level0 = np.asarray(labels.data[0])
    assert level0.max() == len(cells) == cells.label.max()  # one label per nucleus, 1..n
    assert set(np.unique(level0)) - {0} == set(cells.label)
    grid = json.loads((bundle / "run.json").read_text())["parameters"]["grid_mpp"]
    assert np.allclose(np.diag(labels.affine.affine_matrix)[:2], [grid, grid])  # pixels → µm
    # a nucleus's centre, in µm, falls on its own label through the layer's transform
    px = np.array([labels.world_to_data((y, x)) for y, x in zip(cells.y_um, cells.x_um)]).astype(int)
    assert (level0[px[:, 0], px[:, 1]] == cells.label.to_numpy()).mean() > 0.95

    nuclei = viewer.layers[NUCLEI]
    assert isinstance(nuclei, Shapes) and nuclei.nshapes == len(cells)
    assert nuclei.metadata["_columns_df"]["cell_type"].tolist() == cells.cell_type.astype(str).tolist()
    # each polygon in µm as cells.parquet has it (napari-spatialdata draws over 100 simplified by 2 units)
    stored = shapely.from_wkb(cells.polygon.to_numpy())
    for vertices, polygon in zip(nuclei.data, stored):
        xy = np.array([nuclei.data_to_world(v)[::-1] for v in vertices])
        assert len(xy) >= len(polygon.exterior.simplify(2).coords) - 1 and np.allclose(
            xy, np.array(polygon.exterior.simplify(2).coords)[: len(xy)], atol=1e-3
        )

    shown = viewer.layers[REGIONS]
    assert isinstance(shown, Shapes) and shown.nshapes == len(regions)
    columns = shown.metadata["_columns_df"]
    assert columns["region_id"].tolist() == [f["properties"]["region_id"] for f in features]
    assert columns["kind"].tolist() == [f["properties"]["kind"] for f in features]
    for vertices, region in zip(shown.data, regions):
        polygon = shapely.Polygon([shown.data_to_world(v)[::-1] for v in vertices])  # napari's (y, x) → (x, y) µm
        assert abs(polygon.area - region.area) < 0.01 * region.area
        assert polygon.intersection(region).area > 0.98 * region.area

    # the cells table annotates the labels: the View widget lists its columns, cell_type colours them
    table = labels.metadata["adata"]
    assert labels.metadata["table_names"] == [TABLE] and labels.metadata["instance_key"] == "label"
    assert table.n_obs == len(cells) and (table.obs["label"].to_numpy() == cells.label.to_numpy()).all()
    viewer.layers.selection.active = labels
    view = next(w for w in viewer.window.dock_widgets.values() if isinstance(w, QtAdataViewWidget))
    columns = [view.obs_widget.item(i).text() for i in range(view.obs_widget.count())]
    assert {"cell_type", "area_um2", "aggregate_id"} <= set(columns)
    view.obs_widget._onAction(["cell_type"])  # as a double-click on "cell_type" does
    colors = dict(zip(table.obs.cell_type.cat.categories, table.uns["cell_type_colors"]))
    assert set(cells.cell_type) == set(colors)
    for label, kind in zip(cells.label, cells.cell_type):
        assert np.allclose(labels.colormap.map(label)[:3], _rgb(colors[kind]), atol=1 / 255)


def _rgb(hex_color):
    return np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
