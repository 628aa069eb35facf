"""Neighbourhood statistics (Squidpy) on the truth cells of a generated lymph node."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import ROOT, histo, load_truth, shared_path

from histo.errors import HistoError, WorkflowError
from histo.io.slide import open_slide
from histo.outputs.write import write_outputs
from histo.stats.neighbourhood import (
    CentralityScores,
    CoOccurrence,
    InteractionMatrix,
    Moran,
    NeighbourhoodParams,
    NhoodEnrichment,
    Ripley,
    group_stats,
    neighbourhood_stats,
    nhood_params,
    region_groups,
    stats_result,
)
from histo.structures.metrics import region_metrics
from histo.structures.regions import assign_cells, find_regions
from histo.workflow import load_workflow

OFF = NeighbourhoodParams(
    nhood_enrichment=NhoodEnrichment(run=False),
    interaction_matrix=InteractionMatrix(run=False),
    centrality_scores=CentralityScores(run=False),
    co_occurrence=CoOccurrence(run=False),
    ripley=Ripley(run=False),
    moran=Moran(run=False),
)
ENRICHMENT = OFF.replace(nhood_enrichment=NhoodEnrichment(run=True, n_perms=100))


@pytest.fixture(scope="module")
def node_bt_cells(generated):
    """Truth cells with region ids; lymphocytes of the true follicles relabelled B, the others T."""
    cells, _, pieces = load_truth(generated("lymph-node", 4096, 3))
    regions = find_regions(cells, pieces, "lymph-node")
    cells = pd.concat([cells, assign_cells(cells, regions)], axis=1)
    b = (cells.cell_type == "lymphocyte") & cells.region.isin(["follicle", "germinal_centre"])
    bt = np.where(b, "B", np.where(cells.cell_type == "lymphocyte", "T", cells.cell_type))
    return cells, regions, cells.assign(cell_type=bt)


def _z(result, region_id, a, b):
    types = result["cell_types"]
    return result["regions"][region_id]["nhood_zscore"][types.index(a), types.index(b)]


def test_b_cells_segregate_and_germinal_centres_cluster(node_bt_cells):
    cells, regions, bt = node_bt_cells
    res = neighbourhood_stats(bt, ENRICHMENT.replace(kinds=["tissue"]))
    assert _z(res, "slide", "B", "B") > 20 and _z(res, "slide", "T", "T") > 20
    assert _z(res, "slide", "B", "T") < -20
    res = neighbourhood_stats(cells, ENRICHMENT.replace(kinds=["follicle"]))
    with_gc = regions[(regions.kind == "follicle") & regions.has_gc.astype(bool)].region_id
    assert len(with_gc) >= 3
    z_gc = [_z(res, rid, "large", "large") for rid in with_gc if rid in res["regions"]]
    assert len(z_gc) == len(with_gc) and np.median(z_gc) > 5  # large GC cells clump inside their follicle


def test_mixed_control_is_near_zero(node_bt_cells):
    _, _, bt = node_bt_cells
    mixed = bt.assign(cell_type=np.random.default_rng(5).permutation(bt.cell_type.to_numpy()))
    res = neighbourhood_stats(mixed, ENRICHMENT.replace(kinds=["tissue"]))
    z = res["regions"]["slide"]["nhood_zscore"]
    assert np.isfinite(z).all() and np.abs(z).max() < 4, z
    assert _z(neighbourhood_stats(bt, ENRICHMENT.replace(kinds=[])), "slide", "B", "B") > 10 * np.abs(z).max()


def test_same_seed_same_numbers_and_sample_bound(node_bt_cells):
    cells, regions, _ = node_bt_cells
    params = NeighbourhoodParams(
        kinds=["tissue", "follicle"],
        co_occurrence=CoOccurrence(max_cells=800, max_um=60.0),
        ripley=Ripley(max_cells=500),
        centrality_scores=CentralityScores(max_cells=5_000),
    )
    first, again = neighbourhood_stats(cells, params), neighbourhood_stats(cells, params)
    other = neighbourhood_stats(cells, params.replace(seed=1, kinds=[]))
    assert first["regions"].keys() == again["regions"].keys()
    assert {"slide", "tissue-1"} | set(regions[regions.kind == "follicle"].region_id) == set(first["regions"])
    _assert_same(first, again)
    for r in first["regions"].values():
        n = r["n_cells"]
        assert r["co_occurrence_n_cells"] == min(n, 800) and r["ripley_n_cells"] == min(n, 500)
        assert np.isnan(r["centrality"].to_numpy()).all() == (n > 5_000)
    assert not np.array_equal(first["regions"]["slide"]["nhood_zscore"], other["regions"]["slide"]["nhood_zscore"])
    assert not np.array_equal(
        first["regions"]["slide"]["ripley_L"], other["regions"]["slide"]["ripley_L"], equal_nan=True
    )  # another sample
    # as a cluster computes them: one graph, the slide alone, the regions in groups of about equal cells
    groups = region_groups(cells, params, 3)
    assert (
        groups[0] == ["slide"]
        and len(groups) == 4
        and sorted(sum(groups[1:], [])) == sorted(set(first["regions"]) - {"slide"})
    )
    split = stats_result(cells, params, [group_stats(cells, params, g) for g in reversed(groups)])
    assert list(split["regions"]) == list(first["regions"]) and split["cell_types"] == first["cell_types"]
    _assert_same(first, split)


def _assert_same(a: dict, b: dict):
    """Every statistic of every region of result ``a`` equals ``b``'s (NaN equal to NaN)."""
    for rid, r in a["regions"].items():
        for key, value in r.items():
            same = (
                value.equals(b["regions"][rid][key])
                if isinstance(value, pd.DataFrame)
                else np.array_equal(value, b["regions"][rid][key], equal_nan=np.asarray(value).dtype.kind == "f")
            )
            assert same, (rid, key)


