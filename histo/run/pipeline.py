"""One slide from file to bundle: open → tissue → tiles → StarDist on Dask → cells → labels → run.json.

The CLI and the napari plugin call :func:`run_slide`. This process never imports TensorFlow: the
model runs in the Dask workers (``histo.segment.task``).

What of the finish needs no complete cells table starts while the tiles run (:class:`EarlyFinish`):
each finished tile's nuclei are read as its task ends, the slide's SHA-256 and the report's thumbnail
are made in a thread. Cell types and regions need every nucleus; once they are in, the neighbourhood
statistics and the figures start on the workers before ``cells.parquet`` is written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import threading
import uuid
from concurrent.futures import Future as LocalFuture
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from distributed import Client, Future, as_completed

from histo import __version__
from histo.errors import HistoError
from histo.io.bundle import (
    bundle_lock,
    concat_cells,
    file_fingerprint,
    partial_dir,
    publish,
    read_part,
    read_parts,
    slide_name,
    write_errors,
)
from histo.io.files import atomic_write
from histo.io.slide import Slide, check_stain, open_slide, skip_unreadable_tiles
from histo.outputs.report import thumbnail
from histo.outputs.write import submit_outputs, write_outputs
from histo.run.cluster import dask_client
from histo.run.progress import progress_bar
from histo.run.provenance import versions
from histo.segment.labels import create_pyramid, downsample_level, write_chunk
from histo.segment.models import ModelSpec, compute_percentiles, inference_precision, resolve_model
from histo.segment.nuclei import border_duplicates, cell_schema
from histo.segment.task import SegmentJob, segment_tile
from histo.segment.tiling import Segmentation, Tile, align_up, halo_px, pixels_read, tile_grid
from histo.segment.tissue import detect_tissue
from histo.structures.analyse import analyse_cells
from histo.structures.phenotypes import check_gate_columns
from histo.timing import Timings, stopwatch
from histo.workflow import Workflow, as_workflow, nucleus_channel

UNREADABLE = ".unreadable.json"  # a tile task's record of slide tiles it read as glass, beside its part


def plan_tiles(
    slide: Slide, tissue, grid_mpp: float, max_nucleus_um: float, segmentation: Segmentation
) -> tuple[tuple[int, int], list[Tile]]:
    """The grid shape (H, W) px at ``grid_mpp`` µm/px and the tiles over tissue (``segmentation``:
    the workflow's section; ``tile_um``, ``halo_um`` in µm)."""
    scale = slide.mpp / grid_mpp
    shape = (math.ceil(slide.shape[0] * scale), math.ceil(slide.shape[1] * scale))
    halo = halo_px(max_nucleus_um, grid_mpp, segmentation.halo_um)
    tile_px = align_up(segmentation.tile_um / grid_mpp)
    return shape, tile_grid(shape, tile_px, halo, tissue.mask, tissue.mpp / grid_mpp)


def slide_percentiles(slide: Slide, tissue, model: ModelSpec, channel: int | None = None) -> tuple | None:
    """Per-slide normalisation values for percentile-normalised models, from tissue pixels of a
    low-resolution level (the same values then apply to every tile); ``channel``: only that one."""
    if model.normalize.get("kind") != "percentile":
        return None
    thumb = slide.thumbnail(tissue.mpp)
    if channel is not None:
        thumb = thumb[..., channel]
    h, w = min(thumb.shape[0], tissue.mask.shape[0]), min(thumb.shape[1], tissue.mask.shape[1])
    mask = tissue.mask[:h, :w] if tissue.mask[:h, :w].any() else None
    return compute_percentiles(thumb[:h, :w], model, mask)


def _segment(client: Client, plan: SlidePlan, show: bool) -> dict:
    """Run the tile tasks; returns summed timings (s) over tiles. With ``plan.early``, each finished
    tile's nuclei are read into it while the other tiles run."""
    totals: dict[str, float] = {}
    with progress_bar("segmenting tiles", len(plan.tiles), show) as advance:
        for future in as_completed(submit_tiles(client, plan)):
            tile_finished(plan, totals, future.result())
            advance()
    return totals


def part_columns(job: SegmentJob) -> list[str]:
    """The columns of the tiles' parts that the finish analyses (all but the polygons and the tile)."""
    return [c for c in job.schema.names if c not in ("polygon", "tile")]


class EarlyFinish:
    """The finish's work begun while the tiles still run (:func:`run_slide`, each slide of
    :func:`histo.run.batch.run_batch`, napari's Analyze widget): in a thread, the slide file's SHA-256
    (run.json's ``input``) and the report's thumbnail, which need no nucleus; in the client, each
    finished tile's part (:func:`part_columns`) read as its task ends, so the cells table of the finish
    only concatenates them."""

    def __init__(self, plan: SlidePlan):
        self.parts_dir, self.columns = Path(plan.job.parts_dir), part_columns(plan.job)
        self.parts: dict[str, pa.Table] = {}
        self._nucleus_free: LocalFuture = LocalFuture()
        # a daemon thread: an interrupted run does not wait for the hash of a large slide
        threading.Thread(target=self._run, args=(plan,), daemon=True, name="histo-early-finish").start()

    def _run(self, plan: SlidePlan) -> None:
        try:
            input_info = file_fingerprint(plan.slide_path)
            with skip_unreadable_tiles() as unreadable:  # this thread's own record (a context variable)
                thumb = thumbnail(plan.slide)
            self._nucleus_free.set_result((input_info, thumb, unreadable))
        except BaseException as exc:  # noqa: BLE001 - raised where the finish asks for the result
            self._nucleus_free.set_exception(exc)

    def tile_done(self, tile_name: str) -> None:
        """Read ``tile_name``'s part, written by its finished task."""
        self.parts[tile_name] = read_part(self.parts_dir, tile_name, self.columns)

    def nucleus_free(self) -> tuple[dict, tuple, list[dict]]:
        """(the slide file's fingerprint, the report's (thumbnail, µm/px), slide tiles the thumbnail read
        as glass), waiting for the thread if it still runs."""
        return self._nucleus_free.result()


def read_cells(plan: SlidePlan) -> tuple[pd.DataFrame, np.ndarray]:
    """The finish's cells table (the parts' :func:`part_columns`, in tile order) and each row's tile
    index, from the parts ``plan.early`` read as the tiles finished, the others from disk."""
    read = plan.early.parts if plan.early is not None else None
    return read_parts(Path(plan.job.parts_dir), plan.tiles, part_columns(plan.job), read)


def _submit_labels(
    client: Client, cells: Path, groups: dict, tiles: list[Tile], shape, zarr_path: Path, mpp: float
) -> tuple[list, list[Future]]:
    """Create the label pyramid and submit the rasterising of its level 0 from ``cells.parquet`` on
    the cluster, a task per tile; returns (the pyramid's arrays, the tasks)."""
    chunk = tiles[0].x1 - tiles[0].x0 if tiles else 1024
    arrays = create_pyramid(zarr_path, shape, chunk, mpp)
    by_pos = {(t.row, t.col): t for t in tiles}
    # row groups of the tile and its 8 neighbours: every nucleus that can reach the tile's chunk
    near = {
        t.name: [
            groups[n.name]
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if (n := by_pos.get((t.row + dr, t.col + dc))) and n.name in groups
        ]
        for t in tiles
    }
    # behind the tasks submitted next (statistics, figures): the client waits for those first
    return arrays, [
        client.submit(write_chunk, str(cells), near[t.name], str(zarr_path), t, mpp, pure=False, priority=-1)
        for t in tiles
        if near[t.name]
    ]


def _finish_labels(client: Client, arrays: list, futures: list[Future], zarr_path: Path, show: bool) -> None:
    """Wait for level 0 of the label pyramid (:func:`_submit_labels`), then downsample each level on the cluster."""
    chunk = arrays[0].chunks[-1]
    with progress_bar("writing labels", len(futures) + len(arrays) - 1, show) as advance:
        for future in as_completed(futures):
            future.result()
            advance()
        for level in range(1, len(arrays)):
            h, w = arrays[level].shape
            boxes = [
                (slice(r, min(r + chunk, h)), slice(c, min(c + chunk, w)))
                for r in range(0, h, chunk)
                for c in range(0, w, chunk)
            ]
            client.gather(
                client.map(
                    downsample_level,
                    [str(zarr_path)] * len(boxes),
                    [level] * len(boxes),
                    [b[0] for b in boxes],
                    [b[1] for b in boxes],
                    pure=False,
                )
            )
            advance()


@dataclass
class SlidePlan:
    """One slide opened, its tissue found and its tiles laid out: what the tile tasks and
    :func:`finish_slide` need (``plan_slide``)."""

    slide_path: Path
    out_dir: Path
    name: str
    partial: Path
    wf: Workflow
    spec: ModelSpec
    slide: Slide
    tissue: object
    grid_mpp: float  # µm/px
    shape: tuple[int, int]  # grid (H, W) px at grid_mpp
    tiles: list[Tile]
    percentiles: tuple | None
    job: SegmentJob
    mpp: float | None  # the caller's level-0 µm/px, if given
    annotations: str | Path | None
    started: datetime
    timings: dict[str, float] = field(default_factory=dict)  # s
    unreadable: list[dict] = field(default_factory=list)  # slide tiles read as glass by this process
    early: EarlyFinish | None = None  # the finish's work begun while the tiles run (run_slide, run_batch, napari)


def _digest(data: bytes | str) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else data.encode()).hexdigest()


