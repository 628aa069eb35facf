"""Reviewed regions: a pathologist's accepted, rejected, reclassified, redrawn and added regions are
measured again from the bundle's existing cells (no re-segmentation) and written back, and the
bundle's overview and report are redrawn.

Region tables here are those of :mod:`histo.structures.regions` (GeoDataFrame, µm) plus a ``review`` column
(``unreviewed`` | ``accepted`` | ``rejected``). Rejected regions leave ``regions.geojson``, the
metrics and the cells' region ids; their ids are listed in ``run.json["review"]``.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import anndata as ad
import geopandas as gpd
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from anndata.io import read_elem

from histo.errors import HistoError
from histo.io.files import atomic_write
from histo.outputs.export import ID_COLUMNS, regions_geojson, write_metrics
from histo.outputs.report import overview_figure, thumbnail, thumbnail_mpp, write_report
from histo.structures.aggregates import count_inside, grade
from histo.structures.metrics import region_metrics
from histo.structures.regions import (
    KINDS,
    RegionParams,
    assign_cells,
    edge_truncated,
    lymphoid_cell_types,
    mantle_thickness,
    region_params,
)
from histo.workflow import Workflow, validate

REVIEW_STATES = ("unreviewed", "accepted", "rejected")
HOSTS = ("follicle", "aggregate")  # kinds that hold germinal centres
COUNT_PREFIXES = ("n_", "density_", "fraction_")  # per-region cell columns region_metrics adds


def read_run(bundle: str | Path) -> dict:
    """``run.json`` of a complete bundle, or HistoError naming the folder and what is missing."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise HistoError(bundle, "not a folder: a histo result bundle is a folder made by `histo run`")
    try:
        run = json.loads((bundle / "run.json").read_text())
    except FileNotFoundError:
        raise HistoError(bundle, "not a histo result bundle: no run.json (made by `histo run`)") from None
    except (OSError, ValueError) as exc:
        raise HistoError(bundle / "run.json", f"unreadable run.json ({exc})") from None
    if run.get("status") != "complete":
        raise HistoError(bundle, f"the bundle is not complete (run.json status: {run.get('status')!r})")
    missing = [
        f
        for f in ("cells.parquet", "labels.ome.zarr", "regions.geojson", "metrics.parquet")
        if not (bundle / f).exists()
    ]
    if missing:
        raise HistoError(bundle, f"incomplete bundle: {', '.join(missing)} missing")
    return run


def read_regions(bundle: str | Path) -> gpd.GeoDataFrame:
    """The bundle's regions in µm (``geometry_um`` of ``regions.geojson``) with the region
    properties of ``metrics.parquet`` (grades, layers, …) and their ``review`` state."""
    bundle = Path(bundle)
    features = json.loads((bundle / "regions.geojson").read_text(encoding="utf-8"))["features"]
    rows = [
        dict(
            region_id=p["region_id"],
            kind=p["kind"],
            name=p["name"] if p["kind"] == "annotation" else p["kind"],
            parent_id=p.get("parent_id"),
            tissue_id=p.get("tissue_id"),
            review=p.get("review", "unreviewed"),
            geometry=shapely.from_wkt(p["geometry_um"]),
        )
        for p in (f["properties"] for f in features)
    ]
    regions = gpd.GeoDataFrame(rows, columns=[*ID_COLUMNS, "review", "geometry"], geometry="geometry")
    metrics = pd.read_parquet(bundle / "metrics.parquet").set_index("region_id")
    extra = metrics.drop(columns=[c for c in ID_COLUMNS if c in metrics]).reindex(regions.region_id)
    return gpd.GeoDataFrame(pd.concat([regions, extra.reset_index(drop=True)], axis=1), geometry="geometry")