def test_bundle_files_carry_the_statistics(node_bt_cells, generated, tmp_path):
    cells, regions, _ = node_bt_cells
    wf = load_workflow("lymph-node-he")
    nhood = wf.neighbourhood
    nhood = nhood.replace(
        co_occurrence=nhood.co_occurrence.replace(max_cells=2_000),
        ripley=nhood.ripley.replace(max_cells=2_000),
        centrality_scores=nhood.centrality_scores.replace(max_cells=3_000),
    )
    wf = wf.replace(neighbourhood=nhood)
    slide = open_slide(generated("lymph-node", 4096, 3))
    write_outputs(tmp_path, "node", cells, regions, region_metrics(cells, regions, "lymph-node"), slide, wf)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    row = metrics.set_index("region_id").loc["slide"]
    assert row.nhood_n_cells == len(cells) and row.co_occurrence_n_cells == 2_000 and row.ripley_n_cells == 2_000
    assert row.nhood_z_lymphocyte__large < 0 < row.nhood_z_large__large
    assert row.ripley_max_l_minus_d_um_large > 5  # large cells cluster (germinal centres): L(d) > d
    assert np.isnan(row.closeness_centrality_large)  # more cells than centrality_scores.max_cells
    assert "nhood_z_large__lymphocyte" not in metrics  # one column per unordered pair
    assert metrics.loc[metrics.kind == "germinal_centre", "nhood_n_cells"].isna().all()  # kind not analysed
    assert metrics.loc[metrics.kind == "follicle", "nhood_n_cells"].notna().all()
    assert {"moran_i_area_um2", "co_occurrence_large_10um", "closeness_centrality_stromal"} <= set(metrics.columns)
    uns = ad.read_h5ad(tmp_path / "cells.h5ad").uns["neighbourhood"]
    assert list(uns["cell_types"]) == ["lymphocyte", "large", "stromal"]
    follicle = uns["regions"]["follicle-1"]
    assert follicle["co_occurrence"].shape == (3, 3, 20) and np.allclose(
        follicle["co_occurrence_um"][[0, -1]], [10, 200]
    )
    assert follicle["n_cells"] == int(metrics.set_index("region_id").at["follicle-1", "nhood_n_cells"])
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 3 and "Neighbourhood" in html