@functools.lru_cache(maxsize=16)
def _model_files_digest(folder: str | None) -> str | None:
    """SHA-256 over the model folder's config, thresholds and weights (a retrained model differs)."""
    if folder is None:
        return None
    files = sorted(f for f in Path(folder).glob("*") if f.name in ("config.json", "thresholds.json", "weights_best.h5"))
    return _digest(b"".join(f.name.encode() + bytes.fromhex(file_fingerprint(f)["sha256"]) for f in files))


def run_fingerprint(
    input_sha256: str, wf: Workflow, spec: ModelSpec, mpp: float | None, annotations: str | Path | None, precision: str
) -> str:
    """SHA-256 of what a bundle depends on: the input's content, the validated workflow (less its
    cohort ``endpoints``), the model (description and files, not its location), the ``mpp`` override
    (µm/px), the annotations' content and the network's ``precision``
    (:func:`histo.segment.models.inference_precision`). Equal fingerprints give equal
    bundles; ``run.json`` stores it as ``fingerprint``."""
    model = {k: v for k, v in spec.to_dict().items() if k != "path"}
    model["files_sha256"] = _model_files_digest(None if spec.path is None else str(spec.path))
    # run.json's workflow, less the cohort report's endpoints: they change no bundle
    wf = {k: v for k, v in wf.as_dict().items() if k != "endpoints"}
    parts = {
        "input_sha256": input_sha256,
        "workflow": wf,
        "model": model,
        "mpp": mpp,
        "annotations_sha256": None if annotations is None else file_fingerprint(Path(annotations))["sha256"],
        "precision": precision,
    }
    return _digest(json.dumps(parts, sort_keys=True, default=str))


