"""From the slide's cells to what pathologists grade: cell types, regions and the metric table.

Runs in the client on the cells table without polygons (one row per nucleus, a few dozen numbers
each), after the tiles are segmented and before ``cells.parquet`` is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from histo.errors import HistoError
from histo.io.annotations import import_annotations
from histo.structures.metrics import region_metrics
from histo.structures.phenotypes import classify_he, gate_markers
from histo.structures.regions import assign_cells, find_regions

if TYPE_CHECKING:
    from histo.workflow import Workflow


def cell_types(cells: pd.DataFrame, wf: Workflow) -> tuple[pd.Categorical | None, dict]:
    """Cell types (H&E rules, or marker gates for IHC / IF) and the report of thresholds used."""
    if wf.stain == "he":
        return classify_he(cells, wf.cell_types)
    gates = wf.marker_gates
    if not gates.gates:
        return None, {"note": "no marker gates in the workflow: cells are not typed"}
    types, report = gate_markers(cells, gates.gates, gates.auto)
    return types, {"gates": report}


def analyse_cells(cells: pd.DataFrame, slide, tissue, wf: Workflow, annotations: str | Path | None = None):
    """Type the cells and find, grade and measure the regions.

    Returns (per-cell columns to add to ``cells.parquet``: ``cell_type`` and region ids,
    regions GeoDataFrame, metrics table, report for run.json). A marker gate the cells cannot take
    (its column missing: the slide has no such channel) is a HistoError naming the slide and the workflow.
    """
    try:
        types, type_report = cell_types(cells, wf)
    except ValueError as exc:  # a marker gate the slide's cells cannot take (e.g. no such channel)
        if wf.stain == "he":
            raise
        raise HistoError(getattr(slide, "path", None), f"workflow {wf.name!r}: {exc}") from None
    cells = cells.assign(cell_type=types if types is not None else pd.Categorical(["other"] * len(cells)))
    regions = find_regions(cells, tissue.pieces, wf.tissue_type, wf.regions)
    candidates = regions.attrs.get("candidates", [])
    if annotations:
        regions = pd.concat([regions, import_annotations(annotations, slide.mpp)], ignore_index=True)
    ids = assign_cells(cells, regions)
    metrics = region_metrics(pd.concat([cells, ids], axis=1), regions, wf.tissue_type, wf.regions)
    extra = pd.concat([cells[["cell_type"]], ids], axis=1)
    counts = regions["kind"].value_counts().to_dict() if len(regions) else {}
    return (
        extra,
        regions,
        metrics,
        {
            "cell_types": type_report,
            "regions": {k: int(v) for k, v in counts.items()},
            "structure_candidates": candidates,
        },
    )