def test_params_are_checked():
    assert nhood_params().max_edge_um == 30.0 and nhood_params({"ripley": {"n_steps": 5}}).ripley.max_um == 100.0
    with pytest.raises(WorkflowError, match=r"neighbourhood\.ripley\.max_cell"):
        nhood_params({"ripley": {"max_cell": 5}})
    with pytest.raises(HistoError, match="knn"):
        nhood_params({"graph": "knn"})
    with pytest.raises(HistoError, match="folicle"):
        nhood_params({"kinds": ["tissue", "folicle"]})
    with pytest.raises(WorkflowError, match="'neighbourhood.graph' must be one of delaunay, radius, got 'knn'"):
        nhood_params(NeighbourhoodParams(graph="knn"))  # built in code: checked all the same


def test_too_few_cells_give_no_statistics():
    """A slide of glass (no cells) or a handful of cells: no graph, no regions, no error."""
    from histo.stats.neighbourhood import neighbourhood_metrics, neighbourhood_stats

    cells = pd.DataFrame({"x_um": [1.0, 2.0], "y_um": [1.0, 3.0], "cell_type": ["lymphocyte", "other"]})
    for table in (cells, cells.iloc[:0]):
        result = neighbourhood_stats(table)
        assert result["regions"] == {} and list(neighbourhood_metrics(result).columns) == ["region_id"]


