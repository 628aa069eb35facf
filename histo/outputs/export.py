"""Bundle files from tables: ``regions.geojson`` (QuPath annotations),
``metrics.csv`` / ``metrics.parquet`` and ``cells.h5ad`` (AnnData for scanpy / squidpy).

QuPath GeoJSON (0.4+, as QuPath's ``PathObjectTypeAdapters`` reads it): a FeatureCollection; each
Feature has an ``id`` (a UUID: QuPath keeps it as the object's id) and a geometry in level-0 pixels (origin
top-left); its properties hold ``objectType``, ``name``, ``classification`` {``name``, ``color``},
``measurements`` (a flat name → number map) and ``metadata`` (a flat name → string map, which QuPath
keeps through a round trip: histo's ids); other properties are ignored by QuPath and carry histo's ids
again (for readers of the bundle) and the µm geometry. Written with ``json``: QuPath's layout is a
handful of keys, and no maintained Python package writes it.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from shapely.geometry import mapping

from histo.io.bundle import ID_COLUMNS

KIND_COLORS = {  # QuPath classification colours, RGB 0–255
    "tissue": (120, 120, 120),
    "follicle": (31, 119, 180),
    "germinal_centre": (23, 190, 207),
    "aggregate": (214, 39, 40),
    "lining": (199, 21, 133),
    "annotation": (148, 103, 189),
}
NOT_FEATURES = ("cell_id", "x_um", "y_um", "label")  # numeric cell columns that are not features
# namespace of the features' UUIDs: a region's id is uuid5(ID_NAMESPACE, region_id), a nucleus's
# uuid5(ID_NAMESPACE, "cell:<cell_id>"): the same on every run and after a review
ID_NAMESPACE = uuid.UUID("6f1d2b0e-5c1a-4f3e-9a57-1e0f2c7d9b41")
UNITS = {"_um": "µm", "_um2": "µm²", "_od": "optical density"}  # cells.h5ad uns["units"], by column suffix


def _number(value) -> float | None:
    """A JSON-safe number, or None (strings, missing values)."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value)):
        return float(value)
    return None


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def regions_geojson(regions: gpd.GeoDataFrame, mpp: float, metrics: pd.DataFrame | None = None) -> dict:
    """A QuPath-readable FeatureCollection of ``regions`` (µm) on a slide of ``mpp`` µm/px.

    ``measurements`` hold every numeric region property (booleans as 0/1) and, with ``metrics``
    (from :func:`histo.structures.metrics.region_metrics`), that region's row; ``geometry_um`` is the µm
    geometry as WKT. Geometries are made valid before writing.
    """
    rows = metrics.set_index("region_id") if metrics is not None else None
    features = []
    for rec in regions.to_dict("records"):
        geom = shapely.make_valid(rec.pop("geometry"))
        px = shapely.set_precision(shapely.transform(geom, lambda xy: xy / mpp), 0.01)
        values = {
            **rec,
            **(rows.loc[rec["region_id"]].to_dict() if rows is not None and rec["region_id"] in rows.index else {}),
        }
        measurements = {
            k: v for k, v in ((k, _number(v)) for k, v in values.items() if k not in ID_COLUMNS) if v is not None
        }
        kind = rec["kind"]
        ids = {
            k: v
            for k, v in (
                ("region_id", rec["region_id"]),
                ("kind", kind),
                ("parent_id", _text(rec.get("parent_id"))),
                ("tissue_id", _text(rec.get("tissue_id"))),
            )
            if v is not None
        }
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(ID_NAMESPACE, rec["region_id"])),
                "geometry": mapping(px),
                "properties": {
                    "objectType": "annotation",
                    "name": rec["name"] if kind == "annotation" else rec["region_id"],
                    "classification": {"name": kind, "color": list(KIND_COLORS.get(kind, (0, 0, 0)))},
                    "isLocked": kind != "annotation",
                    "kind": kind,
                    "region_id": rec["region_id"],
                    "parent_id": _text(rec.get("parent_id")),
                    "tissue_id": _text(rec.get("tissue_id")),
                    "measurements": measurements,
                    "metadata": ids,
                    "geometry_um": shapely.to_wkt(
                        shapely.set_precision(geom, 0.01), rounding_precision=2
                    ),  # valid once rounded
                },
            }
        )
    return {"type": "FeatureCollection", "properties": {"units": "level-0 px", "mpp": mpp}, "features": features}


