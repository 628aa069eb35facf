"""``histo run`` against StarDist's own tiling (``predict_instances_big``) on one generated slide.

    python bench/throughput.py [--quick] [--size PX] [--workers 2] [--rounds 3] [--scaling] [--no-float32]
                               [--baseline-precision P] [--workdir DIR]

The slide is a generated lymph node at the model's pixel size (0.25 µm/px for ``histo-he``), so both
paths see the same pixels, with the same model and thresholds:

(a) ``histo run`` end to end (read, tissue, segment, features, cell types, regions, neighbourhood
    statistics, write) on a LocalCluster whose workers were warmed by a run on a small slide (and
    that slide's neighbourhood statistics in every worker: Squidpy's numba compiles per process),
    with one view of each tile as (b) and (c) take (``segmentation.second_view_saturation: null``);
(a') the same with the workflow as shipped, whose second, greyer view of each tile runs the network
    twice (histo.segment.task.predict_tile): its cost over (a) is ``second_view_cost``;
(b) the path a StarDist user would take instead: the whole image in memory (reading and
    normalising it is not timed) through ``StarDist2D.predict_instances_big`` with the StarDist
    docs' blocks (4096 px or the image's edge if smaller, overlap 128, context 128), in this process,
    TensorFlow's default threads, in the same precision as (a) (``--baseline-precision`` to change);
(c) the same as (b) in float32, as StarDist runs out of the box: the comparison this bench made
    before, beside the like-for-like one. Skipped where (b) is already float32 or with ``--no-float32``.
    It runs after (b) in the same process, so its peak memory includes what (b) left behind.

(a) runs in ``histo.segment.models.inference_precision()`` (``$HISTO_PRECISION``, default ``auto``:
bfloat16 where the CPU has bfloat16 units, float32 elsewhere).

Nuclei of (a), rasterised from ``cells.parquet``, are matched one-to-one to (b)'s (and (c)'s) label
image at IoU ≥ 0.5. Each path is timed ``--rounds`` times in a row (the 2 cores' speed swings from
moment to moment, STACK.md) and the medians are compared. ``--scaling`` also times (a) with one
worker. Peak memory is the summed RSS of this process and its children during each path.

Throughput of (a) is reported three ways: tissue Mpx per second end to end (the tissue's area at the
model's µm/px over the run's wall time), tissue Mpx per second of segmentation (over the run's
``segment_s``, the tile tasks' wall time) and pixels processed per second of segmentation: the sum of
every tile's read box (the part of its core near tissue, ``Tile.box``, plus the halo: ``read_px`` in
the bundle's ``run.json``) over the same ``segment_s``. The ratio read px / kept core px is the halo
overhead; read px / tissue px adds the glass inside tiles. The last line is ``speedup=<b/a>
speedup_float32=<c/a> second_view_cost=<a'/a> agreement_f1=<F1 of a against b> mpx_per_s=<tissue Mpx/s of a, end to end>
read_mpx_per_s=<read Mpx/s of a's segmentation> halo_overhead=<read px / kept core px>``
(``speedup_float32`` only where (c) ran).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import tifffile
from memwatch import timed

from histo.run.cluster import dask_client
from histo.run.pipeline import run_slide
from histo.segment.models import (
    PRECISIONS,
    inference_precision,
    load_model,
    normalize_image,
    resolve_model,
    use_precision,
)
from histo.segment.task import warm_worker
from histo.stats.neighbourhood import NeighbourhoodParams, input_columns, neighbourhood_stats
from histo.train.evaluate import bundle_labels, score
from histo.workflow import Workflow, load_workflow
from histo_sample import write_sample

BIG = {"block_size": 4096, "min_overlap": 128, "context": 128}  # block_size at most the image's edge


def _rounded(walls: list[float]) -> list[float]:
    return [round(w, 1) for w in walls]


def generated(workdir: Path, size: int, mpp: float, seed: int = 7) -> Path:
    path = workdir / f"ln-{size}-{mpp}.ome.tif"
    if not path.exists():
        write_sample("lymph-node", path, size=size, seed=seed, mpp=mpp)
    return path


def with_segmentation(workflow: str, **changes):
    """The workflow ``workflow`` with ``changes`` to its ``segmentation:`` section (``tile_um=…``, ``halo_um=…``)."""
    wf = load_workflow(workflow)
    return wf.replace(segmentation=wf.segmentation.replace(**changes))


def warm_statistics(bundle: Path, params: NeighbourhoodParams) -> None:
    """The neighbourhood statistics of ``bundle``'s cells, for their numba JIT in this worker."""
    cells = pd.read_parquet(bundle / "cells.parquet")
    neighbourhood_stats(cells[input_columns(cells, params)], params)