def _one_type_follicle(n: int = 900, seed: int = 2) -> pd.DataFrame:
    """Cells on a jittered grid, B and T mixed, except a follicle (the left third) of B cells only."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n))
    x, y = (
        np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) * 10.0
        + rng.uniform(-3, 3, (side * side, 2))
    ).T
    follicle = x < side * 10 / 3
    return pd.DataFrame(
        {
            "x_um": x,
            "y_um": y,
            "area_um2": rng.uniform(20, 40, x.size),
            "cell_type": np.where(follicle | (rng.random(x.size) < 0.5), "B", "T"),
            "follicle_id": pd.Categorical(np.where(follicle, "follicle-1", None)),
        }
    )


def test_one_cell_type_skips_the_pair_statistics_and_says_why():
    """A slide, or a region, whose cells all have one type completes (squidpy's nhood_enrichment raises
    "Expected at least 2 clusters" there): the statistics between types are skipped, the reason kept."""
    from histo.stats.neighbourhood import PAIR_STATS, neighbourhood_metrics

    cells = _one_type_follicle()
    params = NeighbourhoodParams(
        kinds=["follicle"], co_occurrence=CoOccurrence(max_cells=500), ripley=Ripley(max_cells=500)
    )
    res = neighbourhood_stats(cells, params)
    assert set(res["regions"]) == {"slide", "follicle-1"} and set(res["skipped"]) == {"follicle-1"}
    assert set(res["skipped"]["follicle-1"]) == set(PAIR_STATS)
    assert "1 (B)" in res["skipped"]["follicle-1"]["co_occurrence"]
    follicle, slide = res["regions"]["follicle-1"], res["regions"]["slide"]
    assert {"nhood_zscore", "interaction", "centrality", "co_occurrence"} <= set(slide)
    assert not {"nhood_zscore", "interaction", "centrality", "co_occurrence"} & set(follicle)
    assert np.isfinite(follicle["ripley_L"][0]).all() and np.isfinite(follicle["moran_I"]).all()
    metrics = neighbourhood_metrics(res).set_index("region_id")
    assert np.isnan(metrics.at["follicle-1", "nhood_z_B__T"]) and np.isfinite(metrics.at["slide", "nhood_z_B__T"])
    only_b = neighbourhood_stats(cells.assign(cell_type="B"), params)
    assert set(only_b["skipped"]) == {"slide", "follicle-1"} and "nhood_zscore" not in only_b["regions"]["slide"]


def test_a_handful_of_cells_or_a_line_of_them_say_why_there_are_none():
    line = pd.DataFrame({"x_um": np.arange(60.0), "y_um": np.zeros(60), "cell_type": ["B", "T"] * 30})
    assert "one line" in neighbourhood_stats(line)["skipped"]["slide"]["all"]
    assert "min_cells (50)" in neighbourhood_stats(line.iloc[:10])["skipped"]["slide"]["all"]
    apart = line.assign(x_um=line.x_um * 100, y_um=np.arange(60.0) % 2 * 100)  # cells 100 µm apart: no edge
    assert "no graph edge" in neighbourhood_stats(apart)["skipped"]["slide"]["moran"]


@pytest.mark.slow
def test_a_real_patch_of_one_cell_type_completes(tmp_path):
    """A real lymph-node crop whose nuclei all get one type (issue 21: FL_examples_106 did with the rules
    of then; the learned classes now give it two, so the workflow's rules type every nucleus lymphocyte):
    exit 0, and run.json says which statistics were skipped and why."""
    import json

    import yaml

    patch = shared_path("data", "lymph_node_patches", "follicular_lymphoma", "FL_examples_106.jpg")
    wf = yaml.safe_load((ROOT / "workflows" / "lymph-node-he.yaml").read_text())
    wf["cell_types"] = {
        "learned": False,
        "calibrate": False,
        "lymphocyte_min_area_um2": 0,
        "lymphocyte_max_area_um2": 1e4,
        "lymphocyte_max_eccentricity": 1.0,
        "lymphocyte_min_solidity": 0,
        "lymphocyte_min_od_ratio": 0,
    }
    (tmp_path / "one-type.yaml").write_text(yaml.safe_dump(wf))
    proc = histo("run", patch, "--mpp", "0.46", "--out", tmp_path, "--workflow", tmp_path / "one-type.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "FL_examples_106" / "run.json").read_text())
    assert run["status"] == "complete" and run["n_cells"] > 50
    assert set(run["neighbourhood_skipped"]) == {"slide", "tissue-1"}
    assert "1 (lymphocyte)" in run["neighbourhood_skipped"]["slide"]["nhood_enrichment"]


def test_sparse_statistics_equal_squidpy_and_networkx(node_bt_cells):
    """Centralities (sparse, breadth-first), interaction matrix, co-occurrence and Ripley's L (KD-tree
    pair counts) give squidpy's own numbers (networkx for the centralities) on a small graph with gaps."""
    import squidpy as sq

    from histo.stats.neighbourhood import _interaction, _ripley, cells_adata, centrality_scores, co_occurrence

    _, _, bt = node_bt_cells
    window = bt[(bt.x_um < bt.x_um.min() + 500) & (bt.y_um < bt.y_um.min() + 700)]
    assert 1_000 < len(window) < 5_000
    adata = cells_adata(window, NeighbourhoodParams(kinds=[], max_edge_um=12.0))  # short edges: isolated cells
    assert (np.diff(adata.obsp["spatial_connectivities"].indptr) == 0).any()
    ours, theirs = centrality_scores(adata), sq.gr.centrality_scores(adata, "cell_type", copy=True, n_jobs=1)
    pd.testing.assert_frame_equal(ours, theirs[ours.columns].astype(np.float64), rtol=1e-12, check_names=False)
    assert np.array_equal(_interaction(adata), sq.gr.interaction_matrix(adata, "cell_type", copy=True))
    interval = np.arange(0.0, 205.0, 10.0).astype(np.float32)
    occ, _ = sq.gr.co_occurrence(adata, "cell_type", interval=interval, copy=True)
    assert np.allclose(co_occurrence(adata, interval), occ, rtol=1e-9, atol=0)
    types = list(adata.obs.cell_type.cat.categories)
    res = sq.gr.ripley(adata, "cell_type", mode="L", max_dist=100.0, n_steps=21, n_simulations=1, seed=0, copy=True)
    wide = res["L_stat"].pivot(index="cell_type", columns="bins", values="stats").reindex(types)
    wide = wide.mul(adata.n_obs / adata.obs.cell_type.value_counts().reindex(types).astype(float), axis=0)
    assert np.allclose(_ripley(adata, types, Ripley(max_um=100.0, n_steps=21))["ripley_L"], wide.to_numpy(), rtol=1e-12)
