"""A real Aperio slide end to end: CMU-1-Small-Region.svs (JPEG tiles, 0.499 µm/px, skin)."""

from __future__ import annotations

import json

import pandas as pd
import shapely
from helpers import shared_path

from histo.run.pipeline import run_slide


def test_real_svs_gives_nuclei_on_tissue_and_none_on_glass(client, tmp_path):
    svs = shared_path("data", "cmu1_small_region", "CMU-1-Small-Region.svs")
    bundle = run_slide(svs, tmp_path, "lymph-node-he", client=client, show_progress=False)
    run = json.loads((bundle / "run.json").read_text())
    assert run["input"]["format"] == "svs" and run["input"]["mpp"] == 0.499
    cells = pd.read_parquet(bundle / "cells.parquet", columns=["x_um", "y_um", "area_um2"])
    tissue_mm2 = run["tissue"]["area_mm2"]
    assert 0.4 < tissue_mm2 < 0.9  # the strip of skin; the glass on both sides is not tissue
    density = len(cells) / tissue_mm2
    assert 1_000 < density < 15_000, (
        f"{len(cells)} nuclei on {tissue_mm2:.2f} mm²"
    )  # nuclei / mm² of dermis + epidermis
    assert 15 < cells.area_um2.median() < 60  # µm²: real nucleus sizes
    regions = json.loads((bundle / "regions.geojson").read_text())["features"]
    pieces = shapely.union_all(
        [shapely.geometry.shape(f["geometry"]) for f in regions if f["properties"]["kind"] == "tissue"]
    )
    um_per_px = run["input"]["mpp"]  # regions.geojson is in level-0 px (QuPath)
    inside = shapely.contains_xy(pieces.buffer(10 / um_per_px), cells.x_um / um_per_px, cells.y_um / um_per_px)
    assert inside.mean() > 0.99, f"{(~inside).sum()} nuclei off the tissue"
    assert (bundle / "overview.png").stat().st_size > 10_000
    # skin has no lymphoid follicle: every candidate is dropped by the absolute density floor, and said why
    assert run["regions"] == {"tissue": 1}, run["regions"]
    candidates = run["structure_candidates"]
    assert candidates and all(c["result"] != "kept" for c in candidates)
    assert all(c["cells_per_mm2"] < 6000 for c in candidates if c["result"] == "dense_fraction")
