"""Tile size against work per tissue pixel: halo overhead, segmentation time and memory, NMS vs network.

    python bench/tile_overhead.py [--quick] [--size 6144] [--tiles-um 256 384 512] [--rounds 1]
                                  [--workers 2] [--nms-repeats 3] [--workdir DIR]

One generated lymph node at the model's pixel size (the slide of ``bench/throughput.py``, 6,144² by
default; ``--quick``: 2,048², a smoke test). For each tile core edge in ``--tiles-um`` (the workflow's
``segmentation.tile_um``; 256 µm, 1,024 px at 0.25 µm/px, is the default) the tiles are laid out as
``histo run`` lays them out (``plan_slide``), and:

- halo overhead: the summed read boxes (core + halo, clipped to the slide) over the summed cores, and
  the read px over the tissue px (glass inside tiles counts too);
- segmentation: the tile tasks alone (``submit_tiles``, what ``histo run`` times as ``segment_s``) on
  a fresh LocalCluster of ``--workers`` workers (fresh per tile size, so no worker keeps a larger
  size's high-water memory), warmed by loading the model and predicting one interior tile's shape of
  zeros; its wall time, that time per tissue Mpx, the tile tasks' summed step times, and the peak of
  the summed RSS of this process and the workers during the tasks (and the idle RSS of the warm
  cluster before them, so the part the tiles add is visible);
- one tile's StarDist time split at StarDist's own phases (``_predict_instances_generator``, the
  path ``predict_instances`` takes): the network (with the sparse gathering of candidates above the
  probability threshold) and the non-maximum suppression (``_instances_from_prediction`` without
  labels, as the tile task calls it), on the interior tile with the most tissue, in this process on
  one thread as a worker runs, after the clusters are gone; the median of ``--nms-repeats``.

``--rounds`` repeats the cluster timings, interleaving the tile sizes (the 2 cores' speed swings,
STACK.md); medians are reported. The last line is ``best_tile_um=<the size with the least
segmentation time per tissue px> time_ratio=<its time / the first size's> peak_ratio=<its peak /
the first size's>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from distributed import as_completed
from memwatch import PeakRSS, tree_rss
from throughput import generated, with_segmentation

from histo.run.cluster import dask_client
from histo.run.pipeline import add_timings, plan_slide, submit_tiles
from histo.segment.models import inference_precision, normalize_image, resolve_model
from histo.segment.task import warm_worker
from histo.segment.tiling import pixels_read
from histo.workflow import load_workflow

ONE_THREAD = {"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def interior(tiles):
    """The tiles whose read box is the full core + 2 halos (no slide edge)."""
    full = max(t.read_box[2] * t.read_box[3] for t in tiles)
    return [t for t in tiles if t.read_box[2] * t.read_box[3] == full]


def warm_shape(spec, precision: str, shape: tuple[int, int]) -> None:
    """In a worker: the model loaded and one prediction of ``shape`` (an interior tile's read box) done."""
    from histo.segment.task import _model

    warm_worker(spec, precision)
    _model(spec, precision).predict(np.zeros((*shape, spec.n_channels), np.float32), axes="YXC")


def time_segmentation(slide: Path, out: Path, wf, model: str, workers: int) -> dict:
    """Lay out ``wf``'s tiles, then run only the tile tasks on a fresh warm cluster: wall s, peak and idle GB."""
    plan = plan_slide(slide, out, wf, model)
    try:
        inner = interior(plan.tiles)[0].read_box
        with dask_client(n_workers=workers) as client:
            client.run(warm_shape, plan.spec, plan.job.precision, (inner[3], inner[2]))
            time.sleep(1)
            idle = tree_rss(psutil.Process()) / 1e9
            totals: dict[str, float] = {}
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                for future in as_completed(submit_tiles(client, plan)):
                    add_timings(totals, future.result())
                wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(plan.partial, ignore_errors=True)
    return {"wall": wall, "peak": peak.gb, "idle": idle, "totals": totals, "plan": plan}


def stardist_phases(plan, repeats: int) -> dict:
    """Network and NMS seconds (medians) of StarDist on the interior tile with the most tissue, in this process."""
    from histo.segment.task import _model

    mask, scale = plan.tissue.mask, plan.tissue.mpp / plan.grid_mpp

    def tissue_px(t):
        x, y, w, h = t.read_box
        return mask[int(y // scale) : int((y + h) // scale), int(x // scale) : int((x + w) // scale)].sum()

    tile = max(interior(plan.tiles), key=tissue_px)
    model = _model(plan.spec, plan.job.precision)
    x = normalize_image(plan.slide.read(*tile.read_box, mpp=plan.grid_mpp), plan.spec, plan.percentiles)
    phases = {"network": [], "nms": []}
    n = 0
    for _ in range(repeats + 1):  # the first: untimed (this shape's first run)
        marks = {}
        gen = model._predict_instances_generator(
            x,
            axes="YXC",
            prob_thresh=plan.job.prob_thresh,
            nms_thresh=plan.job.nms_thresh,
            return_labels=False,
            show_tile_progress=False,
        )
        for step in gen:
            if isinstance(step, str):
                marks.setdefault(step, time.perf_counter())
            else:
                marks["end"] = time.perf_counter()
                n = len(step[1]["points"])
        phases["network"].append(marks["nms"] - marks["predict"])
        phases["nms"].append(marks["end"] - marks["nms"])
    net, nms = (statistics.median(v[1:]) for v in phases.values())
    w, h = tile.read_box[2:]
    return {"tile": tile.name, "box": (w, h), "network": net, "nms": nms, "nuclei": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2,048² slide: a smoke test")
    ap.add_argument("--size", type=int, default=6144, help="slide edge, px (default 6144)")
    ap.add_argument("--tiles-um", type=float, nargs="+", default=[256.0, 384.0, 512.0], help="tile core edges, µm")
    ap.add_argument("--rounds", type=int, default=1, help="timed segmentations per tile size, interleaved")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--nms-repeats", type=int, default=3)
    ap.add_argument("--workflow", default="lymph-node-he")
    ap.add_argument("--model", help="default: the workflow's")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "histo-tile-overhead")
    args = ap.parse_args()
    for key, value in ONE_THREAD.items():  # this process's StarDist phases run on one thread, as a worker's
        os.environ.setdefault(key, value)
    size = 2048 if args.quick else args.size
    model = args.model or load_workflow(args.workflow).model
    mpp = resolve_model(model).mpp
    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = generated(args.workdir, size, mpp)
    print(f"slide {size}² at {mpp} µm/px, {inference_precision()}, {args.workers} workers", flush=True)

    runs: dict[float, list[dict]] = {t: [] for t in args.tiles_um}
    for r in range(args.rounds):
        for tile_um in args.tiles_um:
            res = time_segmentation(
                slide,
                args.workdir / "out",
                with_segmentation(args.workflow, tile_um=tile_um, second_view_saturation=None),
                model,
                args.workers,
            )
            runs[tile_um].append(res)
            print(f"  round {r} tile {tile_um:g} µm: {res['wall']:.1f} s, peak {res['peak']:.2f} GB", flush=True)

    rows = {}
    for tile_um, results in runs.items():
        plan = results[-1]["plan"]
        tiles = plan.tiles
        read, core = pixels_read(tiles)
        tissue_mpx = sum(p.area for p in plan.tissue.pieces) / plan.grid_mpp**2 / 1e6  # µm² / (µm/px)²
        wall = statistics.median(r["wall"] for r in results)
        peak = statistics.median(r["peak"] for r in results)
        idle = statistics.median(r["idle"] for r in results)
        totals = {k.removesuffix("_s"): round(v, 1) for k, v in results[-1]["totals"].items()}
        rows[tile_um] = {"wall": wall, "per_mpx": wall / tissue_mpx, "peak": peak}
        edge = tiles[0].x1 - tiles[0].x0
        print(
            f"tile {tile_um:g} µm ({edge} px core, halo {tiles[0].halo} px): {len(tiles)} tiles, "
            f"read {read / 1e6:.1f} Mpx / cores {core / 1e6:.1f} Mpx = halo overhead {read / core:.3f}×, "
            f"read / tissue {read / 1e6 / tissue_mpx:.3f}×; segmentation median {wall:.1f} s of "
            f"{[round(r['wall'], 1) for r in results]} = {wall / tissue_mpx:.3f} s per tissue Mpx, "
            f"{read / 1e6 / wall:.3f} read Mpx/s; peak {peak:.2f} GB (idle cluster {idle:.2f} GB); "
            f"summed over tile tasks (s) {totals}",
            flush=True,
        )

    for tile_um, results in runs.items():
        ph = stardist_phases(results[-1]["plan"], args.nms_repeats)
        total = ph["network"] + ph["nms"]
        w, h = ph["box"]
        print(
            f"tile {tile_um:g} µm, one tile ({ph['tile']}, {w}×{h} px, {ph['nuclei']} nuclei) on one thread: "
            f"network {ph['network']:.2f} s, NMS {ph['nms']:.2f} s = {ph['nms'] / total:.0%} of StarDist's "
            f"{total:.2f} s ({w * h / 1e6 / total:.2f} read Mpx/s; network {w * h / 1e6 / ph['network']:.2f}, "
            f"NMS {w * h / 1e6 / ph['nms']:.2f} Mpx/s)",
            flush=True,
        )

    first = args.tiles_um[0]
    best = min(rows, key=lambda t: rows[t]["per_mpx"])
    print(
        f"best_tile_um={best:g} time_ratio={rows[best]['wall'] / rows[first]['wall']:.3f} "
        f"peak_ratio={rows[best]['peak'] / rows[first]['peak']:.3f}"
    )


if __name__ == "__main__":
    main()
