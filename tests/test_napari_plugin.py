"""napari-histo under Xvfb: readers, overlays on screen, cell-type legend, bad input, region review
(with the overview and report redrawn), export.

One real bundle of a generated synovium slide (1024² px at 0.5 µm/px) made by the real pipeline.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely import affinity
from shapely.geometry import shape

from histo.matching import match_points
from histo.pipeline import run_slide

pytestmark = [pytest.mark.gui, pytest.mark.slow]


@pytest.fixture(scope="module")
def made(generated, client, tmp_path_factory):
    """(slide, bundle) of a generated synovium slide with one aggregate."""
    slide = generated("synovium", size=1024, seed=3)
    return slide, run_slide(slide, tmp_path_factory.mktemp("out"), "synovium-he", client=client, show_progress=False)


def truth(slide):
    base = str(slide).removesuffix(".ome.tif")
    features = json.loads(open(f"{base}.truth.geojson").read())["features"]
    return pd.read_parquet(f"{base}.truth.parquet"), features


def messages():
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def test_get_reader_routes(made, tmp_path):
    from napari_histo._reader import get_reader

    slide, bundle = made
    assert get_reader(str(slide)) is not None and get_reader(str(bundle)) is not None
    assert get_reader(str(tmp_path / "notes.txt")) is None and get_reader([str(slide)]) is None


def test_bundle_layers_are_placed_in_um(made, make_napari_viewer):
    slide, bundle = made
    viewer = make_napari_viewer()
    layers = viewer.open(str(bundle), plugin="napari-histo")
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


def test_screenshot_shows_nuclei_and_aggregate(made, make_napari_viewer):
    slide, bundle = made
    viewer = make_napari_viewer(show=True)
    image, nuclei, types, regions = viewer.open(str(bundle), plugin="napari-histo")
    true_cells, features = truth(slide)
    found = pd.read_parquet(bundle / "cells.parquet", columns=["x_um", "y_um"])
    m = match_points(found[["x_um", "y_um"]].to_numpy(), true_cells[["x_um", "y_um"]].to_numpy(), 3.0)
    known = true_cells.iloc[m.true_idx]
    aggregate = next(shape(f["geometry"]) for f in features if f["properties"].get("kind") == "aggregate")

    def shot(layer, center, zoom):
        for lyr in viewer.layers:
            lyr.visible = lyr is layer
        layer.opacity = 1.0
        viewer.camera.center, viewer.camera.zoom = center, zoom
        img = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
        scale = np.array(img.shape[:2]) / np.asarray(viewer.canvas.size)

        def at(y_um, x_um):  # screen pixel of a world point (µm)
            yx = (np.c_[y_um, x_um] - center) * zoom * scale + np.array(img.shape[:2]) / 2
            ok = (yx >= 2).all(1) & (yx < np.array(img.shape[:2]) - 2).all(1)
            return img[yx[ok, 0].astype(int), yx[ok, 1].astype(int)]

        return img, at

    c = aggregate.centroid
    img, at = shot(nuclei, (c.y, c.x), 4.0)
    on = at(known.y_um.to_numpy(), known.x_um.to_numpy())
    assert len(on) > 50 and np.mean(on.max(1) > 40) > 0.9  # coloured at known nuclei
    assert img.max(2).mean() < 0.9 * 255  # and not everywhere
    img, at = shot(regions, (c.y, c.x), 1.0)
    inside = at(*np.array([[c.y], [c.x]]))[0]
    outside = at(np.array([2.0]), np.array([2.0]))  # slide corner, off tissue
    red = np.array([214, 39, 40])  # the aggregate's colour (histo.export.KIND_COLORS), over black
    assert inside[0] > inside[1] + 20 and inside[0] > inside[2] + 20, inside
    assert (outside.max() < 30) if len(outside) else True
    assert np.dot(inside, red) > 0


def test_cell_type_legend(made, make_napari_viewer):
    from matplotlib.colors import to_rgba

    from napari_histo._legend import LegendWidget

    slide, bundle = made
    viewer = make_napari_viewer()
    widget = LegendWidget(viewer)
    assert widget.entries == {} and "open a result bundle" in widget.label.text()
    image, nuclei, types, regions = viewer.open(str(bundle), plugin="napari-histo")
    counts = pd.read_parquet(bundle / "cells.parquet", columns=["cell_type"]).cell_type.astype(str).value_counts()
    assert set(widget.entries) == set(counts.index) and len(counts) >= 2
    code = types.features.set_index("cell_type")["index"]
    for name, color in widget.entries.items():  # each swatch is the colour the layer paints that type with
        assert np.allclose(types.colormap.map(np.array([code[name]]))[0], to_rgba(color), atol=1 / 255)
        assert f"{name}</td><td align='right'>{counts[name]:,}" in widget.label.text()
    viewer.layers.remove(types)
    assert widget.entries == {}


def test_bad_input_gives_a_message(made, make_napari_viewer, generated, tmp_path):
    slide, bundle = made
    viewer = make_napari_viewer()
    (tmp_path / "not-a-bundle").mkdir()
    assert viewer.open(str(tmp_path / "not-a-bundle"), plugin="napari-histo") == []
    assert "not a histo result bundle" in messages()[-1]
    other = generated("lymph-node", size=512, seed=5)
    viewer.open(str(other), plugin="napari-histo")
    assert viewer.open(str(bundle), plugin="napari-histo") == []
    assert "not of the slide shown" in messages()[-1] and other.name in messages()[-1]
    assert len(viewer.layers) == 1


def test_review_round_trip(made, make_napari_viewer, tmp_path):
    from napari_histo._review import ReviewWidget

    bundle = shutil.copytree(made[1], tmp_path / made[1].name)
    viewer = make_napari_viewer()
    regions = viewer.open(str(bundle), plugin="napari-histo")[-1]
    widget = ReviewWidget(viewer)
    assert widget.layer is regions and widget.table.rowCount() == (regions.features.kind != "tissue").sum()
    agg = int(np.flatnonzero(regions.features.region_id == "aggregate-1")[0])
    row = next(r for r in range(widget.table.rowCount()) if widget.table.item(r, 0).text() == "aggregate-1")
    widget.table.selectRow(row)
    lo, hi = regions.data[agg].min(0), regions.data[agg].max(0)
    center = np.asarray(viewer.camera.center)[-2:]
    assert regions.selected_data == {agg} and ((lo <= center) & (center <= hi)).all()
    widget.buttons["Accept"].click()
    # redraw: the aggregate shrunk to 70 % about its centroid
    old = shapely.Polygon(regions.data[agg][:, ::-1])
    redrawn = affinity.scale(old, 0.7, 0.7)
    data = list(regions.data)
    data[agg] = np.asarray(redrawn.exterior.coords)[:-1, ::-1]
    regions.data = data
    # two new regions drawn inside the tissue: one kept as an annotation, one rejected
    tissue = shapely.Polygon(regions.data[int(np.flatnonzero(regions.features.kind == "tissue")[0])][:, ::-1])
    c = tissue.representative_point()
    boxes = [shapely.box(c.x - 40, c.y - 40, c.x, c.y), shapely.box(c.x, c.y, c.x + 40, c.y + 40)]
    widget.add()
    regions.add_polygons([np.asarray(b.exterior.coords)[:-1, ::-1] for b in boxes])
    n = len(regions.data)
    widget.table.clearSelection()
    regions.selected_data = {n - 2}
    widget.kind_box.value = "annotation"
    widget.buttons["Set kind"].click()
    regions.selected_data = {n - 1}
    widget.buttons["Reject"].click()
    widget.buttons["Save"].click()

    saved = {f["properties"]["region_id"]: f["properties"] for f in json.loads((bundle / "regions.geojson").read_text())["features"]}
    assert set(saved) == {"tissue-1", "aggregate-1", "annotation-1"}
    assert saved["aggregate-1"]["review"] == "accepted" and saved["annotation-1"]["review"] == "accepted"
    metrics = pd.read_csv(bundle / "metrics.csv").set_index("region_id")
    cells = pd.read_parquet(bundle / "cells.parquet")
    for rid, geom in (("aggregate-1", redrawn), ("annotation-1", boxes[0])):
        inside = shapely.contains_xy(geom, cells.x_um, cells.y_um)
        assert metrics.at[rid, "n_cells"] == inside.sum() > 0
        assert metrics.at[rid, "area_um2"] == pytest.approx(geom.area, rel=1e-3)
        assert (cells[f"{rid.split('-')[0]}_id"].astype(str) == rid).sum() == inside.sum()
    before = pd.read_csv(made[1] / "metrics.csv").set_index("region_id")
    assert metrics.at["slide", "n_cells"] == before.at["slide", "n_cells"]  # tissue unchanged
    run = json.loads((bundle / "run.json").read_text())
    assert run["review"]["rejected"] == [] and run["status"] == "complete"
    assert sorted(regions.features.region_id) == sorted(saved)  # the layer shows what was saved


def aggregate_pixels(png) -> int:
    """Pixels of the overview in the aggregates' outline colour (histo.export.KIND_COLORS)."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array([214, 39, 40])).max(-1) < 30).sum())