def histo_run(slide: Path, warm: Path, out: Path, workflow: Workflow, model: str, workers: int, rounds: int):
    """Load the model in every worker, run ``warm`` (first imports, JIT) and its statistics in every
    worker (the run computes them in one; Squidpy compiles them per process), then time ``slide``
    ``rounds`` times: (bundle, median wall s, wall s of each round, peak GB of the first round, run.json)."""
    with dask_client(n_workers=workers) as client:
        client.run(warm_worker, resolve_model(model), inference_precision())
        warmed = run_slide(warm, out / "warm", workflow, model=model, client=client, show_progress=False)
        client.run(warm_statistics, warmed, workflow.neighbourhood)
        walls, peak = [], 0.0
        for r in range(rounds):
            bundle, wall, round_peak = timed(
                run_slide, slide, out / f"w{workers}-{r}", workflow, model=model, client=client, show_progress=False
            )
            walls.append(wall)
            peak = peak or round_peak
    return bundle, statistics.median(walls), walls, peak, json.loads((bundle / "run.json").read_text())


def stardist_big(slide: Path, model: str, precision: str, rounds: int):
    """(label image, median wall s, wall s of each round, peak GB) of ``predict_instances_big`` on
    the level-0 image in memory, ``rounds`` times after an untimed run (as histo's workers, warm: a
    cohort's blocks share one shape, so a StarDist user pays the graph's tracing once)."""
    spec = resolve_model(model)
    use_precision(precision)
    net = load_model(spec)
    x = normalize_image(tifffile.imread(slide, level=0), spec)
    big = BIG | {"block_size": min(BIG["block_size"], *x.shape[:2])}
    net.predict_instances_big(x, axes="YXC", show_progress=False, **big)  # untimed: traces the block's graph
    walls, peak = [], 0.0
    for _ in range(rounds):
        (labels, _), wall, round_peak = timed(net.predict_instances_big, x, axes="YXC", show_progress=False, **big)
        walls.append(wall)
        peak = max(peak, round_peak)
    return labels, statistics.median(walls), walls, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2,048² slide: a smoke test (a few minutes)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each path; medians are compared (default 3)")
    ap.add_argument("--size", type=int, default=6144, help="slide edge, px (default 6144)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scaling", action="store_true", help="also time histo run with one worker")
    ap.add_argument("--workflow", default="lymph-node-he")
    ap.add_argument("--model", help="default: the workflow's")
    ap.add_argument(
        "--baseline-precision", choices=PRECISIONS[1:], help="(b)'s precision; default: histo's (inference_precision)"
    )
    ap.add_argument("--no-float32", action="store_true", help="skip the float32 baseline (c)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "histo-throughput")
    args = ap.parse_args()
    size = 2048 if args.quick else args.size
    model = args.model or load_workflow(args.workflow).model
    mpp = resolve_model(model).mpp
    precision = inference_precision()
    baseline_precision = args.baseline_precision or precision
    args.workdir.mkdir(parents=True, exist_ok=True)
    slide, warm = generated(args.workdir, size, mpp), generated(args.workdir, 1024, mpp, seed=1)  # 257 nuclei

    out = args.workdir / "out"
    one_view = with_segmentation(args.workflow, second_view_saturation=None)  # the peer's work: one view
    bundle, t_a, walls_a, mem_a, run = histo_run(slide, warm, out, one_view, model, args.workers, args.rounds)
    read_px, core_px = run["parameters"]["read_px"], run["parameters"]["kept_px"]
    steps = {k.removesuffix("_s"): round(v, 1) for k, v in run["timings_s"].items()}
    tasks = {k.removesuffix("_s"): round(v, 1) for k, v in run["task_timings_s"].items()}
    print(
        f"(a) histo run ({run['parameters']['precision']}): median {t_a:.1f} s of {_rounded(walls_a)}, "
        f"{run['n_tiles']} tiles, "
        f"{run['n_cells']} nuclei; last round's steps (s) {steps}; summed over tile tasks (s) {tasks}",
        flush=True,
    )
    labels_a, _ = bundle_labels(bundle)
    labels_b, t_b, walls_b, mem_b = stardist_big(slide, model, baseline_precision, args.rounds)
    f1 = score(labels_b, labels_a)["f1"]
    print(
        f"(b) predict_instances_big ({baseline_precision}): median {t_b:.1f} s of {_rounded(walls_b)}, "
        f"{int(labels_b.max())} nuclei, agreement F1 with (a) {f1:.4f}, peak {mem_b:.2f} GB",
        flush=True,
    )
    del labels_b
    t_c = None
    if baseline_precision != "float32" and not args.no_float32:
        labels_c, t_c, walls_c, mem_c = stardist_big(slide, model, "float32", args.rounds)
        print(
            f"(c) predict_instances_big (float32): median {t_c:.1f} s of {_rounded(walls_c)}, "
            f"{int(labels_c.max())} nuclei, agreement F1 with (a) {score(labels_c, labels_a)['f1']:.4f}, "
            f"peak {mem_c:.2f} GB (after (b) in this process); speedup of (a) over (c) {t_c / t_a:.2f}",
            flush=True,
        )
        del labels_c
    tissue_mpx = run["tissue"]["area_mm2"] / mpp**2  # mm² / (µm/px)² = Mpx
    default = load_workflow(args.workflow)
    t_two = None
    if default.segmentation.second_view_saturation is not None:
        _, t_two, walls_two, _, run_two = histo_run(slide, warm, out, default, model, args.workers, args.rounds)
        print(
            f"(a') histo run as shipped, with the second view (saturation × "
            f"{default.segmentation.second_view_saturation}): median {t_two:.1f} s of {_rounded(walls_two)}, "
            f"{run_two['n_cells']} nuclei; {t_two / t_a:.2f}× (a)'s time, {tissue_mpx / t_two:.3f} tissue Mpx/s",
            flush=True,
        )
    if args.scaling:
        _, t_1, walls_1, _, _ = histo_run(slide, warm, out, one_view, model, 1, args.rounds)
        print(
            f"scaling: 1 worker median {t_1:.1f} s of {_rounded(walls_1)}, {args.workers} workers {t_a:.1f} s, "
            f"throughput ratio {t_1 / t_a:.2f}",
            flush=True,
        )
    segment_s = run["timings_s"]["segment_s"]  # the last round's
    print(
        f"slide {size}² at {mpp} µm/px, tissue {tissue_mpx:.1f} Mpx of {size * size / 1e6:.1f} Mpx; "
        f"tiles read {read_px / 1e6:.1f} Mpx for {core_px / 1e6:.1f} Mpx of cores near tissue "
        f"(halo overhead {read_px / core_px:.2f}×, {read_px / 1e6 / tissue_mpx:.2f}× the tissue); "
        f"last round's segmentation {segment_s:.1f} s: {tissue_mpx / segment_s:.3f} tissue Mpx/s, "
        f"{read_px / 1e6 / segment_s:.3f} read Mpx/s; peak memory histo {mem_a:.2f} GB, "
        f"predict_instances_big ({baseline_precision}) {mem_b:.2f} GB"
    )
    float32 = f" speedup_float32={t_c / t_a:.2f}" if t_c is not None else ""
    two = f" second_view_cost={t_two / t_a:.2f}" if t_two is not None else ""
    print(
        f"speedup={t_b / t_a:.2f}{float32}{two} agreement_f1={f1:.4f} mpx_per_s={tissue_mpx / t_a:.3f} "
        f"read_mpx_per_s={read_px / 1e6 / segment_s:.3f} halo_overhead={read_px / core_px:.3f}"
    )


if __name__ == "__main__":
    main()
