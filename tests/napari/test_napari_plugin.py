"""napari-histo under Xvfb, through napari's own paths (the reader, the Plugins menu's
``add_plugin_dock_widget``): readers and what they leave to other plugins, overlays on screen,
nuclei outlined or filled, the cell-type legend, bad input, a pathologist's review session, export.

One real bundle of a generated synovium slide (1024² px at 0.5 µm/px: one aggregate) made by the real
pipeline (conftest's session ``synovium_bundle``, copied before a test changes it); a generated lymph
node has follicles of the rule's ≥ 0.03 mm² only from 4096² px on.
Screenshots of the docked widgets are kept in ``$HISTO_SCREENSHOTS`` (default: a pytest temporary folder).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import shape

from histo.train.matching import match_points

pytestmark = [pytest.mark.gui, pytest.mark.slow]

PLUGIN = "napari-histo"
WIDGETS = ("Analyze", "Review regions", "Export", "Cell-type legend")
FOLLICLE_RGB = (31, 119, 180)  # histo.outputs.export.KIND_COLORS
AGGREGATE_RGB = (214, 39, 40)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where screenshots are kept: ``$HISTO_SCREENSHOTS``, else a temporary folder."""
    folder = Path(os.environ.get("HISTO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def truth(slide):
    base = str(slide).removesuffix(".ome.tif")
    features = json.loads(open(f"{base}.truth.geojson").read())["features"]
    return pd.read_parquet(f"{base}.truth.parquet"), features


def messages():
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def dock(viewer, name):
    """The widget of ``name``, opened the way the Plugins menu opens it."""
    return viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]


def test_reader_takes_slides_and_bundles_only(synovium_bundle, tmp_path):
    import npe2

    from histo.io.bundle import SLIDE_SUFFIXES
    from napari_histo._reader import get_reader

    slide, bundle = synovium_bundle
    assert get_reader(str(slide)) is not None and get_reader(str(bundle)) is not None
    (tmp_path / "folder").mkdir()
    others = [tmp_path / "notes.txt", tmp_path / "folder", bundle / "labels.ome.zarr", tmp_path / "absent.tif"]
    assert all(get_reader(str(p)) is None for p in others) and get_reader([str(slide)]) is None
    manifest = npe2.PluginManifest.from_distribution(PLUGIN)
    patterns = set(manifest.contributions.readers[0].filename_patterns)
    assert patterns == {f"*{s}" for s in SLIDE_SUFFIXES if s.count(".") == 1}  # files, by suffix


def test_bundle_layers_are_placed_in_um(synovium_bundle, make_napari_viewer):
    slide, bundle = synovium_bundle
    viewer = make_napari_viewer()
    layers = viewer.open(str(bundle), plugin=PLUGIN)
    run = json.loads((bundle / "run.json").read_text())
    image, nuclei, types, regions = layers
    mpp, grid = run["input"]["mpp"], run["parameters"]["grid_mpp"]
    assert image.multiscale and np.allclose(image.scale, mpp) and np.allclose(image.translate, mpp / 2)
    assert nuclei.multiscale and types.multiscale and len(nuclei.data) >= 2
    assert np.allclose(nuclei.scale, grid) and np.allclose(nuclei.translate, grid / 2)
    cells = pd.read_parquet(bundle / "cells.parquet", columns=["x_um", "y_um", "label", "cell_type"])
    sample = cells.sample(300, random_state=0)
    # napari's own world → data transform puts each nucleus's label, and its type, at its centroid
    idx = np.array([np.floor(nuclei.world_to_data((y, x))).astype(int) for y, x in zip(sample.y_um, sample.x_um)])
    at = np.asarray(nuclei.data[0])[idx[:, 0], idx[:, 1]]
    assert np.mean(at == sample.label.to_numpy()) > 0.9
    code = np.asarray(types.data[0])[idx[:, 0], idx[:, 1]]
    names = types.features.set_index("index").cell_type.reindex(code).to_numpy()
    assert np.mean(names == sample.cell_type.astype(str).to_numpy()) > 0.9
    assert set(types.metadata["legend"]) >= set(cells.cell_type.astype(str))
    assert {"tissue", "aggregate"} <= set(regions.features.kind) and "aggregate-1" in set(regions.features.region_id)
    assert np.allclose(regions.scale, 1) and np.allclose(regions.translate, 0)


def test_nuclei_outlined_filled_on_a_toggle(synovium_bundle, make_napari_viewer, screenshots):
    slide, bundle = synovium_bundle
    viewer = make_napari_viewer(show=True)
    image, nuclei, types, regions = viewer.open(str(bundle), plugin=PLUGIN)
    legend = dock(viewer, "Cell-type legend")
    assert nuclei.contour == types.contour == 1 and not legend.filled.isChecked()  # outlines by default
    true_cells, features = truth(slide)
    found = pd.read_parquet(bundle / "cells.parquet", columns=["x_um", "y_um"])
    m = match_points(found[["x_um", "y_um"]].to_numpy(), true_cells[["x_um", "y_um"]].to_numpy(), 3.0)
    known = true_cells.iloc[m.true_idx]
    aggregate = next(shape(f["geometry"]) for f in features if f["properties"].get("kind") == "aggregate")

    def shot(layer, center, zoom, name):
        for lyr in viewer.layers:
            lyr.visible = lyr is layer
        layer.opacity = 1.0
        viewer.camera.center, viewer.camera.zoom = center, zoom
        img = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
        viewer.screenshot(str(screenshots / f"{name}.png"), canvas_only=True, flash=False)
        scale = np.array(img.shape[:2]) / np.asarray(viewer.canvas.size)

        def at(y_um, x_um):  # screen pixel of a world point (µm)
            yx = (np.c_[y_um, x_um] - center) * zoom * scale + np.array(img.shape[:2]) / 2
            ok = (yx >= 2).all(1) & (yx < np.array(img.shape[:2]) - 2).all(1)
            return img[yx[ok, 0].astype(int), yx[ok, 1].astype(int)]

        return img, at

    c = aggregate.centroid
    outlined, at = shot(nuclei, (c.y, c.x), 6.0, "nuclei-outlined")
    centres = at(known.y_um.to_numpy(), known.x_um.to_numpy())
    assert len(centres) > 50 and np.mean(centres.max(1) > 40) < 0.5  # a nucleus's centre is not painted
    legend.filled.setChecked(True)
    assert nuclei.contour == types.contour == 0
    filled, at = shot(nuclei, (c.y, c.x), 6.0, "nuclei-filled")
    on = at(known.y_um.to_numpy(), known.x_um.to_numpy())
    assert np.mean(on.max(1) > 40) > 0.9  # coloured at known nuclei
    assert (outlined.max(2) > 40).mean() < 0.7 * (filled.max(2) > 40).mean() and filled.max(2).mean() < 0.9 * 255
    legend.filled.setChecked(False)
    assert nuclei.contour == types.contour == 1
    img, at = shot(regions, (c.y, c.x), 1.0, "regions")
    inside = at(*np.array([[c.y], [c.x]]))[0]
    outside = at(np.array([2.0]), np.array([2.0]))  # slide corner, off tissue
    assert inside[0] > inside[1] + 20 and inside[0] > inside[2] + 20, inside  # the aggregates' red, over black
    assert (outside.max() < 30) if len(outside) else True


def test_cell_type_legend_opens_with_a_bundle(synovium_bundle, make_napari_viewer):
    from matplotlib.colors import to_rgba

    from histo.outputs.report import _cell_types, cell_colors

    slide, bundle = synovium_bundle
    viewer = make_napari_viewer()
    assert not viewer.window.dock_widgets
    image, nuclei, types, regions = viewer.open(str(bundle), plugin=PLUGIN)
    ((name, widget),) = viewer.window.dock_widgets.items()
    assert name.startswith("Cell-type legend") and widget is dock(viewer, "Cell-type legend")
    cells = pd.read_parquet(bundle / "cells.parquet", columns=["cell_type"])
    assert widget.entries == cell_colors(_cell_types(cells))  # overview.png's and the report's colours
    counts = cells.cell_type.astype(str).value_counts()
    assert set(widget.entries) == set(counts.index) and len(counts) >= 2
    code = types.features.set_index("cell_type")["index"]
    for name, color in widget.entries.items():  # each swatch is the colour the layer paints that type with
        assert np.allclose(types.colormap.map(np.array([code[name]]))[0], to_rgba(color), atol=1 / 255)
        assert f"{name}</td><td align='right'>{counts[name]:,}" in widget.label.text()
    viewer.layers.remove(types)
    assert widget.entries == {} and "open a result bundle" in widget.label.text()


def test_bad_input_gives_a_message(synovium_bundle, make_napari_viewer, generated, tmp_path):
    slide, bundle = synovium_bundle
    viewer = make_napari_viewer()
    partial = shutil.copytree(bundle, tmp_path / "partial", ignore=shutil.ignore_patterns("*.zarr", "*.parquet"))
    run = json.loads((partial / "run.json").read_text())
    (partial / "run.json").write_text(json.dumps(run | {"status": "running"}))
    assert viewer.open(str(partial), plugin=PLUGIN) == []
    assert "not complete" in messages()[-1]
    other = generated("lymph-node", size=512, seed=5)
    viewer.open(str(other), plugin=PLUGIN)
    assert viewer.open(str(bundle), plugin=PLUGIN) == []
    assert "not of the slide shown" in messages()[-1] and other.name in messages()[-1]
    assert len(viewer.layers) == 1


def colour_pixels(png, rgb) -> int:
    """Pixels of an image within 30 of the colour ``rgb``."""
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(img - np.array(rgb)).max(-1) < 30).sum())