def write_regions_geojson(
    regions: gpd.GeoDataFrame, path: str | Path, mpp: float, metrics: pd.DataFrame | None = None
) -> Path:
    """Write :func:`regions_geojson` to ``path`` (UTF-8 JSON)."""
    path = Path(path)
    text = json.dumps(regions_geojson(regions, mpp, metrics), ensure_ascii=False, separators=(",", ":"))
    path.write_text(text, encoding="utf-8")
    return path


def cells_geojson(cells: pd.DataFrame, mpp: float, colors: dict[str, str] | None = None) -> dict:
    """The nuclei of ``cells`` (``cells.parquet``: WKB polygons in µm) as QuPath detections on a slide of
    ``mpp`` µm/px: ``objectType`` ``detection``, geometry = the nucleus in level-0 px, ``classification`` =
    ``cell_type`` (coloured as in the report: ``colors``, :func:`histo.outputs.report.type_colors`),
    ``measurements`` = the numeric columns (µm, µm², OD; not ids or coordinates), ``metadata`` = ``cell_id``
    and ``label``; ``id`` a UUID from ``cell_id``."""
    numeric = [c for c in cells.columns if c not in NOT_FEATURES and pd.api.types.is_numeric_dtype(cells[c])]
    um = shapely.from_wkb(cells["polygon"].to_numpy())
    px = shapely.set_precision(shapely.transform(um, lambda xy: xy / mpp), 0.01)
    values = cells[numeric].astype(np.float64).to_numpy()
    features = []
    for k, (cell_id, label, kind) in enumerate(zip(cells["cell_id"], cells["label"], cells["cell_type"].astype(str))):
        rgb = (colors or {}).get(kind, "#808080")
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(ID_NAMESPACE, f"cell:{cell_id}")),
                "geometry": mapping(px[k]),
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": kind, "color": [int(rgb[i : i + 2], 16) for i in (1, 3, 5)]},
                    "isLocked": True,
                    "measurements": {n: v for n, v in zip(numeric, values[k]) if math.isfinite(v)},
                    "metadata": {"cell_id": str(cell_id), "label": str(label)},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_cells_geojson(bundle: str | Path, path: str | Path | None = None) -> Path:
    """Write the nuclei of ``bundle`` as QuPath detections (:func:`cells_geojson`) to ``path`` (default
    ``bundle/cells.geojson``): File ▸ Import objects in QuPath, on the same slide."""
    from histo.outputs.report import type_colors  # histo.outputs.report imports this module

    bundle = Path(bundle)
    path = Path(path) if path else bundle / "cells.geojson"
    mpp = json.loads((bundle / "run.json").read_text(encoding="utf-8"))["input"]["mpp"]
    cells = pd.read_parquet(bundle / "cells.parquet")
    data = cells_geojson(cells, mpp, type_colors(cells))
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    return path


