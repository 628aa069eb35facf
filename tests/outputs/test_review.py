"""A pathologist's review saved without napari: :func:`histo.outputs.review.save_review` given the table
the napari widget hands it (``napari_histo._bundle.regions_from_shapes``: the bundle's regions as
:func:`histo.outputs.review.read_regions` reads them, with the edited ``kind`` / ``review`` and new rows
whose ``region_id`` is None), on a copy of the session's synovium bundle (tissue-1 and aggregate-1).
The napari suite drives the same function through the widget (tests/napari/test_napari_plugin.py)."""

from __future__ import annotations

import json
import shutil

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import box

from histo.errors import HistoError
from histo.outputs.review import read_regions, save_review

pytestmark = pytest.mark.slow
SIDE_UM = 40.0  # the squares a pathologist draws


def drawn(regions: gpd.GeoDataFrame, *squares) -> gpd.GeoDataFrame:
    """``regions`` plus new annotations (region_id None, accepted when drawn), as regions_from_shapes
    gives them: the old regions' properties, NaN for the new rows."""
    new = gpd.GeoDataFrame(
        {
            "region_id": [None] * len(squares),
            "kind": "annotation",
            "name": "annotation",
            "review": "accepted",
            "geometry": list(squares),
        },
        geometry="geometry",
    )
    return gpd.GeoDataFrame(pd.concat([regions, new], ignore_index=True), geometry="geometry")


def squares_in_tissue(regions: gpd.GeoDataFrame, cells: pd.DataFrame, n: int) -> list:
    """``n`` disjoint squares of tissue off the aggregate, each with nuclei in it."""
    by_id = regions.set_index("region_id").geometry
    free = by_id["tissue-1"].difference(by_id["aggregate-1"].buffer(10)).buffer(-0.75 * SIDE_UM)
    xy = cells[["x_um", "y_um"]].to_numpy()
    out = []
    for x, y in xy[shapely.contains_xy(free, xy[:, 0], xy[:, 1])]:
        square = box(x - SIDE_UM / 2, y - SIDE_UM / 2, x + SIDE_UM / 2, y + SIDE_UM / 2)
        if all(square.distance(s) > 10 for s in out) and shapely.contains_xy(square, xy[:, 0], xy[:, 1]).sum() >= 5:
            out.append(square)
        if len(out) == n:
            return out
    raise AssertionError(f"fewer than {n} squares of {SIDE_UM} µm fit the tissue")


def same(a, b) -> bool:
    """One outline (within regions.geojson's 0.01 µm rounding)."""
    return shapely.make_valid(a).symmetric_difference(shapely.make_valid(b)).area < 1e-3 * b.area


def geojson(bundle) -> dict[str, dict]:
    """regions.geojson's features by region_id: (review state, µm geometry)."""
    feats = json.loads((bundle / "regions.geojson").read_text(encoding="utf-8"))["features"]
    return {
        f["properties"]["region_id"]: (f["properties"]["review"], shapely.from_wkt(f["properties"]["geometry_um"]))
        for f in feats
    }