def row_of(widget, region_id) -> int:
    return next(r for r in range(widget.table.rowCount()) if widget.table.item(r, 0).text() == region_id)


def save(review, qtbot):
    """Click *Save* and wait for its worker thread."""
    review.buttons["Save"].click()
    assert not review.buttons["Save"].isEnabled()  # saving in a worker thread
    qtbot.waitUntil(lambda: review.buttons["Save"].isEnabled(), timeout=120_000)


def saved_regions(bundle) -> dict:
    return {
        f["properties"]["region_id"]: f["properties"]
        for f in json.loads((bundle / "regions.geojson").read_text())["features"]
    }


def test_review_session(synovium_bundle, make_napari_viewer, qtbot, tmp_path, screenshots):
    """Slide, then bundle, through the reader; every widget from the Plugins menu; pick the aggregate in
    the table (the camera goes there) and make it a follicle, draw an annotation, Save; reject the
    follicle, Save."""
    slide, made_bundle = synovium_bundle
    bundle = shutil.copytree(made_bundle, tmp_path / made_bundle.name)
    files = ("regions.geojson", "metrics.csv", "overview.png")
    before = {f: (bundle / f).read_bytes() for f in files}
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1600, 1000)
    viewer.open(str(slide), plugin=PLUGIN)
    regions = viewer.open(str(bundle), plugin=PLUGIN)[-1]
    widgets = {name: dock(viewer, name) for name in WIDGETS}
    assert set(viewer.window.dock_widgets) == {f"{name} ({PLUGIN})" for name in WIDGETS}
    review = widgets["Review regions"]
    assert review.table.rowCount() == (regions.features.kind != "tissue").sum() >= 1

    review.table.selectRow(row_of(review, "aggregate-1"))  # the camera goes to the aggregate
    i = int(np.flatnonzero(regions.features.region_id == "aggregate-1")[0])
    lo, hi = regions.data[i].min(0), regions.data[i].max(0)
    center = np.asarray(viewer.camera.center)[-2:]
    assert regions.selected_data == {i} and ((lo <= center) & (center <= hi)).all()
    review.kind_box.value = "follicle"
    review.buttons["Set kind"].click()
    review.table.clearSelection()
    tissue = shapely.Polygon(regions.data[int(np.flatnonzero(regions.features.kind == "tissue")[0])][:, ::-1])
    c = tissue.difference(shapely.Polygon(regions.data[i][:, ::-1]).buffer(10)).buffer(-25).representative_point()
    drawn = shapely.box(c.x - 25, c.y - 25, c.x + 25, c.y + 25)  # a 50 µm square of tissue, off the aggregate
    review.kind_box.value = "annotation"
    review.buttons["Add"].click()
    assert regions.mode == "add_polygon"
    regions.add_polygons([np.asarray(drawn.exterior.coords)[:-1, ::-1]])
    regions.mode = "pan_zoom"
    assert np.allclose(regions.edge_color[i][:3], np.array(FOLLICLE_RGB) / 255)  # a follicle's colour
    viewer.reset_view()
    qtbot.wait(500)  # the docks laid out
    viewer.screenshot(str(screenshots / "review.png"), canvas_only=False, flash=False)
    save(review, qtbot)

    saved = saved_regions(bundle)
    assert set(saved) == {"tissue-1", "follicle-1", "annotation-1"} and saved["annotation-1"]["review"] == "accepted"
    assert "aggregate-1 -> follicle-1" in json.loads((bundle / "run.json").read_text())["review"]["changed"]
    metrics = pd.read_csv(bundle / "metrics.csv").set_index("region_id")
    cells = pd.read_parquet(bundle / "cells.parquet", columns=["x_um", "y_um", "annotation_id"])
    inside = shapely.contains_xy(drawn, cells.x_um, cells.y_um)
    assert metrics.at["annotation-1", "n_cells"] == inside.sum() > 0
    assert metrics.at["annotation-1", "area_um2"] == pytest.approx(drawn.area, rel=1e-3)
    assert (cells.annotation_id.astype(str) == "annotation-1").sum() == inside.sum()
    assert "follicle-1" in metrics.index and "aggregate-1" not in metrics.index
    assert all((bundle / f).read_bytes() != before[f] for f in files)
    red, blue = (colour_pixels(made_bundle / "overview.png", rgb) for rgb in (AGGREGATE_RGB, FOLLICLE_RGB))
    assert colour_pixels(bundle / "overview.png", AGGREGATE_RGB) == 0 < red  # the aggregate's red outline is gone
    assert colour_pixels(bundle / "overview.png", FOLLICLE_RGB) > blue + 20  # a follicle's blue one drawn
    assert sorted(regions.features.region_id) == sorted(saved) and review.table.rowCount() == 2  # what was saved

    review.table.selectRow(row_of(review, "follicle-1"))
    review.buttons["Reject"].click()
    qtbot.wait(200)
    viewer.screenshot(str(screenshots / "review-rejected.png"), canvas_only=False, flash=False)
    first = {f: (bundle / f).read_bytes() for f in files}
    save(review, qtbot)
    assert set(saved_regions(bundle)) == {"tissue-1", "annotation-1"}
    assert json.loads((bundle / "run.json").read_text())["review"]["rejected"] == ["follicle-1"]
    assert "follicle-1" not in pd.read_csv(bundle / "metrics.csv").region_id.values
    assert all((bundle / f).read_bytes() != first[f] for f in files)
    assert colour_pixels(bundle / "overview.png", FOLLICLE_RGB) <= blue

    again = make_napari_viewer()  # the reviewed bundle still opens
    assert sorted(again.open(str(bundle), plugin=PLUGIN)[-1].features.region_id) == ["annotation-1", "tissue-1"]