def _changed(new: gpd.GeoDataFrame, old: gpd.GeoDataFrame) -> np.ndarray:
    """True per row of ``new`` whose id is new, whose kind changed or whose outline moved (> 0.01 µm²)."""
    before = old.set_index("region_id")
    out = []
    for rid, kind, geom in zip(new.region_id, new.kind, new.geometry):
        if not isinstance(rid, str) or rid not in before.index or before.at[rid, "kind"] != kind:
            out.append(True)
            continue
        prev = before.at[rid, "geometry"]
        out.append(bool(shapely.symmetric_difference(geom, prev).area > 1e-2))
    return np.array(out, bool)


def _renumber(regions: gpd.GeoDataFrame, changed: np.ndarray) -> list[str]:
    """Ids: kept where the region only changed outline; ``<kind>-<n>`` (next free n) where it is new
    or changed kind."""
    ids = list(regions.region_id)
    taken = {
        k: [int(m.group(1)) for i in ids if isinstance(i, str) and (m := re.fullmatch(rf"{k}-(\d+)", i))] for k in KINDS
    }
    for i, (rid, kind) in enumerate(zip(ids, regions.kind)):
        if isinstance(rid, str) and rid.rsplit("-", 1)[0] == kind:
            continue
        n = max(taken.setdefault(kind, []), default=0) + 1
        taken[kind].append(n)
        ids[i] = f"{kind}-{n}"
    return ids


def _best(geom, candidates: gpd.GeoDataFrame) -> str | None:
    """Id of the candidate region overlapping ``geom`` most, None where none does."""
    if not len(candidates):
        return None
    overlap = shapely.area(shapely.intersection(geom, np.asarray(candidates.geometry)))
    return candidates.region_id.iloc[int(np.argmax(overlap))] if overlap.max() > 0 else None


def refresh_properties(
    regions: gpd.GeoDataFrame,
    changed: np.ndarray,
    xy: np.ndarray,
    tissue_type: str,
    params: RegionParams | dict | None = None,
) -> gpd.GeoDataFrame:
    """Region properties after editing: rows ``changed`` get area, tissue and parent ids, the
    edge-truncated flag and (aggregates) radial layers and grade from the cells at ``xy`` (n, 2) µm;
    every host's ``has_gc``, follicle mantle thickness and centre's host fraction are re-derived."""
    p = region_params(tissue_type, params)
    out = regions.copy()
    tissue = out[out.kind == "tissue"]
    for i in np.flatnonzero(changed):
        geom, kind = out.geometry.iloc[i], out.kind.iloc[i]
        out.loc[out.index[i], "area_um2"] = geom.area
        if kind in ("tissue", "annotation"):
            continue
        tid = _best(geom, tissue)
        host = _best(geom, out[out.kind.isin(HOSTS)]) if kind == "germinal_centre" else None
        piece = tissue.geometry[tissue.region_id == tid].iloc[0] if tid else None
        out.loc[out.index[i], ["tissue_id", "parent_id"]] = [tid, host or tid]
        out.loc[out.index[i], "edge_truncated"] = bool(piece is not None and edge_truncated(geom, piece, p.edge_um))
        if kind == "aggregate":
            n = count_inside(geom, xy)
            layers = float(np.sqrt(n / np.pi))  # radius / spacing with spacing = sqrt(area / n)
            out.loc[out.index[i], ["spacing_um", "radial_layers", "grade"]] = [
                float(np.sqrt(geom.area / max(n, 1))),
                layers,
                grade(layers, p.aggregate.grade_min_layers),
            ]
    gcs = out[out.kind == "germinal_centre"]
    for i in np.flatnonzero(out.kind.isin(HOSTS).to_numpy()):
        rid, geom = out.region_id.iloc[i], out.geometry.iloc[i]
        inner = list(gcs.geometry[gcs.parent_id == rid])
        out.loc[out.index[i], "has_gc"] = bool(inner)
        if out.kind.iloc[i] == "follicle":
            out.loc[out.index[i], "mantle_thickness_um"] = mantle_thickness(geom, inner)
    area = out.set_index("region_id")["area_um2"]
    for i in np.flatnonzero((out.kind == "germinal_centre").to_numpy()):
        host = out.parent_id.iloc[i]
        if host in area.index and out.kind[out.region_id == host].iloc[0] in HOSTS:
            out.loc[out.index[i], "fraction_host_area"] = out.area_um2.iloc[i] / area[host]
    return out


