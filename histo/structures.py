"""From the slide's cells to what pathologists grade: cell types, regions, metrics and exports.

Runs in the client on the cells table without polygons (one row per nucleus, a few dozen numbers
each), after the tiles are segmented and before ``cells.parquet`` is written.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from histo.export import import_annotations, write_h5ad, write_metrics, write_regions_geojson
from histo.metrics import region_metrics
from histo.neighbourhood import neighbourhood_metrics, neighbourhood_stats
from histo.phenotypes import classify_he, gate_markers
from histo.regions import assign_cells, find_regions, region_params
from histo.report import thumbnail, write_overview, write_report

def cell_types(cells: pd.DataFrame, wf: dict) -> tuple[pd.Categorical | None, dict]:
    """Cell types (H&E rules, or marker gates for IHC / IF) and the report of thresholds used."""
    if wf["stain"] == "he":
        return classify_he(cells, wf["cell_types"])
    gates = wf["marker_gates"]
    if not gates["gates"]:
        return None, {"note": "no marker gates in the workflow: cells are not typed"}
    types, report = gate_markers(cells, gates["gates"], gates["auto"])
    return types, {"gates": report}


def analyse_cells(cells: pd.DataFrame, slide, tissue, wf: dict, annotations: str | Path | None = None):
    """Type the cells and find, grade and measure the regions.

    Returns (per-cell columns to add to ``cells.parquet``: ``cell_type`` and region ids,
    regions GeoDataFrame, metrics table, report for run.json).
    """
    types, type_report = cell_types(cells, wf)
    cells = cells.assign(cell_type=types if types is not None else pd.Categorical(["other"] * len(cells)))
    regions = find_regions(cells, tissue.pieces, wf["tissue_type"], wf["regions"])
    if annotations:
        regions = pd.concat([regions, import_annotations(annotations, slide.mpp)], ignore_index=True)
    ids = assign_cells(cells, regions)
    metrics = region_metrics(pd.concat([cells, ids], axis=1), regions, wf["tissue_type"], wf["regions"])
    extra = pd.concat([cells[["cell_type"]], ids], axis=1)
    counts = regions["kind"].value_counts().to_dict() if len(regions) else {}
    return extra, regions, metrics, {"cell_types": type_report, "regions": {k: int(v) for k, v in counts.items()}}


def write_outputs(folder: Path, name: str, cells: pd.DataFrame, regions, metrics: pd.DataFrame, slide, wf: dict) -> None:
    """regions.geojson, metrics.csv/.parquet, cells.h5ad, overview.png and report.html.

    ``cells`` carry ``cell_type`` and the region ids; unless the workflow turns them off, the
    neighbourhood statistics (histo.neighbourhood) go to cells.h5ad ``uns["neighbourhood"]``,
    their summary columns to the metrics and their plots to the report."""
    uns = {"histo": {"workflow": wf["name"], "tissue_type": wf["tissue_type"]}}
    nhood = neighbourhood_stats(cells, wf["neighbourhood"]) if wf["neighbourhood"]["run"] else None
    if nhood is not None:
        uns["neighbourhood"] = nhood
        metrics = metrics.merge(neighbourhood_metrics(nhood), on="region_id", how="left")
    write_regions_geojson(regions, folder / "regions.geojson", slide.mpp, metrics)
    write_metrics(metrics, folder)
    write_h5ad(cells, folder / "cells.h5ad", uns=uns)
    thumb, thumb_mpp = thumbnail(slide)
    write_overview(folder / "overview.png", thumb, thumb_mpp, regions, cells)
    structure = "follicle" if wf["tissue_type"] == "lymph-node" else "aggregate"
    lymphoid = region_params(wf["tissue_type"], wf["regions"])[structure]["cell_types"]
    write_report(folder / "report.html", name, thumb, thumb_mpp, regions, cells, metrics, wf["tissue_type"], nhood, lymphoid)