def test_export_from_the_menu(synovium_bundle, make_napari_viewer, tmp_path):
    from histo.io.annotations import import_annotations

    slide, made_bundle = synovium_bundle
    bundle = shutil.copytree(made_bundle, tmp_path / made_bundle.name)
    viewer = make_napari_viewer()
    viewer.open(str(bundle), plugin=PLUGIN)
    widget = dock(viewer, "Export")
    assert Path(widget.bundle.value) == bundle and widget.metrics_csv.value == tmp_path / f"{bundle.name}.metrics.csv"
    widget()
    raw = widget.metrics_csv.value.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw  # Excel-friendly by default
    pd.testing.assert_frame_equal(
        pd.read_csv(widget.metrics_csv.value, encoding="utf-8-sig"), pd.read_csv(bundle / "metrics.csv")
    )
    mpp = json.loads((bundle / "run.json").read_text())["input"]["mpp"]
    back = import_annotations(widget.regions_geojson.value, mpp, object_types=None)
    mine = {
        f["properties"]["region_id"]: shapely.from_wkt(f["properties"]["geometry_um"])
        for f in json.loads((bundle / "regions.geojson").read_text())["features"]
    }
    assert len(back) == len(mine)
    for geom, rid in zip(back.geometry, mine):
        assert geom.symmetric_difference(mine[rid]).area < 1e-3 * mine[rid].area
    widget.bundle.value = tmp_path
    widget()
    assert "not a histo result bundle" in messages()[-1]
