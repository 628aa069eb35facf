"""Multiplex immunofluorescence cells of a generated scene: the per-nucleus marker means a
segmentation of a CyCIF / CODEX image of it would measure (no image is drawn).

Panel: DAPI (every nucleus), CD20 (B cells), CD3 (T cells), CD68 (macrophages), CD138 (plasma
cells). Each nucleus gets a phenotype from its truth style and compartment (``PHENOTYPE_MIX``):
small lymphocytes are mostly B cells in follicles (mantle and germinal centre; some follicular
helper T cells), mostly T cells in the paracortex and synovial stroma, a mix with plasma cells in
the medullary cords; centroblasts are B cells, histiocytes macrophages, stromal, endothelial and
lining nuclei negative for the four markers. Intensities (16-bit-like units) are log-normal;
each cell also picks up ``SPILL`` × the mean signal of its 6 nearest neighbours (membrane signal
next to a nuclear mask), so negatives in a B-cell follicle are brighter than in the paracortex.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from . import scene as sc

PANEL = ("DAPI", "CD20", "CD3", "CD68", "CD138")
MARKER = {"B cell": "CD20", "T cell": "CD3", "macrophage": "CD68", "plasma cell": "CD138"}
# small-lymphocyte phenotype shares (B, T, plasma) per compartment [synthetic, of the order of
# textbook node / synovium composition: follicles B-rich with 5–20 % T follicular helpers]
PHENOTYPE_MIX = {
    "follicle": (0.85, 0.15, 0.0),
    "medulla": (0.3, 0.3, 0.4),
    "aggregate": (0.45, 0.5, 0.05),
    "elsewhere": (0.1, 0.85, 0.05),
}
NEGATIVE_LOG, POSITIVE_LOG, SIGMA_LOG = 5.0, 7.3, 0.4  # ln intensity: ≈ 150 and ≈ 1,500
DAPI_LOG, DAPI_SIGMA = 8.0, 0.25
SPILL = 0.1


def marker_cells(scene: sc.Scene, seed: int = 0) -> pd.DataFrame:
    """Every nucleus of ``scene`` as a cells table: ``id`` (as in the truth parquet), ``x_um``,
    ``y_um``, ``area_um2``, ``region`` (truth region word), ``phenotype`` (a key of :data:`MARKER` or "other")
    and ``mean_<marker>`` for each marker of :data:`PANEL`. Deterministic from ``seed``."""
    parts = [nb for *_, nb in scene.iter_blocks() if nb["x"].size]
    nuc = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else sc._empty()
    n = nuc["x"].size
    rng = np.random.default_rng([seed, scene.seed, 17])
    style, region = nuc["style"], nuc["region"]
    follicular = np.isin(region, [sc.R_FOLL, sc.R_GC])
    compartment = np.select(
        [follicular, sc.fields(scene, nuc["x"], nuc["y"])["medulla"], region == sc.R_AGG],
        ["follicle", "medulla", "aggregate"],
        "elsewhere",
    )
    phenotype = np.full(n, "other", dtype=object)
    lym = style == sc.LYM
    u = rng.random(n)
    for name, (b, t, _) in PHENOTYPE_MIX.items():
        m = lym & (compartment == name)
        phenotype[m] = np.where(u[m] < b, "B cell", np.where(u[m] < b + t, "T cell", "plasma cell"))
    phenotype[style == sc.CB] = "B cell"
    phenotype[style == sc.HIST] = "macrophage"
    own = {"DAPI": np.exp(rng.normal(DAPI_LOG, DAPI_SIGMA, n))}
    for kind, marker in MARKER.items():
        level = np.where(phenotype == kind, POSITIVE_LOG, NEGATIVE_LOG)
        own[marker] = np.exp(rng.normal(level, SIGMA_LOG))
    xy = np.c_[nuc["x"], nuc["y"]]
    k = min(7, n)
    near = cKDTree(xy).query(xy, k=k)[1][:, 1:] if n > 1 else np.zeros((n, 0), int)
    table = pd.DataFrame(
        {
            "id": nuc["id"],
            "x_um": nuc["x"],
            "y_um": nuc["y"],
            "area_um2": np.pi * nuc["a"].astype(np.float64) * nuc["b"],
            "region": sc.REGIONS[region],
            "phenotype": phenotype.astype(str),
        }
    )
    for marker in PANEL:
        spill = SPILL * own[marker][near].mean(axis=1) if near.shape[1] else 0.0
        table[f"mean_{marker}"] = (own[marker] + (spill if marker != "DAPI" else 0.0)).astype(np.float32)
    return table
