"""Per-region metric table: one row per region plus one ``slide`` row (DOMAIN §4).

Column names carry their units (``_um``, ``_um2``, ``_mm``, ``_mm2``, ``_per_mm2``, ``_per_100um``);
``n_`` columns are counts, ``fraction_`` columns are 0–1. Synovium tissue and slide rows get
Krenn-like sub-scores (§1, §7.5–7.7), their sum and band, and the H&E pathotype proxy (§7.9).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import shapely

from histo.structures.lining import krenn_lining
from histo.structures.regions import KINDS, RegionParams, ScoreParams, assign_cells, region_params

CELL_TYPES = ("lymphocyte", "large", "stromal", "epithelial", "lining", "other")
KRENN_VERSION = "2006"  # §1: sum bands 0–1 none, 2–4 low, 5–9 high (Krenn 2006 Histopathology 49:358)


def krenn_band(total: float) -> str:
    """Krenn 2006 band of a sum 0–9 (§1)."""
    return "none" if total <= 1 else "low-grade" if total <= 4 else "high-grade"


def stroma_grade(density_per_mm2: float, bands_per_mm2: list) -> int:
    """Stroma sub-score 0–3 from sublining nuclear density outside aggregates and lining: the number
    of ``bands_per_mm2`` (§7.6 [P]: 1,500 / 3,400 / 6,000 nuclei/mm²) it reaches."""
    return int(np.searchsorted(np.asarray(bands_per_mm2, float), density_per_mm2, side="right"))


def infiltrate_grade(
    grades, has_gc: bool, lymphocytes_per_mm2: float, lymphoid_fraction: float, scores: ScoreParams
) -> int:
    """Infiltrate sub-score 0–3 (§7.7 [P]): 3 = a grade-3 aggregate, a germinal centre or lymphoid
    area > ``lymphoid_area_fraction`` (25 %); 2 = any grade-2 aggregate; 1 = grade-1 aggregates only
    or ≥ ``min_lymphocytes_per_mm2`` (200); 0 = no clusters and fewer lymphocytes."""
    top = max(grades, default=0)
    if top >= 3 or has_gc or lymphoid_fraction > scores.lymphoid_area_fraction:
        return 3
    if top == 2:
        return 2
    return int(top == 1 or lymphocytes_per_mm2 >= scores.min_lymphocytes_per_mm2)


def pathotype_proxy(grades, infiltrate: int, stroma: int) -> str:
    """H&E proxy (§7.9 [P]) — not a Humby/PEAC pathotype, which needs CD20/CD68/CD138 IHC (§1):
    ``lymphoid`` if any aggregate is grade ≥ 2, ``pauci-immune`` if infiltrate and stroma ≤ 1,
    else ``diffuse``."""
    if max(grades, default=0) >= 2:
        return "lymphoid"
    return "pauci-immune" if infiltrate <= 1 and stroma <= 1 else "diffuse"


def _counts(cells: pd.DataFrame, ids: pd.Categorical, types: list[str]) -> pd.DataFrame:
    """Cells per (region, type) for one kind's id column; index = region ids."""
    t = pd.Categorical(cells["cell_type"].astype(str), categories=types).codes.astype(np.int64)
    codes = np.asarray(ids.codes, np.int64)
    ok = (codes >= 0) & (t >= 0)
    m = np.bincount(codes[ok] * len(types) + t[ok], minlength=len(ids.categories) * len(types))
    return pd.DataFrame(m.reshape(len(ids.categories), len(types)), index=list(ids.categories), columns=types)


def type_column(cell_type: str) -> str:
    """A cell type as metric column names spell it: lower case, other characters ``_`` ("B cell" → "b_cell")."""
    return re.sub(r"[^0-9a-z]+", "_", str(cell_type).lower()).strip("_")


def _cell_columns(n: pd.DataFrame, area_um2: np.ndarray) -> pd.DataFrame:
    """n_cells, n_<type>, density_*_per_mm2, fraction_<type> from a count table (rows = regions;
    types spelt by :func:`type_column`)."""
    total = n.sum(1).to_numpy()
    mm2 = np.asarray(area_um2, float) / 1e6
    out = {"n_cells": total}
    out |= {f"n_{type_column(t)}": n[t].to_numpy() for t in n.columns}
    with np.errstate(divide="ignore", invalid="ignore"):
        out["density_cells_per_mm2"] = total / mm2
        out |= {f"density_{type_column(t)}_per_mm2": n[t].to_numpy() / mm2 for t in n.columns}
        out |= {f"fraction_{type_column(t)}": n[t].to_numpy() / total for t in n.columns}
    return pd.DataFrame(out, index=n.index)