def test_save_review_accepted_rejected_reclassified_and_added(synovium_bundle, tmp_path):
    _, made = synovium_bundle
    bundle = shutil.copytree(made, tmp_path / made.name)
    run0 = json.loads((bundle / "run.json").read_text())
    metrics0 = pd.read_csv(bundle / "metrics.csv").set_index("region_id")
    cells = pd.read_parquet(bundle / "cells.parquet")
    xy = cells[["x_um", "y_um"]].to_numpy()
    regions = read_regions(bundle)
    assert list(regions.region_id) == ["tissue-1", "aggregate-1"] and set(regions.review) == {"unreviewed"}
    assert "review" not in run0
    a, b, c = squares_in_tissue(regions, cells, 3)

    # first session: two squares drawn, saved as annotation-1 and annotation-2
    save_review(bundle, drawn(regions, a, b))
    first = geojson(bundle)
    assert list(first) == ["tissue-1", "aggregate-1", "annotation-1", "annotation-2"]
    assert same(first["annotation-1"][1], a) and same(first["annotation-2"][1], b)

    # second session: tissue-1 accepted, aggregate-1 made a follicle, annotation-1 rejected,
    # annotation-2 left as it was, a third square drawn
    regions = read_regions(bundle)
    regions.loc[regions.region_id == "tissue-1", "review"] = "accepted"
    regions.loc[regions.region_id == "aggregate-1", "kind"] = "follicle"
    regions.loc[regions.region_id == "annotation-1", "review"] = "rejected"
    returned = save_review(bundle, drawn(regions, c))

    saved = geojson(bundle)
    assert list(saved) == ["tissue-1", "follicle-1", "annotation-2", "annotation-3"]
    assert {k: v[0] for k, v in saved.items()} == {
        "tissue-1": "accepted",
        "follicle-1": "unreviewed",
        "annotation-2": "accepted",
        "annotation-3": "accepted",
    }
    # the rejected square is gone from every file; the reclassified region keeps its outline
    assert not any(g.intersects(a.buffer(-1)) for rid, (_, g) in saved.items() if rid != "tissue-1")
    assert same(saved["annotation-3"][1], c) and same(saved["annotation-2"][1], b)
    assert same(saved["follicle-1"][1], regions.geometry[regions.region_id == "aggregate-1"].iloc[0])

    metrics = pd.read_csv(bundle / "metrics.csv").set_index("region_id")
    assert list(metrics.index) == [*saved, "slide"] and list(returned.region_id) == list(metrics.index)
    assert (metrics.kind.drop("slide") == ["tissue", "follicle", "annotation", "annotation"]).all()
    for rid, square in (("annotation-2", b), ("annotation-3", c)):
        inside = int(shapely.contains_xy(square, xy[:, 0], xy[:, 1]).sum())
        assert metrics.at[rid, "n_cells"] == inside >= 5, rid  # measured from the bundle's own cells
        assert metrics.at[rid, "area_um2"] == pytest.approx(SIDE_UM**2, rel=1e-3)
    # the follicle is the aggregate's nuclei re-measured under its new kind; tissue and slide rows keep theirs
    assert metrics.at["follicle-1", "n_cells"] == metrics0.at["aggregate-1", "n_cells"]
    assert metrics.at["follicle-1", "area_um2"] == pytest.approx(metrics0.at["aggregate-1", "area_um2"], rel=1e-3)
    assert metrics.at["tissue-1", "n_cells"] == metrics0.at["tissue-1", "n_cells"]
    assert metrics.at["slide", "n_cells"] == metrics0.at["slide", "n_cells"] > 0

    ids = pd.read_parquet(bundle / "cells.parquet", columns=["annotation_id", "follicle_id", "aggregate_id"])
    in_c = shapely.contains_xy(c, xy[:, 0], xy[:, 1])
    assert (ids.annotation_id.astype(str) == "annotation-3").to_numpy().tolist() == in_c.tolist()
    assert not (ids.annotation_id.astype(str) == "annotation-1").any() and ids.aggregate_id.isna().all()
    assert (ids.follicle_id == "follicle-1").sum() == metrics.at["follicle-1", "n_cells"]

    run = json.loads((bundle / "run.json").read_text())
    review = run.pop("review")
    assert review["rejected"] == ["annotation-1"]
    assert review["states"] == {"accepted": 3, "unreviewed": 1, "rejected": 1}
    assert review["changed"] == ["aggregate-1 -> follicle-1", "annotation-3"]
    assert review["regions"] == {"tissue": 1, "follicle": 1, "annotation": 2}
    assert {k: v for k, v in run.items() if k != "review"} == {k: v for k, v in run0.items() if k != "review"}


def test_save_review_refuses_an_unknown_kind_and_leaves_the_bundle(synovium_bundle, tmp_path):
    _, made = synovium_bundle
    bundle = shutil.copytree(made, tmp_path / made.name)
    files = {f: (bundle / f).read_bytes() for f in ("regions.geojson", "metrics.csv", "run.json")}
    regions = read_regions(bundle)
    regions.loc[regions.region_id == "aggregate-1", "kind"] = "tumour"
    with pytest.raises(HistoError, match=r"unknown region kind\(s\) tumour"):
        save_review(bundle, regions)
    assert {f: (bundle / f).read_bytes() for f in files} == files
    assert np.isin(list(read_regions(bundle).region_id), ["tissue-1", "aggregate-1"]).all()
