"""Per-region metrics on generated slides (truth cells as input) and the scoring rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import UNITLESS, UNITS, load_truth
from shapely.geometry import box

from histo.outputs.export import write_metrics
from histo.structures.metrics import infiltrate_grade, krenn_band, pathotype_proxy, region_metrics, stroma_grade
from histo.structures.regions import RegionParams, ScoreParams, assign_cells, find_regions, region_params


@pytest.fixture(scope="module", params=[("synovium", 2), ("lymph-node", 3)], ids=["synovium", "lymph-node"])
def measured(request, generated):
    tissue_type, seed = request.param
    cells, _, pieces = load_truth(generated(tissue_type, 4096, seed))
    regions = find_regions(cells, pieces, tissue_type)
    cells = pd.concat([cells, assign_cells(cells, regions)], axis=1)
    return tissue_type, cells, regions, region_metrics(cells, regions, tissue_type)


def test_one_row_per_region_and_a_slide_row(measured):
    tissue_type, cells, regions, table = measured
    assert list(table.region_id) == [*regions.region_id, "slide"]
    assert table.region_id.is_unique
    numeric = [
        c
        for c in table.columns
        if pd.api.types.is_numeric_dtype(table[c]) or table[c].dropna().map(type).isin([bool]).all()
    ]
    unnamed = [c for c in numeric if not UNITS.match(c) and c not in UNITLESS]
    assert not unnamed, f"numeric columns without units in their names: {unnamed}"


def test_counts_and_densities_add_up(measured):
    tissue_type, cells, regions, table = measured
    slide = table.set_index("region_id").loc["slide"]
    assert slide.n_cells == cells.tissue_id.notna().sum()
    types = [
        c
        for c in table.columns
        if c.startswith("n_") and c[2:] in {"lymphocyte", "large", "stromal", "lining", "other"}
    ]
    assert (table[types].sum(1) == table.n_cells).all()
    assert slide.density_lymphocyte_per_mm2 == pytest.approx(slide.n_lymphocyte / slide.area_mm2)
    assert slide.area_mm2 == pytest.approx(table[table.kind == "tissue"].area_mm2.sum())
    fractions = table[[f"fraction_{t}" for t in ("lymphocyte", "large", "stromal", "lining", "other")]]
    assert np.allclose(fractions[table.n_cells > 0].sum(1), 1.0)
    assert slide.sampling_flag == (slide.area_mm2 < 2.5)


def test_structure_summaries(measured):
    tissue_type, cells, regions, table = measured
    slide = table.set_index("region_id").loc["slide"]
    if tissue_type == "lymph-node":
        n = (regions.kind == "follicle").sum()
        assert slide.n_follicles == n and slide.follicles_per_mm2 == pytest.approx(n / slide.area_mm2)
        assert 0 < slide.fraction_area_follicle < 1 and slide.follicle_area_p90_um2 >= slide.follicle_area_median_um2
        assert slide.n_follicles_with_gc == regions[regions.kind == "follicle"].has_gc.sum()
        assert "krenn_sum" not in table.columns
    else:
        grades = regions[regions.kind == "aggregate"].grade
        assert slide.n_aggregates_grade2 == (grades == 2).sum() and slide.n_els == (grades >= 2).sum()
        assert slide.krenn_sum == slide.krenn_lining + slide.krenn_stroma + slide.krenn_infiltrate
        assert slide.krenn_band == krenn_band(slide.krenn_sum) and slide.krenn_version == "2006"
        assert slide.pathotype_proxy_he == "lymphoid"  # the generated synovium holds grade-2/3 aggregates
        assert slide.krenn_infiltrate == 3 and slide.krenn_lining >= 2
        lining = table[table.kind == "lining"]
        assert (lining.lining_nuclei_per_100um > 0).all()


def test_scores():
    scores = region_params("synovium").scores
    assert [krenn_band(v) for v in (0, 1, 2, 4, 5, 9)] == [
        "none",
        "none",
        "low-grade",
        "low-grade",
        "high-grade",
        "high-grade",
    ]
    bands = scores.stroma_bands_per_mm2
    assert [stroma_grade(v, bands) for v in (1000, 1500, 3399, 3400, 6000, 9000)] == [0, 1, 1, 2, 3, 3]
    assert infiltrate_grade([], False, 150.0, 0.0, scores) == 0
    assert infiltrate_grade([], False, 250.0, 0.0, scores) == 1
    assert infiltrate_grade([1, 1], False, 100.0, 0.01, scores) == 1
    assert infiltrate_grade([1, 2], False, 100.0, 0.01, scores) == 2
    assert infiltrate_grade([1], True, 100.0, 0.01, scores) == 3
    assert infiltrate_grade([1], False, 100.0, 0.3, scores) == 3
    assert pathotype_proxy([2], 2, 3) == "lymphoid"
    assert pathotype_proxy([1], 1, 1) == "pauci-immune"
    assert pathotype_proxy([1], 2, 1) == "diffuse"


def test_small_biopsy_without_lymphocytes(tmp_path):
    cells = pd.DataFrame(
        {
            "cell_id": np.arange(10),
            "x_um": np.linspace(10, 90, 10),
            "y_um": 50.0,  # 1,000/mm²
            "cell_type": "stromal",
            "area_um2": 30.0,
        }
    )
    regions = find_regions(cells, [box(0, 0, 100, 100)], "synovium")
    table = region_metrics(cells, regions, "synovium")
    slide = table.set_index("region_id").loc["slide"]
    assert slide.sampling_flag and slide.n_aggregates == 0 and slide.krenn_infiltrate == 0
    assert slide.pathotype_proxy_he == "pauci-immune"
    relaxed = region_metrics(cells, regions, "synovium", RegionParams(scores=ScoreParams(min_tissue_um2=5000.0)))
    assert not relaxed.set_index("region_id").loc["slide"].sampling_flag
    csv, parquet = write_metrics(table, tmp_path)
    assert pd.read_csv(csv).shape == table.shape
    assert list(pd.read_parquet(parquet).columns) == list(table.columns)


@pytest.mark.filterwarnings("error::FutureWarning", "error::RuntimeWarning")
def test_no_tissue_gives_the_slide_row_alone_without_warnings():
    """A tile that is all adipose (CoNSeP train_25) had no tissue and printed pandas' and numpy's
    warnings even under --quiet; now the slide row alone, its rates NaN, and nothing printed."""
    cells = pd.DataFrame({"x_um": [5.0], "y_um": [5.0], "cell_type": ["stromal"], "area_um2": [30.0]}).iloc[:0]
    regions = find_regions(cells, [], "lymph-node")
    table = region_metrics(cells, regions, "lymph-node")
    slide = table.set_index("region_id").loc["slide"]
    assert len(table) == 1 and slide.n_cells == 0 and slide.area_um2 == 0
    assert np.isnan(slide.density_cells_per_mm2) and np.isnan(slide.fraction_area_germinal_centre)


def test_cells_outside_tissue_count_in_no_region():
    """Nuclei over glass beside the tissue (a tile's edge) count neither in the slide row nor in an
    annotation drawn past the tissue."""
    import geopandas as gpd

    x, y = np.meshgrid(np.arange(5.0, 150, 10), np.arange(5.0, 100, 10))
    cells = pd.DataFrame({"x_um": x.ravel(), "y_um": y.ravel(), "cell_type": "lymphocyte"})  # 150 cells, 100 on tissue
    tissue = find_regions(cells, [box(0, 0, 100, 100)], "lymph-node", RegionParams(structures=[]))
    roi = gpd.GeoDataFrame(
        [
            dict(
                region_id="annotation-1",
                kind="annotation",
                name="ROI",
                parent_id=None,
                tissue_id=None,
                area_um2=10_000.0,
                edge_truncated=False,
                geometry=box(50, 0, 150, 100),
            )
        ],
        geometry="geometry",
    )
    regions = pd.concat([tissue, roi], ignore_index=True)
    ids = assign_cells(cells, regions)
    assert ids.tissue_id.notna().sum() == 100 and ids.annotation_id.notna().sum() == 50
    assert ids.annotation_id.notna().le(ids.tissue_id.notna()).all()
    rows = region_metrics(pd.concat([cells, ids], axis=1), regions, "lymph-node").set_index("region_id")
    assert rows.loc["slide", "n_cells"] == 100 and rows.loc["annotation-1", "n_cells"] == 50
    assert list(regions.kind) == ["tissue", "annotation"]  # structures: [] looks for none