def check_gates_fit(slide_path: str | Path, slide: Slide, wf: Workflow) -> None:
    """A marker gate on a column the slide's cells will not have (a channel it lacks) is a HistoError
    naming the slide, the workflow and the slide's channels, before any tile is segmented."""
    if wf.stain == "he" or not wf.marker_gates.gates:
        return
    names = tuple(slide.channel_names) if wf.stain == "if" else None
    try:
        check_gate_columns(wf.marker_gates.gates, cell_schema(wf.stain, names).names)
    except ValueError as exc:
        raise HistoError(
            slide_path, f"workflow {wf.name!r}: {exc} (the slide's channels: {', '.join(slide.channel_names)})"
        ) from None


def plan_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    workflow: str | Path | Workflow | dict | None = None,
    model: str | None = None,
    mpp: float | None = None,
    annotations: str | Path | None = None,
) -> SlidePlan:
    """Open the slide, find tissue, lay out the tiles and make an empty partial bundle with a
    fresh ``parts-…/`` folder for the tile tasks (arguments as :func:`run_slide`)."""
    started = datetime.now(UTC)
    timings = Timings()
    with timings.time("open_s"):
        wf = as_workflow(workflow)
        slide = open_slide(slide_path, mpp=mpp)
        check_stain(slide, wf.stain, wf.name)
        check_gates_fit(slide_path, slide, wf)
        spec = resolve_model(model or wf.model, stain="fluo" if wf.stain == "if" else "he")
        # a one-channel (fluorescence) model reads the workflow's nucleus channel of a multiplex slide
        one_channel = wf.stain == "if" and spec.n_channels == 1
        channel = nucleus_channel(wf, slide.channel_names, slide_path) if one_channel else None

    with timings.time("tissue_s"), skip_unreadable_tiles() as unreadable:
        tissue = detect_tissue(slide, mpp=wf.tissue.mpp, min_area_um2=wf.tissue.min_area_um2)
        # the model's µm/px, or the slide level's own where that is within 1 % (read unscaled)
        grid_mpp = slide.effective_mpp(spec.mpp)
        shape, tiles = plan_tiles(slide, tissue, grid_mpp, spec.max_nucleus_um, wf.segmentation)
        percentiles = slide_percentiles(slide, tissue, spec, channel)

    out_dir = Path(out_dir)
    name = slide_name(slide_path)
    partial = partial_dir(out_dir, name)
    with write_errors(partial):
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        # a fresh name per plan: a tile task left over from a killed run cannot write into this run
        parts = partial / f"parts-{uuid.uuid4().hex[:12]}"
        parts.mkdir(parents=True)

    seg = wf.segmentation
    job = SegmentJob(
        str(Path(slide_path).resolve()),
        slide.mpp,
        spec,
        grid_mpp,
        shape[1],
        str(parts),
        seg.prob_thresh,
        seg.nms_thresh,
        percentiles,
        wf.stain,
        tuple(slide.channel_names) if wf.stain == "if" else None,
        channel,
        inference_precision(),
        seg.second_view_saturation if wf.stain == "he" and spec.n_channels == 3 else None,
        seg.flips,
    )
    return SlidePlan(
        Path(slide_path),
        out_dir,
        name,
        partial,
        wf,
        spec,
        slide,
        tissue,
        grid_mpp,
        shape,
        tiles,
        percentiles,
        job,
        mpp,
        annotations,
        started,
        timings,
        unreadable,
    )


