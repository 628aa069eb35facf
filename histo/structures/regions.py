"""Regions of a slide from its cells: tissue pieces, lymph-node follicles and germinal centres,
synovial lymphoid aggregates (``histo.structures.aggregates``) and lining (``histo.structures.lining``).

Everything is in µm. A region table is a GeoDataFrame (no CRS; µm, level-0 origin) with one row
per region: ``region_id`` (``<kind>-<n>``, numbered by tissue piece then centroid y, x, so the same
input gives the same ids), ``kind`` (also its QuPath classification), ``name``, ``parent_id``,
``tissue_id``, ``geometry`` and per-kind properties (NaN where they do not apply). Numbers come from
/work/shared/DOMAIN.md (cited as §n); [P] marks our proxies, to calibrate on pathologist labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import ClassVar, NamedTuple

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy import ndimage as ndi
from scipy.signal import fftconvolve
from shapely.geometry import Polygon
from skimage.feature import peak_local_max
from skimage.filters import apply_hysteresis_threshold
from skimage.measure import find_contours
from skimage.morphology import disk
from skimage.segmentation import watershed

from histo.config import Section, build
from histo.errors import HistoError
from histo.structures.aggregates import find_aggregates
from histo.structures.lining import find_lining

TISSUE_TYPES = ("lymph-node", "synovium")
STRUCTURES = ("follicle", "germinal_centre", "aggregate", "lining")  # what find_regions can look for
KINDS = ("tissue", "follicle", "germinal_centre", "aggregate", "lining", "annotation")
MAX_GRID_PX = 16_000_000  # density rasters are coarsened beyond this many pixels per tissue piece


@dataclass(frozen=True)
class FollicleParams(Section):
    """``regions.follicle``: lymph-node follicles, §7.4b [P] (:func:`find_follicles`)."""

    cell_types: list[str] = field(default_factory=lambda: ["lymphocyte"])  # the cells follicles are made of: small
    #   lymphocytes (H&E); B cells (IF / IHC)
    smooth_fwhm_um: float = 50.0  # µm, "50 µm-smoothed" small-lymphocyte density: Gaussian FWHM (σ 21 µm)
    min_density_ratio: float = 1.2  # ≥ 1.2 × the paracortex (tissue) median
    min_cell_fraction: float | None = None  # set: follicular where `cell_types` are ≥ this fraction of all nuclei,
    #   instead of the density ratio (gated B cells are too few outside follicles for a median) [P]
    large_density_ratio: float = 2.5  # GC fill: large-nucleus density ≥ 2.5 × median [P]
    min_dense_fraction: float = 0.33  # ≥ 1/3 of a follicle is dense small lymphocytes (mantle) [P]
    close_um: float = 20.0  # µm, closing radius that seals mantle rings around GCs [P]
    split_um: float = 60.0  # µm, watershed splits touching follicles whose centres are ≥ this apart [P]
    open_um: float = 30.0  # µm, opening radius: trims spurs of dense paracortex < 60 µm wide [P]
    min_area_um2: float = 30_000.0  # µm², ≥ 0.03 mm² (§7.4b; follicle ⌀ 200–1,000 µm, §3)
    min_cells_per_mm2: float = 6000.0  # /mm², absolute floor: dense pixels and kept follicles hold ≥ this many
    #   follicle cells per mm² (lymphocytes in TLS 12,800 ± 2,600 vs 4,000 outside, §2 Barmpoutis 2021) [P from L]
    min_cells: int = 45  # ≥ 45 follicle cells (TLS minimum, §2 Barmpoutis 2021) [L]

    RANGES: ClassVar = {"min_cell_fraction": (0.0, 1.0), "min_dense_fraction": (0.0, 1.0)}


@dataclass(frozen=True)
class GerminalCentreParams(Section):
    """``regions.germinal_centre``: germinal centres in follicles or aggregates, §7.4
    (:func:`find_germinal_centres`)."""

    cell_types: list[str] = field(default_factory=lambda: ["large"])  # the "large pale" nuclei (centroblasts,
    #   tingible-body macrophages, §3); [] = none
    radius_um: float = 50.0  # µm, "nuclei within 50 µm" (a disc)
    min_large_fraction: float = 0.4  # ≥ 40 % large/pale nuclei (§7.4)
    edge_large_fraction: float = 0.2  # outline where the fraction falls to half of that [P]
    min_area_um2: float = 900.0  # µm², ≥ 900 µm² (§5 HookNet-TLS, §7.4)
    min_inside_fraction: float = 0.5  # ≥ 50 % inside its follicle / aggregate (§7.4)

    RANGES: ClassVar = {
        "min_large_fraction": (0.0, 1.0),
        "edge_large_fraction": (0.0, 1.0),
        "min_inside_fraction": (0.0, 1.0),
    }


@dataclass(frozen=True)
class AggregateParams(Section):
    """``regions.aggregate``: synovial lymphoid aggregates, §7.2–7.3 (histo.structures.aggregates)."""

    cell_types: list[str] = field(default_factory=lambda: ["lymphocyte"])  # the cells clustered into aggregates
    #   (and counted for the infiltrate score)
    eps_um: float = 12.0  # µm, DBSCAN radius on lymphocyte centroids (§7.2)
    min_samples: int = 5  # DBSCAN core: ≥ 5 lymphocytes within eps, itself included (§7.2)
    min_cells: int = 10  # cluster ≥ 10 lymphocytes = grade-1 candidate (§7.2)
    buffer_um: float = 5.0  # µm, outline = 5 µm buffer of the cells (§7.2)
    smooth_um: float = 6.0  # µm, closing radius of the outline (eps / 2) [P]
    tls_min_cells: int = 50  # `tls_size` flag: ≥ 50 cells (§2, Chisholm & Mason 1968) …
    tls_min_area_um2: float = 6245.0  # µm², … and ≥ 6,245 µm² (§2, Barmpoutis 2021); a flag, not a filter
    grade_min_layers: list[int] = field(default_factory=lambda: [2, 6, 11])  # radial layers for G1, G2, G3
    #   (§2, §7.3: 2–5, 6–10, >10)

    RANGES: ClassVar = {"min_samples": (1, 1e6)}


@dataclass(frozen=True)
class LiningParams(Section):
    """``regions.lining``: the synovial lining, §7.5 (histo.structures.lining)."""

    segment_um: float = 100.0  # µm, boundary segments (§7.5)
    surface_um: float = 15.0  # µm, surface band 0–15 µm (§7.5)
    reference_um: float = 45.0  # µm, reference band under the lining band (15–60 µm if thin, §7.5)
    min_density_ratio: float = 2.0  # surface ≥ 2 × reference density (§7.5)
    deep_um: list[float] = field(default_factory=lambda: [60.0, 120.0])  # µm, sublining depth range that sets the
    #   band's half-density edge [P]
    bin_um: float = 2.5  # µm, depth profile bin [P]
    rim_um: float = 12.5  # µm, the outline may run this far outside the outermost nuclei (~1.5 px of the 8 µm/px
    #   tissue mask; raise it with a coarser `tissue.mpp`) [P]
    max_gap_um: float = 100.0  # µm, a gap of one segment between lining segments is bridged (the ratio test
    #   on ~20 nuclei misses 1 in 5 segments of a true lining on generated synovium) [P]
    min_length_um: float = 200.0  # µm, shorter lining runs are dropped [P]

    RANGES: ClassVar = {"segment_um": (1.0, 1e4), "bin_um": (0.1, 100.0)}


@dataclass(frozen=True)
class ScoreParams(Section):
    """``regions.scores``: synovium Krenn-like sub-scores and sampling (histo.structures.metrics)."""

    stroma_bands_per_mm2: list[float] = field(default_factory=lambda: [1500.0, 3400.0, 6000.0])  # /mm², §7.6 [P];
    #   3,400 = RA vs OA (HSS 2023, §1)
    min_lymphocytes_per_mm2: float = 200.0  # /mm², §7.7: no clusters and fewer = infiltrate 0 [P]
    lymphoid_area_fraction: float = 0.25  # §7.7: aggregates over > 25 % of tissue = infiltrate 3 [P]
    min_tissue_um2: float = 2_500_000.0  # µm², §7.8: < 2.5 mm² (20 high-power fields) = sampling flag [L]

    RANGES: ClassVar = {"lymphoid_area_fraction": (0.0, 1.0)}


@dataclass(frozen=True)
class RegionParams(Section):
    """The ``regions:`` section of a workflow: which structures to find and how (:func:`find_regions`)."""

    structures: list[str] | None = None  # kinds to find (STRUCTURES), [] = none; None = the tissue type's
    #   (TISSUE_DEFAULTS; :func:`region_params` fills it in)
    grid_um: float = 5.0  # µm, pixel of the density rasters [P]
    edge_um: float = 10.0  # µm; this close to the tissue outline = edge-truncated (§0: cores cut follicles) [P]
    follicle: FollicleParams = field(default_factory=FollicleParams)  # lymph node, §7.4b [P]
    germinal_centre: GerminalCentreParams = field(default_factory=GerminalCentreParams)  # §7.4
    aggregate: AggregateParams = field(default_factory=AggregateParams)  # synovium, §7.2–7.3
    lining: LiningParams = field(default_factory=LiningParams)  # synovium, §7.5
    scores: ScoreParams = field(
        default_factory=ScoreParams
    )  # synovium Krenn-like sub-scores (histo.structures.metrics)

    RANGES: ClassVar = {"grid_um": (0.5, 100.0)}


TISSUE_DEFAULTS: dict = {  # per-tissue defaults of RegionParams.structures (where a preset leaves it unset)
    "lymph-node": {"structures": ["follicle", "germinal_centre"]},  # aggregates mean nothing in a node (§7.4b)
    "synovium": {"structures": ["aggregate", "germinal_centre", "lining"]},
}


class Grid(NamedTuple):
    """A raster over µm: pixel (r, c) covers [x0 + c·px, x0 + (c+1)·px) × [y0 + r·px, …)."""

    x0: float
    y0: float
    px: float
    shape: tuple[int, int]


def region_params(tissue_type: str, params: RegionParams | dict | None = None) -> RegionParams:
    """The ``regions`` section for ``tissue_type``: ``params`` (a RegionParams; a mapping, such as
    run.json's ``workflow.regions``, is built by :func:`histo.config.build`; None: the defaults) with
    ``structures`` filled in from TISSUE_DEFAULTS where it is None."""
    if tissue_type not in TISSUE_TYPES:
        raise HistoError(None, f"tissue type must be one of {', '.join(TISSUE_TYPES)}, got {tissue_type!r}")
    if params is None:
        params = RegionParams()
    elif isinstance(params, dict):
        params = build(RegionParams, params, "regions", "<region parameters>")
    if params.structures is None:
        params = params.replace(structures=list(TISSUE_DEFAULTS[tissue_type]["structures"]))
    return params


def lymphoid_cell_types(tissue_type: str, params: RegionParams | dict | None = None) -> tuple[str, ...]:
    """The cell types the tissue's lymphoid structures (lymph node: follicles; synovium: aggregates)
    are made of, per ``region_params(tissue_type, params)``."""
    p = region_params(tissue_type, params)
    return tuple((p.follicle if tissue_type == "lymph-node" else p.aggregate).cell_types)


def used_cell_types(params: RegionParams, tissue_type: str) -> dict[str, list]:
    """The ``<section>.cell_types`` lists read by the wanted ``structures`` of ``params`` (a
    :func:`region_params` result), by section: follicles read their own and the germinal centres'
    (the fill), synovium always the aggregates' (the infiltrate score)."""
    want = set(params.structures)
    sections = {"follicle"} & want
    if want & {"follicle", "germinal_centre"}:
        sections.add("germinal_centre")
    if "aggregate" in want or tissue_type == "synovium":
        sections.add("aggregate")
    return {s: list(getattr(params, s).cell_types) for s in sorted(sections)}


# ----------------------------------------------------------------------------------- rasters


def piece_grid(piece: Polygon, px: float) -> tuple[Grid, np.ndarray]:
    """A grid over the piece's bounding box and its tissue mask (pixel centres inside the piece)."""
    x0, y0, x1, y1 = piece.bounds
    px = max(px, float(np.sqrt((x1 - x0) * (y1 - y0) / MAX_GRID_PX)))
    shape = (max(1, int(np.ceil((y1 - y0) / px))), max(1, int(np.ceil((x1 - x0) / px))))
    grid = Grid(x0, y0, px, shape)
    cx = x0 + (np.arange(shape[1]) + 0.5) * px
    cy = y0 + (np.arange(shape[0]) + 0.5) * px
    return grid, shapely.contains_xy(piece, cx[None, :], cy[:, None])


def grid_counts(grid: Grid, x, y) -> np.ndarray:
    """Number of points (µm) per pixel, float32."""
    c = np.floor((np.asarray(x) - grid.x0) / grid.px).astype(np.int64)
    r = np.floor((np.asarray(y) - grid.y0) / grid.px).astype(np.int64)
    h, w = grid.shape
    ok = (c >= 0) & (c < w) & (r >= 0) & (r < h)
    return np.bincount(r[ok] * w + c[ok], minlength=h * w).reshape(h, w).astype(np.float32)


def smooth_density(counts: np.ndarray, mask: np.ndarray, grid: Grid, sigma_um: float) -> np.ndarray:
    """Gaussian-smoothed density (per µm²) over tissue only: the kernel is renormalised by the tissue it
    covers, so the tissue edge does not dilute it. 0 outside the mask."""
    s = sigma_um / grid.px
    num = ndi.gaussian_filter(np.where(mask, counts, 0).astype(np.float32), s, mode="constant")
    den = ndi.gaussian_filter(mask.astype(np.float32), s, mode="constant")
    return np.where(mask, num / np.maximum(den, 1e-6), 0) / grid.px**2


def disc_sum(counts: np.ndarray, radius_px: float) -> np.ndarray:
    """Sum of ``counts`` within a disc of ``radius_px`` around every pixel (FFT convolution)."""
    r = int(np.ceil(radius_px))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.maximum(fftconvolve(counts, (xx**2 + yy**2 <= radius_px**2).astype(np.float32), mode="same"), 0)


def mask_polygons(mask: np.ndarray, grid: Grid) -> list[Polygon]:
    """Polygons (µm) of a mask's 8-connected components (holes kept), simplified to half a pixel."""
    lab, _ = ndi.label(mask, np.ones((3, 3), bool))
    out = []
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        sub = np.pad(lab[sl] == i, 1).astype(np.uint8)
        rings = [Polygon(c[:, ::-1]) for c in find_contours(sub, 0.5) if len(c) >= 4]
        if not rings:
            continue
        geom = reduce(lambda a, b: a.symmetric_difference(b), rings)
        offset = np.array([sl[1].start - 0.5, sl[0].start - 0.5])
        geom = shapely.transform(geom, lambda xy, offset=offset: (xy + offset) * grid.px + (grid.x0, grid.y0))
        geom = shapely.make_valid(geom).simplify(grid.px / 2, preserve_topology=True)
        out += [p for p in shapely.get_parts(geom) if isinstance(p, Polygon) and p.area > 0]
    return out


# ----------------------------------------------------------------------------------- structures


def find_follicles(cells: pd.DataFrame, piece: Polygon, params: RegionParams, log: list | None = None) -> list[Polygon]:
    """Lymph-node follicles in one tissue piece (§7.4b [P]).

    A pixel is dense where the density of the follicle cells (``follicle.cell_types``, Gaussian of
    FWHM ``smooth_fwhm_um``) is ≥ ``min_cells_per_mm2`` (an absolute floor: a slide without lymphoid
    tissue has none) and ≥ ``min_density_ratio`` × the piece's median (H&E: small lymphocytes; the
    paracortex dominates a node), or, with ``min_cell_fraction`` set, where they are ≥ that fraction
    of all nuclei (gated B cells). A pixel is follicular where it is dense or where the density of
    germinal-centre cells (``germinal_centre.cell_types``) is ≥ ``large_density_ratio`` × its median
    (a germinal centre inside the mantle ring). Rings are closed and their germinal-centre holes filled
    (:func:`germinal_holes`; paracortex enclosed by a ring of follicles stays out), touching follicles split
    by a distance watershed, outlines opened by ``open_um``; kept: ≥ ``min_area_um2`` with
    ≥ ``min_dense_fraction`` dense, ≥ ``min_cells`` follicle cells and their mean density ≥
    ``min_cells_per_mm2``. ``log``, a list, receives one dict per candidate: its numbers and why it
    was kept or dropped.
    """
    p = params.follicle
    grid, mask = piece_grid(piece, params.grid_um)
    lym = cells[cells.cell_type.isin(p.cell_types)]
    large = cells[cells.cell_type.isin(params.germinal_centre.cell_types)]
    sigma = p.smooth_fwhm_um / 2.3548
    n_all, n_large = grid_counts(grid, cells.x_um, cells.y_um), grid_counts(grid, large.x_um, large.y_um)
    dl = smooth_density(grid_counts(grid, lym.x_um, lym.y_um), mask, grid, sigma)
    dL = smooth_density(n_large, mask, grid, sigma)
    ml, mL = np.median(dl[mask]) if mask.any() else 0.0, np.median(dL[mask]) if mask.any() else 0.0
    floor = p.min_cells_per_mm2 / 1e6  # per µm²
    if p.min_cell_fraction is not None:
        d_all = smooth_density(n_all, mask, grid, sigma)
        dense = mask & (dl > 0) & (dl >= p.min_cell_fraction * d_all)
    elif ml > 0:
        dense = mask & (dl >= p.min_density_ratio * ml)
    else:
        return []
    dense &= dl >= floor
    m = dense | (mask & (dL >= p.large_density_ratio * mL) if mL > 0 else dense)
    m = ndi.binary_closing(m, disk(max(1, round(p.close_um / grid.px)))) & mask
    m |= germinal_holes(m, n_all, n_large, grid, params.germinal_centre) & mask
    dist = ndi.distance_transform_edt(m)
    split = p.split_um / grid.px
    peaks = peak_local_max(
        dist, min_distance=max(1, int(split)), threshold_abs=split / 2, labels=ndi.label(m)[0], exclude_border=False
    )
    markers = np.zeros(m.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    lab = watershed(-dist, markers, mask=m)
    idx = np.arange(1, lab.max() + 1)
    dense_frac = ndi.mean(dense, lab, idx) if len(idx) else np.zeros(0)
    out = []
    lxy = lym[["x_um", "y_um"]].to_numpy(np.float64)
    for i, frac in zip(idx, dense_frac):
        for g in mask_polygons(lab == i, grid):
            g = g.buffer(-p.open_um, quad_segs=4).buffer(p.open_um, quad_segs=4)
            parts = [q for q in shapely.get_parts(g) if isinstance(q, Polygon) and q.area > 0]  # opening can empty it
            if not parts:
                continue
            best = max(parts, key=lambda q: q.area)
            near = lxy[_in_box(lxy, best.bounds)]
            n = int(shapely.contains_xy(best, near[:, 0], near[:, 1]).sum())
            density = n / best.area * 1e6
            failed = [
                name
                for name, ok in (
                    ("dense_fraction", frac >= p.min_dense_fraction),
                    ("area", best.area >= p.min_area_um2),
                    ("cells", n >= p.min_cells),
                    ("density", density >= p.min_cells_per_mm2),
                )
                if not ok
            ]
            reason = failed[0] if failed else "kept"
            if log is not None:
                c = best.centroid
                log.append(
                    {
                        "kind": "follicle",
                        "x_um": round(c.x, 1),
                        "y_um": round(c.y, 1),
                        "area_um2": round(best.area, 1),
                        "dense_fraction": round(float(frac), 3),
                        "n_cells": n,
                        "cells_per_mm2": round(density, 1),
                        "result": reason,
                    }
                )
            if reason == "kept":
                out.append(best)
    return out


def germinal_holes(
    m: np.ndarray, n_all: np.ndarray, n_large: np.ndarray, grid: Grid, gc: GerminalCentreParams
) -> np.ndarray:
    """The holes of the follicle mask ``m`` that belong to a follicle: those smaller than the smallest
    germinal centre (``gc.min_area_um2``) and those where ≥ ``gc.edge_large_fraction`` of the nuclei
    are large/pale (the fraction at which a GC's outline lies, §7.4); ``n_all`` and ``n_large`` count
    the nuclei and the germinal-centre cells per grid pixel (:func:`grid_counts`). A mantle ring
    encloses its germinal centre; a ring of crowded follicles encloses paracortex (few large cells),
    which is no follicle: filling every hole made such a ring one round blob that the watershed could
    not split (a generated 0.29 mm² node: its five follicles became one "follicle" over 55 % of the
    tissue)."""
    holes = ndi.binary_fill_holes(m) & ~m
    lab, n = ndi.label(holes)
    if not n:
        return holes
    idx = np.arange(1, n + 1)
    area = ndi.sum(np.ones_like(holes, np.float32), lab, idx) * grid.px**2
    in_all, in_large = ndi.sum(n_all, lab, idx), ndi.sum(n_large, lab, idx)
    keep = (area < gc.min_area_um2) | (in_large >= gc.edge_large_fraction * np.maximum(in_all, 1))
    return np.concatenate([[False], keep])[lab]


def find_germinal_centres(
    cells: pd.DataFrame, piece: Polygon, hosts: list[Polygon], params: RegionParams
) -> list[tuple[int, Polygon]]:
    """Germinal centres inside ``hosts`` (follicles or aggregates) of one piece, as (host index, polygon).

    §7.4: where ≥ ``min_large_fraction`` of the nuclei within ``radius_um`` are large/pale (of
    ``germinal_centre.cell_types``); the outline
    follows the fraction down to ``edge_large_fraction`` (hysteresis); ≥ ``min_area_um2`` and
    ≥ ``min_inside_fraction`` inside one host; clipped to it.
    """
    if not hosts:
        return []
    p = params.germinal_centre
    grid, mask = piece_grid(piece, params.grid_um)
    large = cells[cells.cell_type.isin(p.cell_types)]
    n_all = disc_sum(grid_counts(grid, cells.x_um, cells.y_um), p.radius_um / grid.px)
    frac = disc_sum(grid_counts(grid, large.x_um, large.y_um), p.radius_um / grid.px) / np.maximum(n_all, 1e-9)
    gc = apply_hysteresis_threshold(np.where(mask, frac, 0), p.edge_large_fraction, p.min_large_fraction)
    out = []
    for poly in mask_polygons(gc, grid):
        inside = [poly.intersection(h).area / poly.area for h in hosts]
        k = int(np.argmax(inside))
        clipped = shapely.make_valid(poly.intersection(hosts[k]))
        parts = [g for g in shapely.get_parts(clipped) if isinstance(g, Polygon)]
        if inside[k] >= p.min_inside_fraction and parts:
            best = max(parts, key=lambda g: g.area)
            if best.area >= p.min_area_um2:
                out.append((k, best))
    return out


def mantle_thickness(follicle: Polygon, gcs: list[Polygon], step_um: float = 2.0) -> float:
    """Median distance (µm) from the follicle outline to its germinal centre(s) (§7.4); NaN without one."""
    if not gcs:
        return float("nan")
    ring = follicle.exterior
    pts = shapely.line_interpolate_point(ring, np.arange(0, ring.length, step_um))
    return float(np.median(shapely.distance(pts, shapely.union_all(gcs))))


def edge_truncated(geom, piece: Polygon, edge_um: float) -> bool:
    """True when a structure comes within ``edge_um`` of its piece's outline (a cut may have halved it, §0)."""
    return bool(shapely.distance(geom, piece.exterior) < edge_um)


# ----------------------------------------------------------------------------------- tables


def _frame(rows: list[dict]) -> gpd.GeoDataFrame:
    """Region rows → GeoDataFrame with ids numbered per kind by (tissue, centroid y, centroid x)."""
    cols = ["region_id", "kind", "name", "parent_id", "tissue_id", "area_um2", "edge_truncated"]
    if not rows:
        return gpd.GeoDataFrame({c: pd.Series(dtype=object) for c in cols}, geometry=gpd.GeoSeries([]))
    df = gpd.GeoDataFrame(rows, geometry="geometry")
    return df[cols + [c for c in df.columns if c not in cols and c != "geometry"] + ["geometry"]]


def _numbered(rows: list[dict], kind: str) -> list[dict]:
    """Rows of one kind with their ``region_id`` in a stable order: tissue piece, centroid y, centroid x."""

    def key(r):
        c = r["geometry"].centroid
        return (int(r["tissue_id"].rsplit("-", 1)[1]), round(c.y, 3), round(c.x, 3))

    rows = sorted(rows, key=key)
    for i, r in enumerate(rows, 1):
        r["region_id"] = f"{kind}-{i}"
        r["kind"] = kind
        r.setdefault("name", kind)
        r["area_um2"] = float(r["geometry"].area)
    return rows


def find_regions(
    cells: pd.DataFrame, pieces: list[Polygon], tissue_type: str, params: RegionParams | dict | None = None
) -> gpd.GeoDataFrame:
    """All regions of a slide from its cells table and tissue pieces.

    Parameters
    ----------
    cells : pandas.DataFrame
        One row per nucleus: ``x_um``, ``y_um`` (µm, level-0 origin) and ``cell_type``.
    pieces : list of shapely.Polygon
        The tissue pieces, in µm (histo.segment.tissue).
    tissue_type : str
        ``lymph-node`` or ``synovium`` (:data:`TISSUE_TYPES`): the structures looked for by default.
    params : RegionParams or dict, optional
        The workflow's ``regions`` section (a mapping is built by :func:`region_params`); None: the
        defaults. Its ``structures`` say what to look for (lymph node: follicles and their germinal
        centres; synovium: graded aggregates, germinal centres in them, lining).

    Returns
    -------
    geopandas.GeoDataFrame
        One row per region (µm; columns in the module docstring): the tissue pieces first, then
        follicles, aggregates, germinal centres and lining. ``attrs["candidates"]`` lists every
        follicle candidate and why it was kept or dropped. A slide without lymphocytes gives no
        follicles or aggregates.
    """
    params = region_params(tissue_type, params)
    want = set(params.structures)
    tissue = [
        dict(
            region_id=f"tissue-{i}",
            kind="tissue",
            name="tissue",
            parent_id=None,
            tissue_id=f"tissue-{i}",
            area_um2=float(p.area),
            edge_truncated=False,
            geometry=p,
        )
        for i, p in enumerate(pieces, 1)
    ]
    xy = cells[["x_um", "y_um"]].to_numpy(np.float64)
    hosts, gcs, lining, log = [], [], [], []
    for t in tissue:
        piece, tid = t["geometry"], t["region_id"]
        bx = _in_box(xy, piece.bounds)
        sub = cells[bx][shapely.contains_xy(piece, xy[bx, 0], xy[bx, 1])]
        found = []
        if "follicle" in want:
            found += [dict(kind="follicle", geometry=g) for g in find_follicles(sub, piece, params, log)]
        if "aggregate" in want:
            found += [dict(kind="aggregate", **a) for a in find_aggregates(sub, piece, params)]
        for f in found:  # has_gc unknown (None) where germinal centres are not looked for
            f.update(
                tissue_id=tid,
                parent_id=tid,
                has_gc=False if "germinal_centre" in want else None,
                edge_truncated=edge_truncated(f["geometry"], piece, params.edge_um),
            )
        if "germinal_centre" in want:
            centres = find_germinal_centres(sub, piece, [f["geometry"] for f in found], params)
            gcs += [dict(tissue_id=tid, geometry=g, _host=found[k]) for k, g in centres]
        if "lining" in want:
            lining += [
                dict(tissue_id=tid, parent_id=tid, edge_truncated=False, **r) for r in find_lining(sub, piece, params)
            ]
        hosts += found
    rows = list(tissue)
    for kind in ("follicle", "aggregate"):
        rows += _numbered([h for h in hosts if h["kind"] == kind], kind)
    for g in _numbered(gcs, "germinal_centre"):
        host = g.pop("_host")
        host["has_gc"] = True
        g.update(
            parent_id=host["region_id"],
            edge_truncated=host["edge_truncated"],
            fraction_host_area=g["area_um2"] / host["area_um2"],
        )
        rows.append(g)
    for h in hosts:
        if h["kind"] == "follicle":
            inner = [g["geometry"] for g in gcs if g["parent_id"] == h["region_id"]]
            h["mantle_thickness_um"] = mantle_thickness(h["geometry"], inner)
    out = _frame(rows + _numbered(lining, "lining"))
    out.attrs["candidates"] = log
    return out


def _in_box(xy: np.ndarray, bounds) -> np.ndarray:
    x0, y0, x1, y1 = bounds
    return (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)


def assign_cells(cells: pd.DataFrame, regions: gpd.GeoDataFrame) -> pd.DataFrame:
    """``<kind>_id`` columns (categorical region ids, missing where none) for every kind in KINDS.

    A cell outside every tissue piece gets no id of any kind, so it counts in no region's metrics
    (a nucleus segmented over glass at the tissue edge, or inside an annotation drawn past the
    tissue). Vectorised point-in-polygon: cells are sorted by x once, each region tests only the
    cells in its bounding box (``shapely.contains_xy`` on the prepared polygon). Where regions of one
    kind overlap (annotations), the first in table order wins.
    """
    x = cells["x_um"].to_numpy(np.float64)
    y = cells["y_um"].to_numpy(np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    in_tissue = None
    out = {}
    for kind in KINDS:  # "tissue" first
        sel = regions[regions.kind == kind] if len(regions) else regions
        codes = np.full(len(x), -1, np.int32)
        for k, geom in enumerate(sel.geometry):
            x0, y0, x1, y1 = geom.bounds
            cand = order[np.searchsorted(xs, x0, "left") : np.searchsorted(xs, x1, "right")]
            cand = cand[(y[cand] >= y0) & (y[cand] <= y1) & (codes[cand] < 0)]
            if in_tissue is not None:
                cand = cand[in_tissue[cand]]
            codes[cand[shapely.contains_xy(geom, x[cand], y[cand])]] = k
        if kind == "tissue":
            in_tissue = codes >= 0
        out[f"{kind}_id"] = pd.Categorical.from_codes(codes, categories=list(sel.region_id) if len(sel) else [])
    return pd.DataFrame(out, index=cells.index)
