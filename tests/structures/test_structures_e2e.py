"""Issue 3's must-shows on the pipeline's own nuclei: ``run_slide`` (real Dask workers, the shipped
model) on generated slides, its bundle checked against the generator's truth. The same checks on
truth cells, and the field-level export checks, are in tests/structures/test_regions.py and
tests/outputs/test_export.py."""

from __future__ import annotations

import json

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from helpers import UNITLESS, UNITS, check_aggregate_grades, check_lining_layers, follicle_scores, load_truth
from shapely.geometry import shape

from histo.run.pipeline import run_slide
from histo.train.matching import match_points

pytestmark = pytest.mark.slow
# histo.stats.neighbourhood's summary columns: z-scores, ratios, centralities, Moran's I (no unit), sample sizes
NEIGHBOURHOOD = (
    "nhood_",
    "co_occurrence_",
    "ripley_",
    "degree_centrality_",
    "average_clustering_",
    "closeness_centrality_",
    "moran_i_",
)


def bundle_regions(bundle) -> gpd.GeoDataFrame:
    """The bundle's regions in µm: metrics.parquet's region rows (every region property) with the
    µm geometry of regions.geojson (its WKT rounded to 0.01 µm, which can make a ring self-touch: made valid)."""
    feats = json.loads((bundle / "regions.geojson").read_text(encoding="utf-8"))["features"]
    geometry = {
        f["properties"]["region_id"]: shapely.make_valid(shapely.from_wkt(f["properties"]["geometry_um"]))
        for f in feats
    }
    metrics = pd.read_parquet(bundle / "metrics.parquet")
    rows = metrics[metrics.kind != "slide"].reset_index(drop=True)
    return gpd.GeoDataFrame(rows, geometry=[geometry[r] for r in rows.region_id])


def lymphocyte_agreement(bundle, slide) -> tuple[float, int]:
    """Lymphocyte vs non-lymphocyte agreement of the segmented nuclei matched to true ones (centres
    within 3 µm), and the number matched."""
    cells = pd.read_parquet(bundle / "cells.parquet", columns=["x_um", "y_um", "cell_type"])
    truth, *_ = load_truth(slide)
    m = match_points(cells[["x_um", "y_um"]].to_numpy(), truth[["x_um", "y_um"]].to_numpy(), 3.0)
    called = cells.cell_type.to_numpy()[m.pred_idx] == "lymphocyte"
    true = truth.cell_type.to_numpy()[m.true_idx] == "lymphocyte"
    return float((called == true).mean()), m.tp


@pytest.fixture(scope="module")
def large_node_bundle(generated, client, tmp_path_factory):
    slide = generated("lymph-node", 4096, 3)  # 2 × 2 mm, 8 follicles (6 with a germinal centre)
    return slide, run_slide(slide, tmp_path_factory.mktemp("node"), "lymph-node-he", client=client, show_progress=False)


@pytest.fixture(scope="module")
def large_synovium_bundle(generated, client, tmp_path_factory):
    slide = generated("synovium", 4096, 2)
    return slide, run_slide(
        slide, tmp_path_factory.mktemp("synovium"), "synovium-he", client=client, show_progress=False
    )


def test_follicles_match_truth(large_node_bundle):
    slide, bundle = large_node_bundle
    _, feats, _ = load_truth(slide)
    n_found, n_true, ious, has_gc = follicle_scores(feats, bundle_regions(bundle))
    print(
        f"\nfollicles {n_found} found / {n_true} true, IoU {np.round(ious, 2)} (mean {np.mean(ious):.3f}), "
        f"has_gc right {has_gc:.2f}"
    )
    assert abs(n_found - n_true) <= 0.2 * n_true, f"{n_found} follicles found, {n_true} true"
    assert np.mean(ious) >= 0.6, np.round(ious, 2)


@pytest.mark.parametrize("which", ["large_node_bundle", "large_synovium_bundle"])
def test_lymphocytes_agree_with_truth(request, which):
    slide, bundle = request.getfixturevalue(which)
    agreement, n = lymphocyte_agreement(bundle, slide)
    print(f"\n{which}: lymphocyte vs non-lymphocyte agreement {agreement:.4f} over {n} matched nuclei")
    assert agreement >= 0.85


def test_synovium_lining_and_aggregate_grades_match_truth(large_synovium_bundle):
    slide, bundle = large_synovium_bundle
    _, feats, _ = load_truth(slide)
    regions = bundle_regions(bundle)
    grades = check_aggregate_grades(feats, regions)
    lining = check_lining_layers(feats, regions)
    print(
        "\naggregates (true grade, grade, true layers, layers): "
        f"{[(t, g, tl, round(fl, 1)) for t, g, tl, fl in grades]}"
        f"\nlining (piece, true layers, layers found): {lining}"
    )


def test_exports_open_in_qupath_anndata_and_squidpy(large_node_bundle):
    """regions.geojson is GeoJSON in QuPath's feature layout, cells.h5ad opens in anndata and squidpy,
    metrics have one row per region with units in the column names (on the pipeline's bundle)."""
    import squidpy as sq

    _, bundle = large_node_bundle
    data = json.loads((bundle / "regions.geojson").read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection" and data["features"]
    for feat in data["features"]:
        props = feat["properties"]
        assert feat["type"] == "Feature" and props["objectType"] == "annotation"
        assert set(props["classification"]) == {"name", "color"} and props["classification"]["name"] == props["kind"]
        assert all(isinstance(v, float) and np.isfinite(v) for v in props["measurements"].values())
        geom = shape(feat["geometry"])
        assert geom.geom_type in ("Polygon", "MultiPolygon") and geom.is_valid and not geom.is_empty
    metrics = pd.read_csv(bundle / "metrics.csv")
    assert list(metrics.region_id) == [f["properties"]["region_id"] for f in data["features"]] + ["slide"]
    numeric = [
        c for c in metrics.columns if pd.api.types.is_numeric_dtype(metrics[c]) and not c.startswith(NEIGHBOURHOOD)
    ]
    assert not [c for c in numeric if not UNITS.match(c) and c not in UNITLESS]
    adata = ad.read_h5ad(bundle / "cells.h5ad")
    cells = pd.read_parquet(bundle / "cells.parquet", columns=["cell_type"])
    assert adata.n_obs == len(cells) and adata.obsm["spatial"].shape == (len(cells), 2)
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype) and "neighbourhood" in adata.uns
    sq.gr.spatial_neighbors_delaunay(adata)
    assert adata.obsp["spatial_connectivities"].nnz > 4 * adata.n_obs
