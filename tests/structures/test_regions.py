"""Regions from cells, checked against the truth of generated slides (truth cells as input; the
pipeline's segmented cells: tests/structures/test_structures_e2e.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import shapely
from helpers import check_aggregate_grades, check_lining_layers, follicle_scores, load_truth
from shapely.geometry import Polygon, box, shape

from histo.errors import HistoError
from histo.outputs.report import report_html
from histo.structures.aggregates import dbscan, grade
from histo.structures.analyse import cell_types
from histo.structures.lining import krenn_lining
from histo.structures.metrics import region_metrics
from histo.structures.regions import (
    TISSUE_DEFAULTS,
    RegionParams,
    assign_cells,
    edge_truncated,
    find_regions,
    region_params,
)
from histo.workflow import load_workflow


@pytest.fixture(scope="module")
def node_truth_regions(generated):
    """(truth cells, truth features, tissue pieces, regions found from the truth cells) of the generated
    4096² px lymph node."""
    cells, feats, pieces = load_truth(generated("lymph-node", 4096, 3))
    return cells, feats, pieces, find_regions(cells, pieces, "lymph-node")


@pytest.fixture(scope="module")
def synovium_truth_regions(generated):
    """The same for the generated 4096² px synovium."""
    cells, feats, pieces = load_truth(generated("synovium", 4096, 2))
    return cells, feats, pieces, find_regions(cells, pieces, "synovium")


def test_follicles_match_truth(node_truth_regions):
    cells, feats, pieces, regions = node_truth_regions
    n_found, n_true, ious, has_gc = follicle_scores(feats, regions)
    assert abs(n_found - n_true) <= 0.2 * n_true, f"{n_found} follicles found, {n_true} true"
    assert np.mean(ious) >= 0.6, np.round(ious, 2)
    assert has_gc >= 0.75
    assert set(regions.kind) == {"tissue", "follicle", "germinal_centre"}


def test_germinal_centres_lie_in_their_follicle(node_truth_regions):
    *_, regions = node_truth_regions
    gcs = regions[regions.kind == "germinal_centre"]
    follicles = regions.set_index("region_id")
    assert len(gcs) > 0
    for gc in gcs.itertuples():
        host = follicles.loc[gc.parent_id]
        assert host.kind == "follicle" and host.has_gc
        assert gc.geometry.difference(host.geometry).area < 1e-6 * gc.geometry.area + 1e-6
        assert gc.area_um2 >= 900 and 0 < gc.fraction_host_area < 1
    with_gc = regions[(regions.kind == "follicle") & regions.has_gc.astype(bool)]
    assert (with_gc.mantle_thickness_um > 0).all()


def test_aggregate_grades_match_truth(synovium_truth_regions):
    cells, feats, pieces, regions = synovium_truth_regions
    check_aggregate_grades(feats, regions)
    found = regions[regions.kind == "aggregate"]
    assert set(found.tls_size) <= {True, False}
    assert found.n_clustered_lymphocytes.min() >= 10


def test_lining_layers_match_truth(synovium_truth_regions):
    cells, feats, pieces, regions = synovium_truth_regions
    check_lining_layers(feats, regions)
    lining = regions[regions.kind == "lining"]
    assert (lining.length_um >= 200).all() and set(lining.krenn_lining) <= {0, 1, 2, 3}


def test_no_lymphocytes_gives_no_structures(node_truth_regions, synovium_truth_regions):
    for cells, _, pieces, _ in (node_truth_regions, synovium_truth_regions):
        plain = cells.assign(cell_type=np.where(cells.cell_type == "lymphocyte", "stromal", cells.cell_type))
        for tissue_type in ("lymph-node", "synovium"):
            regions = find_regions(plain, pieces, tissue_type)
            assert not regions.kind.isin(["follicle", "aggregate", "germinal_centre"]).any()
    empty = find_regions(cells.iloc[:0], pieces, "synovium")
    assert list(empty.kind) == ["tissue"] * len(pieces)
    assert len(find_regions(cells.iloc[:0], [], "lymph-node")) == 0


def test_regions_are_stable_and_cells_are_assigned(synovium_truth_regions):
    cells, _, pieces, regions = synovium_truth_regions
    again = find_regions(cells.sample(frac=1.0, random_state=1), pieces, "synovium")
    assert list(again.region_id) == list(regions.region_id)
    assert regions.region_id.is_unique and set(regions.kind) >= {"tissue", "aggregate", "lining"}
    ids = assign_cells(cells, regions)
    kinds = ("tissue", "follicle", "germinal_centre", "aggregate", "lining", "annotation")
    assert list(ids.columns) == [f"{k}_id" for k in kinds]
    assert ids.tissue_id.notna().mean() > 0.99
    for rec in regions[regions.kind == "aggregate"].head(3).itertuples():
        inside = shapely.contains_xy(rec.geometry, cells.x_um, cells.y_um)
        assert ((ids.aggregate_id == rec.region_id).to_numpy() == inside).all()
        assert (ids.tissue_id[inside] == rec.tissue_id).all()


def test_dbscan_matches_sklearn():
    from sklearn.cluster import DBSCAN

    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.uniform(0, 400, (600, 2)), rng.normal(100, 8, (80, 2)), rng.normal(300, 15, (150, 2))])
    mine = dbscan(xy, 12.0, 5)
    ref = DBSCAN(eps=12.0, min_samples=5, algorithm="kd_tree").fit(xy)
    core = np.zeros(len(xy), bool)
    core[ref.core_sample_indices_] = True
    assert ((mine < 0) == (ref.labels_ < 0)).all()
    pairs = {(a, b) for a, b in zip(mine[core], ref.labels_[core])}
    assert len(pairs) == len(set(mine[core])) == len(set(ref.labels_[core]))  # same partition of core points
    assert len(dbscan(np.zeros((0, 2)), 12.0, 5)) == 0


def test_grades_and_edges():
    assert [grade(v, [2, 6, 11]) for v in (1.4, 1.6, 5.4, 5.6, 10.4, 10.6, 30)] == [0, 1, 1, 2, 2, 3, 3]
    assert [krenn_lining(v) for v in (1, 1.4, 2, 3.4, 4, 5.4, 6, 9)] == [0, 0, 1, 1, 2, 2, 3, 3]
    piece = box(0, 0, 1000, 1000)
    assert edge_truncated(Polygon([(0, 10), (100, 10), (100, 100), (0, 100)]), piece, 10.0)
    assert not edge_truncated(box(50, 50, 150, 150), piece, 10.0)


def test_params_follow_the_workflow_schema():
    for tissue_type in ("lymph-node", "synovium"):
        params = region_params(tissue_type)
        assert isinstance(params, RegionParams) and params.replace(structures=None) == RegionParams()
        assert params.structures == TISSUE_DEFAULTS[tissue_type]["structures"]
    tuned = region_params("synovium", {"aggregate": {"eps_um": 15}})  # a mapping (run.json's) is built and checked
    assert tuned.aggregate.eps_um == 15.0 and tuned.aggregate.min_samples == 5
    assert region_params("synovium", tuned) is tuned  # its structures already set
    with pytest.raises(HistoError, match=r"'regions\.aggregate\.eps' \(allowed"):
        region_params("synovium", {"aggregate": {"eps": 15.0}})
    preset = load_workflow("synovium-he").regions
    assert region_params("synovium", preset.as_dict()) == preset
    with pytest.raises(HistoError, match="tonsil"):
        region_params("tonsil")


@pytest.fixture(scope="module")
def if_node():
    """The generated lymph node of ``node`` as a multiplex immunofluorescence cells table (marker means
    per nucleus, histo_sample.marker_cells; no image), its truth features and tissue pieces."""
    from histo_sample import make_scene, marker_cells
    from histo_sample.write import truth_geojson

    scene = make_scene("lymph-node", 4096, 3, 0.5)
    feats = truth_geojson(scene)["features"]
    return marker_cells(scene), feats, [shape(f["geometry"]) for f in feats if f["properties"]["kind"] == "tissue"]


def test_if_preset_gates_cells_and_finds_b_cell_follicles(if_node):
    """lymph-node-if from a cells table: auto gates → B-cell follicles → metrics per gated type."""
    cells, feats, pieces = if_node
    wf = load_workflow("lymph-node-if")
    types, report = cell_types(cells, wf)
    assert [(g["marker"], g["cell_type"], g["method"]) for g in report["gates"]] == [
        ("CD20", "B cell", "otsu"),
        ("CD3", "T cell", "otsu"),
        ("CD68", "macrophage", "otsu"),
        ("CD138", "plasma cell", "otsu"),
    ]
    assert all(150 < g["threshold"] < 1500 for g in report["gates"])  # between negative and positive cells
    assert (np.asarray(types) == cells.phenotype).mean() >= 0.97
    cells = cells.assign(cell_type=types)
    regions = find_regions(cells, pieces, wf.tissue_type, wf.regions)
    n_found, n_true, ious, _ = follicle_scores(feats, regions)
    assert abs(n_found - n_true) <= 0.2 * n_true, f"{n_found} follicles found, {n_true} true"
    assert np.mean(ious) >= 0.8, np.round(ious, 2)
    found = regions[regions.kind == "follicle"]
    assert set(regions.kind) == {"tissue", "follicle"} and found.has_gc.isna().all()  # no GC marker: not looked for
    table = region_metrics(
        pd.concat([cells, assign_cells(cells, regions)], axis=1), regions, wf.tissue_type, wf.regions
    )
    rows = table.set_index("region_id")
    assert (rows.loc[found.region_id, "fraction_b_cell"] >= 0.7).all()
    slide = rows.loc["slide"]
    assert slide.fraction_b_cell < 0.5 and slide.n_follicles == len(found) and np.isnan(slide.n_follicles_with_gc)
    assert {"n_t_cell", "density_plasma_cell_per_mm2"} <= set(table.columns) and "n_lymphocyte" not in table.columns
    assert slide.n_b_cell + slide.n_t_cell + slide.n_macrophage + slide.n_plasma_cell + slide.n_other == slide.n_cells
    blank = np.full((256, 256, 3), 255, np.uint8)  # the report names the gated types and maps the B cells
    html = report_html("if-node", blank, 2048 / 256, regions, cells, table, wf.tissue_type, lymphoid=("B cell",))
    assert "B cell density" in html and "fraction_plasma_cell" in html and "density_b_cell_per_mm2" in html


def _scatter(rng, inside, density_per_mm2: float, box_um: float) -> np.ndarray:
    """Points (µm) at ``density_per_mm2`` (Poisson) over [0, box_um]², kept where ``inside(x, y)``."""
    xy = rng.uniform(0, box_um, (rng.poisson(density_per_mm2 * box_um**2 / 1e6), 2))
    return xy[inside(xy[:, 0], xy[:, 1])]


def test_paracortex_inside_a_ring_of_follicles_is_no_follicle():
    """Eight follicles (⌀ 160 µm, 17,000 lymphocytes/mm², the mantle's density on generated nodes) crowded
    on a ring around paracortex (7,000 /mm², few large cells): the ring's hole is not filled into one round
    "follicle" that the watershed cannot split (a generated 0.29 mm² node had its five follicles so merged
    over 55 % of its tissue); a germinal centre (large cells, few lymphocytes) inside a follicle's mantle
    ring is filled into that follicle."""
    rng = np.random.default_rng(0)
    size, centre = 1200.0, 600.0
    follicles = [(centre + 250 * np.cos(a), centre + 250 * np.sin(a)) for a in np.arange(8) * np.pi / 4]
    in_follicle = lambda x, y: np.any([np.hypot(x - fx, y - fy) < 80 for fx, fy in follicles], axis=0)  # noqa: E731
    bridge = lambda x, y: np.abs(np.hypot(x - centre, y - centre) - 250) < 20  # noqa: E731  dense mantle between
    lym = np.concatenate(
        [
            _scatter(rng, lambda x, y: ~in_follicle(x, y) & ~bridge(x, y), 7000, size),
            _scatter(rng, lambda x, y: in_follicle(x, y) | bridge(x, y), 17000, size),
        ]
    )
    large = _scatter(rng, lambda x, y: np.ones(len(x), bool), 500, size)
    cells = pd.DataFrame(
        dict(
            x_um=np.r_[lym[:, 0], large[:, 0]],
            y_um=np.r_[lym[:, 1], large[:, 1]],
            cell_type=["lymphocyte"] * len(lym) + ["large"] * len(large),
        )
    )
    piece = box(0, 0, size, size)
    found = find_regions(cells, [piece], "lymph-node")
    follicles_found = found[found.kind == "follicle"]
    assert not follicles_found.geometry.contains(shapely.Point(centre, centre)).any()  # the paracortex stays out
    assert follicles_found.area_um2.sum() < np.pi * (330**2 - 170**2)  # within the annulus of the ring
    assert len(follicles_found) >= 4

    # one follicle ⌀ 400 µm: a mantle ring of 60 µm around a germinal centre of large pale cells
    r = lambda x, y: np.hypot(x - centre, y - centre)  # noqa: E731
    lym = np.concatenate(
        [
            _scatter(rng, lambda x, y: r(x, y) >= 200, 7000, size),
            _scatter(rng, lambda x, y: (r(x, y) < 200) & (r(x, y) >= 140), 17000, size),
            _scatter(rng, lambda x, y: r(x, y) < 140, 3000, size),
        ]
    )
    large = np.concatenate(
        [_scatter(rng, lambda x, y: r(x, y) < 140, 4000, size), _scatter(rng, lambda x, y: r(x, y) >= 140, 400, size)]
    )
    cells = pd.DataFrame(
        dict(
            x_um=np.r_[lym[:, 0], large[:, 0]],
            y_um=np.r_[lym[:, 1], large[:, 1]],
            cell_type=["lymphocyte"] * len(lym) + ["large"] * len(large),
        )
    )
    found = find_regions(cells, [piece], "lymph-node")
    follicle = found[found.kind == "follicle"]
    assert len(follicle) == 1 and follicle.geometry.iloc[0].contains(shapely.Point(centre, centre))
    assert 0.8 < follicle.area_um2.iloc[0] / (np.pi * 200**2) < 1.5
    assert (found.kind == "germinal_centre").sum() == 1
