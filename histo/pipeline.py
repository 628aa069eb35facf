"""One slide from file to bundle: open → tissue → tiles → StarDist on Dask → cells → labels → run.json.

The CLI and the napari plugin call :func:`run_slide`. This process never imports TensorFlow: the
model runs in the Dask workers (``histo.segment``).
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from distributed import Client, as_completed

from histo import __version__
from histo.bundle import concat_cells, file_fingerprint, finish, partial_dir, read_parts, slide_name
from histo.cluster import dask_client
from histo.labels import create_pyramid, downsample_level, write_chunk
from histo.models import ModelSpec, compute_percentiles, resolve_model
from histo.progress import progress_bar
from histo.provenance import versions
from histo.segment import SegmentJob, segment_tile
from histo.slide import Slide, open_slide
from histo.structures import analyse_cells, write_outputs
from histo.tiling import Tile, align_up, tile_grid
from histo.tissue import detect_tissue
from histo.workflow import load_workflow

MIN_HALO_PX = 64  # px at the model's µm/px: context the U-Net needs beyond the largest nucleus


def plan_tiles(slide: Slide, tissue, grid_mpp: float, max_nucleus_um: float, segmentation: dict
               ) -> tuple[tuple[int, int], list[Tile]]:
    """The grid shape (H, W) px at ``grid_mpp`` µm/px and the tiles over tissue."""
    scale = slide.mpp / grid_mpp
    shape = (math.ceil(slide.shape[0] * scale), math.ceil(slide.shape[1] * scale))
    halo_um = segmentation["halo_um"]
    # a kept nucleus reaches at most its diameter past the core; the U-Net needs MIN_HALO_PX of context
    halo_px = max(MIN_HALO_PX, max_nucleus_um / grid_mpp) if halo_um is None else halo_um / grid_mpp
    tile_px = align_up(segmentation["tile_um"] / grid_mpp)
    return shape, tile_grid(shape, tile_px, align_up(halo_px), tissue.mask, tissue.mpp / grid_mpp)


def slide_percentiles(slide: Slide, tissue, model: ModelSpec) -> tuple | None:
    """Per-slide normalisation values for percentile-normalised models, from tissue pixels of a
    low-resolution level (the same values then apply to every tile)."""
    if model.normalize.get("kind") != "percentile":
        return None
    thumb = slide.thumbnail(tissue.mpp)
    h, w = min(thumb.shape[0], tissue.mask.shape[0]), min(thumb.shape[1], tissue.mask.shape[1])
    mask = tissue.mask[:h, :w] if tissue.mask[:h, :w].any() else None
    return compute_percentiles(thumb[:h, :w], model, mask)


def _segment(client: Client, job: SegmentJob, tiles: list[Tile], show: bool) -> dict:
    """Run the tile tasks; returns summed timings (s) over tiles."""
    totals: dict[str, float] = {}
    futures = client.map(segment_tile, [job] * len(tiles), tiles, key=[f"segment-{job.parts_dir}-{t.name}" for t in tiles])
    with progress_bar("segmenting tiles", len(tiles), show) as advance:
        for future in as_completed(futures):
            summary = future.result()
            for key, value in summary.items():
                if key.endswith("_s"):
                    totals[key] = totals.get(key, 0.0) + value
            advance()
    return totals


def _labels(client: Client, cells: Path, groups: dict, tiles: list[Tile], shape, zarr_path: Path, mpp: float, show: bool) -> None:
    """Rasterise the label pyramid from ``cells.parquet`` on the cluster."""
    chunk = tiles[0].x1 - tiles[0].x0 if tiles else 1024
    arrays = create_pyramid(zarr_path, shape, chunk, mpp)
    by_pos = {(t.row, t.col): t for t in tiles}
    # row groups of the tile and its 8 neighbours: every nucleus that can reach the tile's chunk
    near = {t.name: [groups[n.name] for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                     if (n := by_pos.get((t.row + dr, t.col + dc))) and n.name in groups] for t in tiles}
    chunks = [t for t in tiles if near[t.name]]
    with progress_bar("writing labels", len(chunks) + len(arrays) - 1, show) as advance:
        futures = [client.submit(write_chunk, str(cells), near[t.name], str(zarr_path), t, mpp, pure=False) for t in chunks]
        for future in as_completed(futures):
            future.result()
            advance()
        for level in range(1, len(arrays)):
            h, w = arrays[level].shape
            boxes = [(slice(r, min(r + chunk, h)), slice(c, min(c + chunk, w))) for r in range(0, h, chunk) for c in range(0, w, chunk)]
            client.gather(client.map(downsample_level, [str(zarr_path)] * len(boxes), [level] * len(boxes),
                                     [b[0] for b in boxes], [b[1] for b in boxes], pure=False))
            advance()


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    workflow: str | Path | dict | None = None,
    model: str | None = None,
    mpp: float | None = None,
    client: Client | None = None,
    show_progress: bool = True,
    annotations: str | Path | None = None,
) -> Path:
    """Analyse one slide and write its bundle ``out_dir/<slide name>/``; returns the bundle path.

    ``workflow`` is a preset name, a YAML path or an already validated dict; ``model`` overrides the
    workflow's model; ``mpp`` (µm/px) overrides or supplies the slide's pixel size. Without a
    ``client`` a LocalCluster is started for this call and closed after it. ``annotations`` is a
    QuPath GeoJSON whose polygons become ``annotation`` regions.
    """
    started = datetime.now(timezone.utc)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    wf = workflow if isinstance(workflow, dict) else load_workflow(workflow)
    slide = open_slide(slide_path, mpp=mpp)
    spec = resolve_model(model or wf["model"], stain="fluo" if wf["stain"] == "if" else "he")
    timings["open_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tissue = detect_tissue(slide, mpp=wf["tissue"]["mpp"], min_area_um2=wf["tissue"]["min_area_um2"])
    # the model's µm/px, or the slide level's own where that is within 1 % (read unscaled)
    grid_mpp = slide.effective_mpp(spec.mpp)
    shape, tiles = plan_tiles(slide, tissue, grid_mpp, spec.max_nucleus_um, wf["segmentation"])
    percentiles = slide_percentiles(slide, tissue, spec)
    timings["tissue_s"] = time.perf_counter() - t

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = slide_name(slide_path)
    partial = partial_dir(out_dir, name)
    shutil.rmtree(partial, ignore_errors=True)
    parts = partial / "parts"
    parts.mkdir(parents=True)

    seg = wf["segmentation"]
    job = SegmentJob(str(Path(slide_path).resolve()), slide.mpp, spec, grid_mpp, shape[1], str(parts),
                     seg["prob_thresh"], seg["nms_thresh"], percentiles, wf["stain"],
                     tuple(slide.channel_names) if wf["stain"] == "if" else None)
    with (nullcontext(client) if client else dask_client()) as cl:
        t = time.perf_counter()
        task_totals = _segment(cl, job, tiles, show_progress)
        timings["segment_s"] = time.perf_counter() - t
        t = time.perf_counter()
        columns = [c for c in job.schema.names if c not in ("polygon", "tile")]
        cells = read_parts(parts, tiles, columns)
        extra, regions, metrics, structure_report = analyse_cells(cells, slide, tissue, wf, annotations)
        timings["structures_s"] = time.perf_counter() - t
        t = time.perf_counter()
        n_cells, groups = concat_cells(parts, tiles, partial / "cells.parquet", job.schema, extra)
        shutil.rmtree(parts)
        cells = pd.concat([cells, extra], axis=1).assign(label=np.arange(1, n_cells + 1, dtype=np.int32))
        write_outputs(partial, name, cells, regions, metrics, slide, wf)
        timings["outputs_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _labels(cl, partial / "cells.parquet", groups, tiles, shape, partial / "labels.ome.zarr", grid_mpp, show_progress)
        timings["labels_s"] = time.perf_counter() - t

    run = {
        "status": "complete",
        "histo_version": __version__,
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "input": {**file_fingerprint(Path(slide_path)), "format": slide.format, "mpp": slide.mpp,
                  "mpp_source": "argument" if mpp else "file", "shape_px": list(slide.shape), "levels": len(slide.levels)},
        "workflow": wf,
        "model": spec.to_dict(),
        "parameters": {"grid_mpp": grid_mpp, "grid_shape_px": list(shape),
                       "tile_px": tiles[0].x1 - tiles[0].x0 if tiles else None,
                       "halo_px": tiles[0].halo if tiles else None, "percentiles": percentiles},
        "tissue": {"pieces": len(tissue.pieces), "area_mm2": sum(p.area for p in tissue.pieces) / 1e6},
        "n_tiles": len(tiles),
        "n_cells": n_cells,
        **structure_report,
        "timings_s": timings,
        "task_timings_s": task_totals,
        "versions": versions(),
        "warnings": [] if tiles else ["no tissue found: the bundle has no nuclei"],
    }
    return finish(partial, out_dir / name, run)