def _structures(kind: str, rows: pd.DataFrame, tissue_mm2: float) -> dict:
    """Counts per mm² of tissue, area fraction and size distribution of one structure kind."""
    area = rows["area_um2"].to_numpy(float)
    d = 2 * np.sqrt(area / np.pi)
    q = lambda v, p: float(np.percentile(v, p)) if len(v) else np.nan  # noqa: E731
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            f"n_{kind}s": len(rows),
            f"{kind}s_per_mm2": len(rows) / tissue_mm2,
            f"fraction_area_{kind}": area.sum() / 1e6 / tissue_mm2,
            f"{kind}_area_median_um2": q(area, 50),
            f"{kind}_area_p90_um2": q(area, 90),
            f"{kind}_eq_diameter_median_um": q(d, 50),
            f"{kind}_eq_diameter_p90_um": q(d, 90),
            f"n_{kind}s_edge_truncated": int(rows["edge_truncated"].astype(bool).sum()),
        }


def _summary(
    regions: pd.DataFrame,
    tissue_ids,
    cells_n: pd.Series,
    n_lym: float,
    n_total: float,
    tissue_mm2: float,
    tissue_type: str,
    params: RegionParams,
) -> dict:
    """Structure and score columns of a tissue piece or of the whole slide (``tissue_ids``);
    germinal-centre columns are NaN where ``params`` did not look for them."""
    scores = params.scores
    tissue_mm2 = np.float64(tissue_mm2)  # 0 mm² gives NaN rates (silently), not ZeroDivisionError
    inside = regions[regions.tissue_id.isin(tissue_ids)]
    by = {k: inside[inside.kind == k] for k in KINDS}
    out = {}
    if tissue_type == "lymph-node":
        fol = by["follicle"]
        out |= _structures("follicle", fol, tissue_mm2)
        searched = "germinal_centre" in params.structures
        out["n_follicles_with_gc"] = (
            int(fol.get("has_gc", pd.Series(dtype=bool)).astype(bool).sum()) if searched else np.nan
        )
        out["fraction_area_germinal_centre"] = (
            by["germinal_centre"].area_um2.sum() / 1e6 / tissue_mm2 if searched else np.nan
        )
        return out
    agg = by["aggregate"]
    grades = [int(g) for g in agg.get("grade", pd.Series(dtype=float)).dropna()]
    out |= _structures("aggregate", agg, tissue_mm2)
    for g in (1, 2, 3):
        out[f"n_aggregates_grade{g}"] = grades.count(g)
        out[f"aggregates_grade{g}_per_mm2"] = grades.count(g) / tissue_mm2 if tissue_mm2 else np.nan
    out["n_els"] = sum(g >= 2 for g in grades)  # ectopic lymphoid structures = grade ≥ 2 (§2)
    out["max_aggregate_grade"] = max(grades, default=0)
    lin = by["lining"]
    length = lin.get("length_um", pd.Series(dtype=float)).to_numpy(float)
    layers = lin.get("layers_median", pd.Series(dtype=float)).to_numpy(float)
    out["lining_length_mm"] = length.sum() / 1e3
    out["lining_layers_median"] = _weighted_median(layers, length)
    lymphoid_um2 = agg.area_um2.sum()
    excluded = agg.region_id.tolist() + lin.region_id.tolist()
    stroma_um2 = tissue_mm2 * 1e6 - lymphoid_um2 - lin.area_um2.sum()
    stroma_n = n_total - cells_n.reindex(excluded).fillna(0).sum()
    out["stroma_density_per_mm2"] = stroma_n / (stroma_um2 / 1e6) if stroma_um2 > 0 else np.nan
    lym_per_mm2 = n_lym / tissue_mm2 if tissue_mm2 else 0.0
    lymphoid = lymphoid_um2 / 1e6 / tissue_mm2 if tissue_mm2 else 0.0
    sub = dict(
        krenn_lining=krenn_lining(out["lining_layers_median"]) if len(lin) else 0,
        krenn_stroma=stroma_grade(out["stroma_density_per_mm2"], scores.stroma_bands_per_mm2) if stroma_um2 > 0 else 0,
        krenn_infiltrate=infiltrate_grade(grades, bool(len(by["germinal_centre"])), lym_per_mm2, lymphoid, scores),
    )
    total = sum(sub.values())
    return (
        out
        | sub
        | dict(
            krenn_sum=total,
            krenn_band=krenn_band(total),
            krenn_version=KRENN_VERSION,
            pathotype_proxy_he=pathotype_proxy(grades, sub["krenn_infiltrate"], sub["krenn_stroma"]),
        )
    )


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    if len(values) == 0:
        return np.nan
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def region_metrics(
    cells: pd.DataFrame, regions: pd.DataFrame, tissue_type: str, params: RegionParams | dict | None = None
) -> pd.DataFrame:
    """One row per region and a final ``slide`` row (all tissue pieces together).

    ``cells`` needs ``x_um``, ``y_um``, ``cell_type`` (counted per type: its categories if categorical,
    else :data:`CELL_TYPES`, plus any other values) and, if present, the ``<kind>_id`` columns
    of :func:`histo.structures.regions.assign_cells` (computed here otherwise). Region properties (grade,
    layers, has_gc, …) are carried over; cell counts, densities and fractions are added per region;
    tissue and slide rows add structure counts per mm², area fractions, size distributions, and for
    synovium the Krenn sub-scores, sum, band, version and H&E pathotype proxy (lymphocytes: the cells
    of ``aggregate.cell_types``); the slide row adds ``sampling_flag`` (tissue < 2.5 mm², §7.8).
    Thresholds: ``params.scores`` (``region_params``).
    """
    params = region_params(tissue_type, params)
    scores = params.scores
    ids = cells if all(f"{k}_id" in cells for k in KINDS) else assign_cells(cells, regions)
    listed = (
        list(cells["cell_type"].cat.categories)
        if isinstance(cells["cell_type"].dtype, pd.CategoricalDtype)
        else list(CELL_TYPES)
    )  # the typing's categories (H&E rules, gates), else the generator's words
    types = listed + sorted(set(cells["cell_type"].astype(str)) - set(listed))
    per_kind = [_counts(cells, pd.Categorical(ids[f"{k}_id"]), types) for k in KINDS]
    n = pd.concat(per_kind) if per_kind else pd.DataFrame(columns=types)
    n = n.reindex(list(regions.region_id)).fillna(0).astype(int)
    table = pd.DataFrame(regions.drop(columns="geometry")).reset_index(drop=True)
    table.insert(table.columns.get_loc("area_um2") + 1, "area_mm2", table["area_um2"] / 1e6)
    geoms = list(regions.geometry)
    table["eq_diameter_um"] = 2 * np.sqrt(table["area_um2"].to_numpy(float) / np.pi)
    perim = np.array([g.length for g in geoms]) if geoms else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["circularity"] = 4 * np.pi * table["area_um2"].to_numpy(float) / perim**2
    cellcols = _cell_columns(n, table["area_um2"].to_numpy(float)).reset_index(drop=True)
    table = pd.concat([table, cellcols], axis=1)
    lining = table.kind == "lining"
    if lining.any():
        table.loc[lining, "lining_nuclei_per_100um"] = (
            table.loc[lining, "n_cells"] / table.loc[lining, "length_um"] * 100
        )
    lin_geoms = [g for g, k in zip(geoms, table.kind) if k == "lining"]
    if lin_geoms and tissue_type == "synovium":
        near = shapely.union_all(lin_geoms)
        agg = (table.kind == "aggregate").to_numpy()
        table.loc[agg, "distance_to_lining_um"] = [shapely.distance(g, near) for g, a in zip(geoms, agg) if a]
    tissue_rows = table.index[table.kind == "tissue"]
    totals = n.sum(1)
    lymphoid = n.reindex(columns=params.aggregate.cell_types, fill_value=0).sum(1)
    extras = [
        _summary(regions, [rid], totals, lymphoid[rid], totals[rid], mm2, tissue_type, params)
        for rid, mm2 in zip(table.region_id[tissue_rows], table.area_mm2[tissue_rows])
    ]
    for col, values in pd.DataFrame(extras, index=tissue_rows).items():  # krenn_lining is also a lining column
        table.loc[tissue_rows, col] = values
    slide_n = n.loc[table.region_id[tissue_rows]].sum() if len(tissue_rows) else pd.Series(0, index=types)
    slide_um2 = float(table.loc[tissue_rows, "area_um2"].sum())
    with np.errstate(divide="ignore", invalid="ignore"):  # no tissue: NaN rates
        slide = dict(
            region_id="slide",
            kind="slide",
            name="slide",
            area_um2=slide_um2,
            area_mm2=slide_um2 / 1e6,
            **_cell_columns(slide_n.to_frame().T, [slide_um2]).iloc[0].to_dict(),
            **_summary(
                regions,
                list(table.region_id[tissue_rows]),
                totals,
                lymphoid[table.region_id[tissue_rows]].sum(),
                slide_n.sum(),
                slide_um2 / 1e6,
                tissue_type,
                params,
            ),
            n_tissue_pieces=len(tissue_rows),
            sampling_flag=bool(slide_um2 < scores.min_tissue_um2),
        )
    row = pd.DataFrame([slide])
    if table.empty:  # no tissue: the slide row alone, with the table's columns (concat warns on empty frames)
        return row.reindex(columns=[*table.columns, *row.columns.difference(table.columns, sort=False)])
    return pd.concat([table, row], ignore_index=True)