def segment_tile_reporting(job: SegmentJob, tile: Tile) -> dict:
    """:func:`segment_tile` with unreadable slide tiles read as glass (their nuclei are lost) and
    listed in ``<tile>.unreadable.json`` beside the tile's part, for :func:`finish_slide`."""
    with skip_unreadable_tiles() as unreadable:
        summary = segment_tile(job, tile)
    if unreadable:
        atomic_write(Path(job.parts_dir) / f"{tile.name}{UNREADABLE}", json.dumps(unreadable), unique=True)
    return summary


def submit_tiles(client: Client, plan: SlidePlan) -> list[Future]:
    """One task per tile of ``plan``; each returns a summary with timings (keys ending ``_s``).
    A task whose worker dies is rerun elsewhere by the scheduler (its part is written atomically)."""
    return client.map(
        segment_tile_reporting,
        [plan.job] * len(plan.tiles),
        plan.tiles,
        key=[f"segment-{plan.job.parts_dir}-{t.name}" for t in plan.tiles],
    )


def unreadable_tiles(plan: SlidePlan, parts: Path) -> list[dict]:
    """Every slide tile read as glass for ``plan`` (by this process or a tile task), once each,
    with its box in level-0 µm added."""
    found = plan.unreadable + [t for f in sorted(parts.glob(f"*{UNREADABLE}")) for t in json.loads(f.read_text())]
    unique = {(t["level"], t["y_px"], t["x_px"]): t for t in found}
    mpps = plan.slide.mpps
    return [
        {**t, **{f"{k}_um": round(t[f"{k}_px"] * mpps[t["level"]], 3) for k in ("x", "y", "width", "height")}}
        for _, t in sorted(unique.items())
    ]