def spreadsheet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` for a CSV file: text cells and column names that start with ``= + - @`` (or tab, CR)
    and are not numbers get a leading ``'``, so a spreadsheet shows them instead of running them as
    formulas (CSV injection). Number columns and numeric text (``-0.5``) are left as they are."""

    def cell(value):
        if not (isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r"))):
            return value
        try:
            float(value)
        except ValueError:
            return f"'{value}"
        return value

    out = table.rename(columns=cell)
    for i, dtype in enumerate(table.dtypes):
        if not pd.api.types.is_numeric_dtype(dtype):
            out.isetitem(i, table.iloc[:, i].map(cell))
    return out


def write_metrics(table: pd.DataFrame, folder: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.csv`` (:func:`spreadsheet_safe`) and ``metrics.parquet`` into ``folder``; returns
    both paths."""
    folder = Path(folder)
    csv, parquet = folder / "metrics.csv", folder / "metrics.parquet"
    spreadsheet_safe(table).to_csv(csv, index=False)
    table.to_parquet(parquet, index=False)
    return csv, parquet


def write_h5ad(cells: pd.DataFrame, path: str | Path, uns: dict | None = None) -> Path:
    """Write the cells as AnnData: ``obs`` = the cells table without binary columns (polygons; text
    columns as categoricals, index = ``cell_id``), ``X`` = the numeric feature columns (float32;
    ``var_names`` = their names; not ids, coordinates or labels), ``obsm["spatial"]`` = (x_um, y_um)
    in µm, ``uns`` = ``uns`` with ``uns["histo"]["spatial_units"] = "um"``, the units of the columns
    (``uns["units"]``) and :func:`squidpy_uns` added. Opens in scanpy/squidpy."""
    obs = cells.drop(columns=[c for c in cells.columns if cells[c].dtype == object and _is_bytes(cells[c])])
    for c in obs.columns:
        if obs[c].dtype == object or pd.api.types.is_string_dtype(obs[c]):
            obs[c] = pd.Categorical(obs[c].astype("string"))
    feats = [
        c
        for c in obs.columns
        if c not in NOT_FEATURES and pd.api.types.is_numeric_dtype(obs[c]) and not pd.api.types.is_bool_dtype(obs[c])
    ]
    obs.index = (cells["cell_id"] if "cell_id" in cells else pd.RangeIndex(len(cells))).astype(str).to_numpy()
    uns = {**(uns or {}), "histo": {**(uns or {}).get("histo", {}), "spatial_units": "um"}}
    if "cell_type" in obs:
        from histo.outputs.report import type_colors  # histo.outputs.report imports this module

        uns |= squidpy_uns(obs, type_colors(cells), uns.get("neighbourhood"))
    units = {c: unit for c in obs.columns for end, unit in UNITS.items() if c.endswith(end)}
    uns["units"] = {"spatial": "µm", **units}
    adata = ad.AnnData(
        X=obs[feats].to_numpy(np.float32) if feats else np.zeros((len(obs), 0), np.float32),
        obs=obs,
        var=pd.DataFrame(index=feats),
        obsm={"spatial": cells[["x_um", "y_um"]].to_numpy(np.float64)},
        uns=uns,
    )
    adata.write_h5ad(path)
    return Path(path)


def squidpy_uns(obs: pd.DataFrame, colors: dict[str, str], nhood: dict | None) -> dict:
    """``cell_type_colors`` (``colors``: :func:`histo.outputs.report.type_colors`) and the slide's statistics of
    ``nhood`` (:func:`histo.stats.neighbourhood.neighbourhood_stats`) under the keys squidpy's functions write,
    cluster key ``cell_type``, so that ``sq.pl.nhood_enrichment``, ``interaction_matrix``,
    ``centrality_scores``, ``co_occurrence`` and ``ripley`` plot them. Sets ``obs["cell_type"]``'s
    categories to the types present, in the statistics' order. Ripley's ``L_stat`` is histo's per-type L
    (:func:`histo.stats.neighbourhood._ripley`); its ``sims_stat`` is complete spatial randomness, L = d (none
    simulated); ``moranI`` holds I only."""
    col = obs["cell_type"].cat.remove_unused_categories()
    slide = (nhood or {}).get("regions", {}).get("slide", {})
    if nhood and set(nhood["cell_types"]) == set(col.cat.categories):
        col = col.cat.reorder_categories(list(nhood["cell_types"]))
    obs["cell_type"] = col
    types = list(col.cat.categories)
    out: dict = {"cell_type_colors": np.array([colors.get(t, "#808080") for t in types], dtype=object)}
    if not slide or list(nhood["cell_types"]) != types:
        return out
    if "nhood_zscore" in slide:
        out["cell_type_nhood_enrichment"] = {"zscore": slide["nhood_zscore"], "count": slide["nhood_count"]}
    if "interaction" in slide:
        out["cell_type_interactions"] = slide["interaction"]
    if "centrality" in slide:
        out["cell_type_centrality_scores"] = slide["centrality"]
    if "co_occurrence" in slide:
        out["cell_type_co_occurrence"] = {
            "occ": slide["co_occurrence"],
            "interval": np.r_[0.0, slide["co_occurrence_um"]],
        }  # edges from 0 µm
    if "ripley_L" in slide:
        bins = np.asarray(slide["ripley_um"], np.float64)
        long = pd.DataFrame(
            {
                "bins": np.tile(bins, len(types)),
                "stats": np.asarray(slide["ripley_L"]).ravel(),
                "cell_type": pd.Categorical(np.repeat(types, len(bins)), categories=types),
            }
        )
        out["cell_type_ripley_L"] = {
            "L_stat": long,
            "bins": bins,
            "sims_stat": pd.DataFrame({"bins": bins, "simulations": 0, "stats": bins}),
        }
    if len(slide.get("moran_features", ())):
        out["moranI"] = pd.DataFrame({"I": slide["moran_I"]}, index=[str(f) for f in slide["moran_features"]])
    return out


def _is_bytes(col: pd.Series) -> bool:
    first = col.dropna()
    return len(first) > 0 and isinstance(first.iloc[0], (bytes, bytearray, memoryview))
