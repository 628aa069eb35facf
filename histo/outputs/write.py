"""The bundle's analysis files: regions.geojson, metrics tables, cells.h5ad, overview.png and report.html,
with the neighbourhood statistics and the figures computed as tasks on the cluster's workers."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from histo.outputs.export import write_h5ad, write_metrics, write_regions_geojson
from histo.outputs.report import density_figure, neighbourhood_figure, overview_figure, thumbnail, write_report
from histo.stats.neighbourhood import (
    cell_type_order,
    group_stats,
    input_columns,
    neighbourhood_metrics,
    region_groups,
    stats_result,
)
from histo.structures.regions import lymphoid_cell_types
from histo.timing import Timings, stopwatch

if TYPE_CHECKING:
    from histo.workflow import Workflow


def _submit(client, fn, *args, priority: int = 0):
    """``fn(*args)`` as a task on ``client``'s cluster (a Dask Future; higher ``priority`` first), or
    here and now without a client (a done Future); future arguments are resolved either way."""
    if client is not None:
        return client.submit(fn, *args, pure=False, priority=priority)
    done = Future()
    done.set_result(fn(*(a.result() if isinstance(a, Future) else a for a in args)))
    return done


def _slide_figure(types: list[str], slide_group: dict) -> bytes | None:
    """The report's neighbourhood figure from the slide's :func:`group_stats` alone."""
    return neighbourhood_figure({"cell_types": types, "regions": slide_group})


@dataclass
class PendingOutputs:
    """The neighbourhood statistics and the report's figures of one slide, submitted (:func:`submit_outputs`)."""

    nhood_in: pd.DataFrame | None  # the statistics' input columns; None: the workflow turns them off
    parts: list  # futures of the statistics' groups, the slide's first
    figures: dict  # name -> future of the figure's PNG bytes
    thumb: object
    thumb_mpp: float
    lymphoid: tuple

    def cancel(self, client) -> None:
        """Cancel what is still running on ``client``'s cluster (nothing without a client)."""
        if client is not None:
            client.cancel([f for f in [*self.parts, *self.figures.values()] if hasattr(f, "key")])


def submit_outputs(cells: pd.DataFrame, regions, slide, wf: Workflow, client=None, thumb=None) -> PendingOutputs:
    """Submit the neighbourhood statistics and the report's figures of ``cells`` (with ``cell_type`` and
    the region ids) on ``client``'s workers (without a client: computed here and now), so they run while
    this process writes the tables; ``thumb``: the report's (thumbnail, µm/px) if already made."""
    params = wf.neighbourhood
    nhood_in, parts = None, []
    if params.run:
        # first (the longest chain): the slide's statistics, then its figure; beside them the regions' in groups
        nhood_in = cells[input_columns(cells, params)]
        groups = region_groups(nhood_in, params, len(client.nthreads()) - 1 if client is not None else 1)
        parts = [_submit(client, group_stats, nhood_in, params, g, priority=2 - bool(k)) for k, g in enumerate(groups)]
    thumb, thumb_mpp = thumb if thumb is not None else thumbnail(slide)
    lymphoid = lymphoid_cell_types(wf.tissue_type, wf.regions)
    plotted = cells[["x_um", "y_um", "cell_type"]]
    figures = {
        "overview": _submit(client, overview_figure, thumb, thumb_mpp, regions, plotted),
        "density": _submit(client, density_figure, thumb, thumb_mpp, regions, plotted, lymphoid),
    }
    if parts:
        figures["neighbourhood"] = _submit(client, _slide_figure, cell_type_order(nhood_in), parts[0], priority=2)
    return PendingOutputs(nhood_in, parts, figures, thumb, thumb_mpp, lymphoid)


def write_outputs(
    folder: Path,
    name: str,
    cells: pd.DataFrame,
    regions,
    metrics: pd.DataFrame,
    slide,
    wf: Workflow,
    client=None,
    report: dict | None = None,
    pending: PendingOutputs | None = None,
) -> dict[str, float]:
    """regions.geojson, metrics.csv/.parquet, cells.h5ad, overview.png and report.html; returns the
    seconds until the neighbourhood statistics were in (``neighbourhood_s``), then for the tables,
    GeoJSON and h5ad (``exports_s``), then until the figures were in and the report written
    (``report_s``).

    ``cells`` carry ``cell_type`` and the region ids; unless the workflow turns them off, the
    neighbourhood statistics (histo.stats.neighbourhood) go to cells.h5ad ``uns["neighbourhood"]``,
    their summary columns to the metrics and their plots to the report. With ``client``, the
    statistics and the report's figures are computed as tasks on its workers, side by side, while
    this process writes the tables (the workers are idle once the tiles are done); ``pending``: those
    tasks already submitted by :func:`submit_outputs` for the same ``cells``. ``report`` (run.json's)
    gains ``neighbourhood_skipped``: the statistics skipped per region and why (one cell type, too few cells)."""
    timings = Timings()
    clock = stopwatch()
    params = wf.neighbourhood
    pending = pending or submit_outputs(cells, regions, slide, wf, client)
    uns = {"histo": {"workflow": wf.name, "tissue_type": wf.tissue_type}}
    nhood = None
    if pending.nhood_in is not None:
        uns["neighbourhood"] = nhood = stats_result(pending.nhood_in, params, [f.result() for f in pending.parts])
        if report is not None:
            report["neighbourhood_skipped"] = nhood["skipped"]
        metrics = metrics.merge(neighbourhood_metrics(nhood), on="region_id", how="left")
    timings["neighbourhood_s"] = clock.stop()
    with timings.time("exports_s"):
        write_regions_geojson(regions, folder / "regions.geojson", slide.mpp, metrics)
        write_metrics(metrics, folder)
        write_h5ad(cells, folder / "cells.h5ad", uns=uns)
    with timings.time("report_s"):
        figures = {k: f.result() for k, f in pending.figures.items()}
        (folder / "overview.png").write_bytes(figures["overview"])
        write_report(
            folder / "report.html",
            name,
            pending.thumb,
            pending.thumb_mpp,
            regions,
            cells,
            metrics,
            wf.tissue_type,
            nhood,
            pending.lymphoid,
            figures,
        )
    return dict(timings)