def add_timings(totals: dict[str, float], summary: dict) -> None:
    """Add a tile summary's timings (keys ending ``_s``) to ``totals``."""
    for key, value in summary.items():
        if key.endswith("_s"):
            totals[key] = totals.get(key, 0.0) + value


def tile_finished(plan: SlidePlan, totals: dict[str, float], summary: dict) -> None:
    """A tile task of ``plan`` ended with ``summary``: its timings added to ``totals`` and, with
    ``plan.early``, its part read (:class:`EarlyFinish`). Every path that runs a slide's tiles
    (histo run, histo batch, napari) calls this."""
    add_timings(totals, summary)
    if plan.early is not None:
        plan.early.tile_done(summary["tile"])


def finish_slide(client: Client, plan: SlidePlan, task_totals: dict[str, float], show_progress: bool = True) -> Path:
    """After every tile task of ``plan`` has written its part: cell types, regions, metrics, exports,
    ``cells.parquet``, the label pyramid, then ``run.json`` and the rename; returns the bundle path.
    An OSError (disk full) becomes a HistoError and the partial bundle is removed."""
    with write_errors(plan.partial):
        return _analyse_and_write(client, plan, task_totals, show_progress)


def _analyse_and_write(client: Client, plan: SlidePlan, task_totals: dict[str, float], show_progress: bool) -> Path:
    timings, tiles, partial, parts = plan.timings, plan.tiles, plan.partial, Path(plan.job.parts_dir)
    clock = stopwatch()
    input_info, thumb = None, None
    if plan.early is not None:  # before this thread reads the slide: the early thread reads it too
        input_info, thumb, thumb_unreadable = plan.early.nucleus_free()
        plan.unreadable += thumb_unreadable
    cells, tile_index = read_cells(plan)
    drop = border_duplicates(cells[["x_um", "y_um"]].to_numpy(), cells["prob"].to_numpy(), tile_index)
    cells = cells[~drop].reset_index(drop=True)
    with skip_unreadable_tiles() as unreadable:
        extra, regions, metrics, structure_report = analyse_cells(
            cells, plan.slide, plan.tissue, plan.wf, plan.annotations
        )
        timings["structures_s"] = clock.stop()
        clock = stopwatch()
        # the table in memory is complete: the statistics and figures start on the workers while
        # cells.parquet is written (labels 1, 2, … in the parts' order, as concat_cells numbers them)
        cells = pd.concat([cells, extra], axis=1).assign(label=np.arange(1, len(cells) + 1, dtype=np.int32))
        pending = submit_outputs(cells, regions, plan.slide, plan.wf, client, thumb)
        try:
            n_cells, groups = concat_cells(parts, tiles, partial / "cells.parquet", plan.job.schema, extra, drop)
            if n_cells != len(cells):
                raise RuntimeError(f"cells.parquet has {n_cells} nuclei, the analysed table {len(cells)}")
            timings["cells_table_s"] = clock.stop()
            # the label pyramid is rasterised on the workers alongside the statistics, figures and exports
            zarr_path = partial / "labels.ome.zarr"
            arrays, label_tasks = _submit_labels(
                client, partial / "cells.parquet", groups, tiles, plan.shape, zarr_path, plan.grid_mpp
            )
        except BaseException:
            pending.cancel(client)
            raise
        try:
            timings.update(
                write_outputs(
                    partial,
                    plan.name,
                    cells,
                    regions,
                    metrics,
                    plan.slide,
                    plan.wf,
                    client,
                    structure_report,
                    pending,
                )
            )
        except BaseException:
            pending.cancel(client)
            client.cancel(label_tasks)  # nothing writes into the partial bundle once it is removed
            raise
    with stopwatch() as clock:
        _finish_labels(client, arrays, label_tasks, zarr_path, show_progress)
    timings["labels_s"] = clock.s  # waiting for them after the outputs
    plan.unreadable += unreadable
    tile_errors = unreadable_tiles(plan, parts)
    shutil.rmtree(parts)

    slide, tissue = plan.slide, plan.tissue
    input_info = input_info or file_fingerprint(plan.slide_path)
    run = {
        "status": "complete",
        "histo_version": __version__,
        "started": plan.started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "fingerprint": run_fingerprint(
            input_info["sha256"], plan.wf, plan.spec, plan.mpp, plan.annotations, plan.job.precision
        ),
        "input": {
            **input_info,
            "format": slide.format,
            "mpp": slide.mpp,
            "mpp_source": "argument" if plan.mpp else "file",
            "shape_px": list(slide.shape),
            "levels": len(slide.levels),
        },
        "workflow": plan.wf.as_dict(),
        "model": plan.spec.to_dict(),
        "parameters": {
            "grid_mpp": plan.grid_mpp,
            "grid_shape_px": list(plan.shape),
            "tile_px": tiles[0].x1 - tiles[0].x0 if tiles else None,
            "halo_px": tiles[0].halo if tiles else None,
            **dict(zip(("read_px", "kept_px"), pixels_read(tiles))),  # grid px the tiles read / keep nuclei in
            "percentiles": plan.percentiles,
            "precision": plan.job.precision,
        },
        "tissue": {"pieces": len(tissue.pieces), "area_mm2": sum(p.area for p in tissue.pieces) / 1e6},
        "n_tiles": len(tiles),
        "n_cells": n_cells,
        "n_border_duplicates_removed": int(drop.sum()),
        **structure_report,
        "timings_s": timings,
        "task_timings_s": task_totals,
        "versions": versions(),
        "tile_errors": tile_errors,
        "warnings": ([] if tiles else ["no tissue found: the bundle has no nuclei"])
        + (
            [f"{len(tile_errors)} unreadable slide tile(s) read as glass, their nuclei missing: see tile_errors"]
            if tile_errors
            else []
        ),
    }
    return publish(partial, plan.out_dir / plan.name, run)


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    workflow: str | Path | Workflow | dict | None = None,
    model: str | None = None,
    mpp: float | None = None,
    client: Client | None = None,
    show_progress: bool = True,
    annotations: str | Path | None = None,
) -> Path:
    """Analyse one slide and write its bundle ``out_dir/<slide name>/``.

    Parameters
    ----------
    slide_path : str or pathlib.Path
        The slide (OME-TIFF, SVS, NDPI, tiled or plain TIFF, PNG; histo.io.slide.open_slide).
    out_dir : str or pathlib.Path
        The folder the bundle goes into (created if missing).
    workflow : str, pathlib.Path, Workflow or dict, optional
        A preset name, a YAML path, a loaded :class:`histo.workflow.Workflow`, or a mapping
        (validated here); None: the defaults.
    model : str, optional
        Overrides the workflow's nucleus model (a folder, a shipped or registry name).
    mpp : float, optional
        µm/px of level 0: overrides or supplies the slide's pixel size.
    client : distributed.Client, optional
        The Dask cluster; None: a LocalCluster is started for this call and closed after it.
    show_progress : bool
        Progress bars on the console.
    annotations : str or pathlib.Path, optional
        A QuPath GeoJSON whose polygons become ``annotation`` regions.

    Returns
    -------
    pathlib.Path
        The bundle folder ``out_dir/<slide name>/`` (cells.parquet, labels.ome.zarr, run.json, …).

    Raises
    ------
    histo.errors.HistoError
        Bad input (slide, workflow, model, annotations) or a full disk, naming the file; also when
        another process writes the same bundle (:func:`histo.io.bundle.bundle_lock`). The partial
        bundle is removed on any error.
    """
    with bundle_lock(Path(out_dir), slide_name(slide_path)):
        plan = plan_slide(slide_path, out_dir, workflow, model, mpp, annotations)
        plan.early = EarlyFinish(plan)
        try:
            with nullcontext(client) if client else dask_client() as cl:
                with stopwatch() as clock, write_errors(plan.partial):
                    task_totals = _segment(cl, plan, show_progress)
                plan.timings["segment_s"] = clock.s
                return finish_slide(cl, plan, task_totals, show_progress)
        except BaseException:
            shutil.rmtree(plan.partial, ignore_errors=True)
            raise