def test_reject_redraws_overview_and_report(made, make_napari_viewer, tmp_path):
    from napari_histo._review import ReviewWidget

    bundle = shutil.copytree(made[1], tmp_path / made[1].name)
    before = (bundle / "overview.png").read_bytes()
    assert aggregate_pixels(bundle / "overview.png") > 20 and ">aggregate-1<" in (bundle / "report.html").read_text()
    viewer = make_napari_viewer()
    viewer.open(str(bundle), plugin="napari-histo")
    widget = ReviewWidget(viewer)
    widget.table.selectRow(next(r for r in range(widget.table.rowCount()) if widget.table.item(r, 0).text() == "aggregate-1"))
    widget.buttons["Reject"].click()
    widget.buttons["Save"].click()
    assert (bundle / "overview.png").read_bytes() != before
    assert aggregate_pixels(bundle / "overview.png") == 0  # the rejected aggregate is no longer drawn
    report = (bundle / "report.html").read_text()
    assert ">aggregate-1<" not in report and "<h2>Aggregates</h2><p class=none>none found</p>" in report


def test_export(made, tmp_path):
    from napari_histo._export import export_metrics, export_qupath

    slide, bundle = made
    csv = export_metrics(bundle, tmp_path / "m.csv", excel=True)
    raw = csv.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw
    pd.testing.assert_frame_equal(pd.read_csv(csv, encoding="utf-8-sig"), pd.read_csv(bundle / "metrics.csv"))
    out = export_qupath(bundle, tmp_path / "r.geojson")
    from histo.export import import_annotations

    back = import_annotations(out, json.loads((bundle / "run.json").read_text())["input"]["mpp"], object_types=None)
    mine = {f["properties"]["region_id"]: shapely.from_wkt(f["properties"]["geometry_um"])
            for f in json.loads((bundle / "regions.geojson").read_text())["features"]}
    assert len(back) == len(mine)
    for geom, rid in zip(back.geometry, mine):
        assert geom.symmetric_difference(mine[rid]).area < 1e-3 * mine[rid].area
