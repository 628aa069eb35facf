"""End to end on generated slides: real Dask workers, the shipped StarDist model, real OME-TIFFs."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
import zarr
from helpers import SHARED
from scipy.spatial import cKDTree

from histo.io.bundle import is_complete
from histo.run.pipeline import run_slide
from histo.segment.labels import rasterise
from histo.segment.nuclei import border_duplicates, id_centres_um
from histo.segment.task import whole_image_centres
from histo.train.matching import match_points
from histo.workflow import load_workflow, validate

pytestmark = pytest.mark.slow


def truth_of(slide):
    return pd.read_parquet(str(slide).replace(".ome.tif", ".truth.parquet"))


def xy(frame):
    return frame[["x_um", "y_um"]].to_numpy()


def test_bundle_is_complete_and_consistent(lymph_node_bundle):
    slide, bundle = lymph_node_bundle
    assert bundle.name == slide.name.removesuffix(".ome.tif") and is_complete(bundle)
    run = json.loads((bundle / "run.json").read_text())
    cells = pd.read_parquet(bundle / "cells.parquet")
    assert run["n_cells"] == len(cells) > 500
    assert {"cell_id", "x_um", "y_um", "polygon", "area_um2", "prob", "label"} <= set(cells.columns)
    assert cells.cell_id.is_unique and (cells.label.to_numpy() == np.arange(1, len(cells) + 1)).all()
    assert run["input"]["mpp"] == pytest.approx(0.5) and run["model"]["name"] == "histo-he"
    wf = load_workflow("lymph-node-he")  # run.json records the whole Workflow, and it loads back into it
    assert run["workflow"] == wf.as_dict() and validate(run["workflow"]) == wf
    assert run["parameters"]["precision"] in ("float32", "bfloat16")
    grid_px = run["parameters"]["grid_shape_px"][0] * run["parameters"]["grid_shape_px"][1]
    assert 0 < run["parameters"]["kept_px"] <= grid_px and run["parameters"]["kept_px"] < run["parameters"]["read_px"]
    # ownership by centre keeps each nucleus once; the few border copies left (tiles predicting a nucleus
    # slightly apart) are removed, so no two kept nuclei of different tiles are within DUPLICATE_UM
    removed = run["n_border_duplicates_removed"]
    assert isinstance(removed, int) and 0 <= removed < 0.01 * (len(cells) + removed), removed
    tile_codes = cells.tile.astype("category").cat.codes.to_numpy()
    assert not border_duplicates(xy(cells), cells.prob.to_numpy(), tile_codes).any()
    # every step of the driver is timed, one after another: each positive, together within the run's wall time
    steps = {"open_s", "tissue_s", "segment_s", "structures_s", "cells_table_s"}
    steps |= {"neighbourhood_s", "exports_s", "report_s", "labels_s"}
    timings = run["timings_s"]
    assert steps <= set(timings) and all(timings[k] > 0 for k in steps), timings
    wall = (datetime.fromisoformat(run["finished"]) - datetime.fromisoformat(run["started"])).total_seconds()
    assert sum(timings[k] for k in steps) <= wall + 0.01, (timings, wall)
    assert sum(run["task_timings_s"].values()) > 0
    root = zarr.open_group(str(bundle / "labels.ome.zarr"), mode="r")
    level0 = root["0"][:]
    assert level0.shape == tuple(run["parameters"]["grid_shape_px"]) and len(list(root.array_keys())) >= 2
    drawn = np.unique(level0[level0 > 0])
    assert set(drawn) <= set(cells.label) and len(drawn) > 0.95 * len(cells)
    # chunk by chunk, each from its 3×3 tiles' nuclei, equals all nuclei drawn at once
    whole = rasterise(
        shapely.from_wkb(cells.polygon), cells.label.to_numpy(), run["parameters"]["grid_mpp"], (0, 0), level0.shape
    )
    assert np.array_equal(level0, whole)
    # a nucleus's label sits at its centroid (µm → grid px at the model's µm/px)
    sample = cells.sample(200, random_state=0)
    grid_mpp = run["parameters"]["grid_mpp"]
    at = level0[(sample.y_um / grid_mpp).astype(int), (sample.x_um / grid_mpp).astype(int)]
    assert np.mean(at == sample.label.to_numpy()) > 0.9


def test_nuclei_match_truth(lymph_node_bundle):
    slide, bundle = lymph_node_bundle
    m = match_points(xy(pd.read_parquet(bundle / "cells.parquet")), xy(truth_of(slide)), 3.0)
    assert m.f1 >= 0.85, f"F1 {m.f1:.3f} (precision {m.precision:.3f}, recall {m.recall:.3f})"


def test_small_tiles_give_the_same_nuclei_without_duplicates(lymph_node_bundle, client, tmp_path):
    slide, bundle = lymph_node_bundle
    wf = load_workflow("lymph-node-he")
    wf = wf.replace(segmentation=wf.segmentation.replace(tile_um=96.0))  # ~190 px cores: many tile borders
    small = pd.read_parquet(run_slide(slide, tmp_path, wf, client=client, show_progress=False) / "cells.parquet")
    big = pd.read_parquet(bundle / "cells.parquet")
    assert small.tile.nunique() > 4 * big.tile.nunique()
    assert small.cell_id.is_unique
    # no nucleus counted twice: no two centroids closer than 1.5 µm
    assert len(cKDTree(xy(small)).query_pairs(1.5)) == 0
    m = match_points(xy(small), xy(big), 1.0)
    assert m.f1 >= 0.99, f"F1 small vs default tiles {m.f1:.4f}"


def test_tiled_agrees_with_whole_image_prediction(lymph_node_bundle, client):
    slide, bundle = lymph_node_bundle
    run = json.loads((bundle / "run.json").read_text())
    seg = run["workflow"]["segmentation"]  # what the tiles did
    centres = client.submit(
        whole_image_centres, str(slide), "histo-he", seg["second_view_saturation"], seg["flips"], pure=False
    ).result()
    cells = pd.read_parquet(bundle / "cells.parquet")
    params = run["parameters"]
    tiled = id_centres_um(cells.cell_id, params["grid_shape_px"][1], params["grid_mpp"])
    m = match_points(tiled, centres, 1.0)
    assert m.f1 >= 0.99, f"F1 tiled vs whole image {m.f1:.4f} ({m.n_pred} vs {m.n_true})"


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_coordinates_in_um_at_different_pixel_sizes(request, generated, client, tmp_path, mpp):
    size = int(512 / mpp)  # the same 512 µm field at both pixel sizes
    if mpp == 0.5:  # conftest's session synovium_bundle is this slide (1024² px, seed 3) and workflow
        slide, bundle = request.getfixturevalue("synovium_bundle")
    else:
        slide = generated("synovium", size=size, seed=3, mpp=mpp)
        bundle = run_slide(slide, tmp_path, "synovium-he", client=client, show_progress=False)
    cells = pd.read_parquet(bundle / "cells.parquet")
    m = match_points(xy(cells), xy(truth_of(slide)), 3.0)
    assert m.f1 >= 0.85, f"{mpp} µm/px: F1 {m.f1:.3f}"
    assert cells.x_um.max() <= size * mpp and cells.y_um.max() <= size * mpp


def test_parquet_has_one_row_group_per_tile(lymph_node_bundle):
    _, bundle = lymph_node_bundle
    meta = pq.ParquetFile(bundle / "cells.parquet").metadata
    cells = pd.read_parquet(bundle / "cells.parquet")
    assert meta.num_row_groups == cells.tile.nunique()


def _shared_models():
    folder = SHARED / "models"
    return sorted(p for p in folder.iterdir() if (p / "config.json").exists()) if folder.is_dir() else []


@pytest.mark.skipif(not _shared_models(), reason="no pretrained model folders in ../shared/models")
@pytest.mark.parametrize("model", _shared_models(), ids=lambda p: p.name)
def test_pretrained_models_from_shared_find_the_nuclei(generated, client, tmp_path, model):
    slide = generated("lymph-node")
    bundle = run_slide(slide, tmp_path, "lymph-node-he", model=str(model), client=client, show_progress=False)
    m = match_points(xy(pd.read_parquet(bundle / "cells.parquet")), xy(truth_of(slide)), 3.0)
    assert m.f1 >= 0.85, f"{model.name}: F1 {m.f1:.3f}"