def remeasure(
    cells: pd.DataFrame, regions: gpd.GeoDataFrame, tissue_type: str, params: RegionParams | dict | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Region ids of every cell and the metrics table (:func:`histo.structures.metrics.region_metrics`) of
    ``regions``, keeping the region finders' properties (grades, layers, …) and re-deriving
    everything ``region_metrics`` computes (areas, counts, densities, summaries, scores)."""
    ids = assign_cells(cells, regions)
    with_ids = pd.concat([cells, ids], axis=1)
    bare_cols = [*ID_COLUMNS, "area_um2", "edge_truncated", "geometry"]
    bare = region_metrics(with_ids, regions[bare_cols], tissue_type, params)
    structures = bare[~bare.kind.isin(["tissue", "slide"])]
    # a property is what region_metrics does not make, or fills on tissue / slide rows only (krenn_lining)
    props = [
        c
        for c in regions.columns
        if c not in bare_cols
        and c != "review"
        and (c not in bare or (len(structures) and structures[c].isna().all() and not c.startswith(COUNT_PREFIXES)))
    ]
    return ids, region_metrics(with_ids, regions[bare_cols[:-1] + props + ["geometry"]], tissue_type, params)


def _write_cell_ids(bundle: Path, ids: pd.DataFrame) -> None:
    """Replace the region id columns of ``cells.parquet`` (row group by row group, keeping them) and
    of ``cells.h5ad``'s ``obs``."""
    src = pq.ParquetFile(bundle / "cells.parquet")
    id_table = pa.Table.from_pandas(ids, preserve_index=False)
    with atomic_write(bundle / "cells.parquet") as tmp:
        writer, start = None, 0
        for g in range(src.num_row_groups):
            part = src.read_row_group(g)
            part = part.drop_columns([c for c in ids.columns if c in part.column_names])
            for name in ids.columns:
                part = part.append_column(name, id_table.column(name).slice(start, part.num_rows).combine_chunks())
            writer = writer or pq.ParquetWriter(tmp, part.schema)
            writer.write_table(part)
            start += part.num_rows
        if writer is None:
            pq.write_table(id_table.slice(0, 0), tmp)
        else:
            writer.close()

    if (bundle / "cells.h5ad").exists():
        adata = ad.read_h5ad(bundle / "cells.h5ad")
        for name in ids.columns:
            adata.obs[name] = pd.Categorical(ids[name].astype("string").to_numpy())
        with atomic_write(bundle / "cells.h5ad") as tmp:
            adata.write_h5ad(tmp)


def slide_thumbnail(run: dict) -> tuple[np.ndarray, float]:
    """The overview thumbnail of a bundle's slide (``run.json`` input) and its µm/px; white where
    the slide file is no longer there."""
    from histo.io.slide import open_slide

    info = run["input"]
    try:
        return thumbnail(open_slide(info["path"], mpp=info["mpp"]))
    except HistoError:
        mpp = thumbnail_mpp(info["shape_px"], info["mpp"])
        h, w = (max(1, round(n * info["mpp"] / mpp)) for n in info["shape_px"][:2])
        return np.full((h, w, 3), 255, np.uint8), info["shape_px"][1] * info["mpp"] / w


def saved_neighbourhood(bundle: Path) -> dict | None:
    """The neighbourhood statistics saved in ``cells.h5ad`` (``uns["neighbourhood"]``), if any."""
    if not (bundle / "cells.h5ad").exists():
        return None
    with h5py.File(bundle / "cells.h5ad", "r") as f:
        return read_elem(f["uns/neighbourhood"]) if "uns/neighbourhood" in f else None


def run_workflow(bundle: Path, run: dict) -> Workflow:
    """The :class:`histo.workflow.Workflow` the bundle was made with (run.json's ``workflow``, validated)."""
    return validate(run["workflow"], str(Path(bundle) / "run.json"))


def redraw_figures(
    bundle: Path, run: dict, regions: gpd.GeoDataFrame, cells: pd.DataFrame, metrics: pd.DataFrame
) -> None:
    """Redraw ``overview.png`` and ``report.html`` of ``bundle`` for ``regions`` and their ``metrics``
    (``cells``: ``x_um``, ``y_um``, ``cell_type``), with the saved neighbourhood statistics."""
    wf = run_workflow(bundle, run)
    thumb, thumb_mpp = slide_thumbnail(run)
    nhood = saved_neighbourhood(bundle)
    lymphoid = lymphoid_cell_types(wf.tissue_type, wf.regions)
    overview = overview_figure(thumb, thumb_mpp, regions, cells)  # the PNG file and the report's map
    atomic_write(bundle / "overview.png", overview)
    with atomic_write(bundle / "report.html") as tmp:
        write_report(
            tmp,
            bundle.name,
            thumb,
            thumb_mpp,
            regions,
            cells,
            metrics,
            wf.tissue_type,
            nhood,
            lymphoid,
            {"overview": overview},
        )


def save_review(bundle: str | Path, regions: gpd.GeoDataFrame) -> pd.DataFrame:
    """Write the reviewed ``regions`` (rows with ``region_id`` None are new) into ``bundle``:
    ``regions.geojson`` (with each region's ``review`` state), ``metrics.csv``/``.parquet``, the
    cells' region ids, ``overview.png`` and ``report.html`` redrawn, and a ``review`` entry in
    ``run.json``. Returns the new metrics table."""
    bundle = Path(bundle)
    run = read_run(bundle)
    wf = run_workflow(bundle, run)
    old = read_regions(bundle)
    kept = regions[regions.review != "rejected"].reset_index(drop=True)
    rejected = [r for r in regions.region_id[regions.review == "rejected"] if isinstance(r, str)]
    bad = sorted(set(kept.kind) - set(KINDS))
    if bad:
        raise HistoError(bundle, f"unknown region kind(s) {', '.join(bad)} (kinds: {', '.join(KINDS)})")
    kept["geometry"] = shapely.make_valid(np.asarray(kept.geometry))
    changed = _changed(kept, old)
    was = list(kept.region_id)
    kept["region_id"] = _renumber(kept, changed)
    kept["name"] = [n if k == "annotation" and isinstance(n, str) else k for n, k in zip(kept.name, kept.kind)]
    cells = pd.read_parquet(bundle / "cells.parquet", columns=["x_um", "y_um", "cell_type"])
    xy = cells[["x_um", "y_um"]].to_numpy(np.float64)
    kept = refresh_properties(kept, changed, xy, wf.tissue_type, wf.regions)
    ids, metrics = remeasure(cells, kept, wf.tissue_type, wf.regions)
    _write_cell_ids(bundle, ids)
    collection = regions_geojson(kept, run["input"]["mpp"], metrics)
    for feature, state in zip(collection["features"], kept.review):
        feature["properties"]["review"] = state
    text = json.dumps(collection, ensure_ascii=False, separators=(",", ":"))
    atomic_write(bundle / "regions.geojson", text)
    write_metrics(metrics, bundle)
    redraw_figures(bundle, run, kept, cells, metrics)
    run["review"] = {
        "saved": datetime.now(UTC).isoformat(),
        "states": kept.review.value_counts().to_dict() | {"rejected": len(rejected)},
        "rejected": rejected,
        "changed": [
            f"{a} -> {b}" if isinstance(a, str) and a != b else b for a, b, c in zip(was, kept.region_id, changed) if c
        ],
        "regions": {k: int(v) for k, v in kept.kind.value_counts().items()},
    }
    atomic_write(bundle / "run.json", json.dumps(run, indent=2, default=str))
    return metrics
