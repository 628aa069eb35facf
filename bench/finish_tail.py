"""How long ``histo run`` takes after its last tile: the finish that follows segmentation, step by step.

    python bench/finish_tail.py [--quick] [--size 6144] [--rounds 2] [--workers 2] [--workdir DIR]

One generated lymph node at the model's pixel size (6,144² by default, the throughput bench's slide;
``--quick``: 2,048²), ``histo run`` on a LocalCluster warmed as ``bench/throughput.py`` warms it (a
small slide's run and its statistics in every worker), ``--rounds`` times. For each round: the run's
wall time, its segmentation (``segment_s``: submission of the tile tasks to the last one's result)
and the finish after the last tile, the wall time less open, tissue and segmentation, with run.json's
steps of it (``structures_s`` … ``labels_s``) and the untimed rest (reading the slide's SHA-256 for
the fingerprint, run.json, the rename). It also times, in this process, the work of the finish that
depends on no nucleus and so could run while the tiles do: the slide file's SHA-256
(``file_fingerprint``) and the report's thumbnail. The last line is ``finish_s=<median finish>
finish_share=<median finish / median wall>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from throughput import generated, warm_statistics

from histo.io.bundle import file_fingerprint
from histo.io.slide import open_slide
from histo.outputs.report import thumbnail
from histo.run.cluster import dask_client
from histo.run.pipeline import run_slide
from histo.segment.models import inference_precision, resolve_model
from histo.segment.task import warm_worker
from histo.workflow import load_workflow

FINISH_STEPS = ("structures_s", "cells_table_s", "neighbourhood_s", "exports_s", "report_s", "labels_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2,048² slide")
    ap.add_argument("--size", type=int, default=6144, help="slide edge, px (default 6144)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workflow", default="lymph-node-he")
    ap.add_argument("--model", help="default: the workflow's")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "histo-throughput")
    args = ap.parse_args()
    size = 2048 if args.quick else args.size
    model = args.model or load_workflow(args.workflow).model
    mpp = resolve_model(model).mpp
    args.workdir.mkdir(parents=True, exist_ok=True)
    slide, warm = generated(args.workdir, size, mpp), generated(args.workdir, 1024, mpp, seed=1)
    out = args.workdir / "finish"

    walls, finishes = [], []
    with dask_client(n_workers=args.workers) as client:
        client.run(warm_worker, resolve_model(model), inference_precision())
        warmed = run_slide(warm, out / "warm", args.workflow, model=model, client=client, show_progress=False)
        client.run(warm_statistics, warmed, load_workflow(args.workflow).neighbourhood)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            bundle = run_slide(slide, out / f"r{r}", args.workflow, model=model, client=client, show_progress=False)
            wall = time.perf_counter() - t0
            run = json.loads((bundle / "run.json").read_text())
            t = run["timings_s"]
            finish = wall - t["open_s"] - t["tissue_s"] - t["segment_s"]
            steps = {k.removesuffix("_s"): round(t[k], 2) for k in FINISH_STEPS}
            rest = finish - sum(t[k] for k in FINISH_STEPS)
            walls.append(wall)
            finishes.append(finish)
            print(
                f"round {r}: wall {wall:.2f} s, {run['n_tiles']} tiles, {run['n_cells']} nuclei, segmentation "
                f"{t['segment_s']:.2f} s, finish after the last tile {finish:.2f} s ({finish / wall:.0%}): "
                f"{steps}, untimed rest {rest:.2f} s",
                flush=True,
            )

    opened = open_slide(slide)
    t0 = time.perf_counter()
    file_fingerprint(slide)
    sha_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    thumbnail(opened)
    thumb_s = time.perf_counter() - t0
    print(
        f"independent of the nuclei: SHA-256 of the {slide.stat().st_size / 1e6:.1f} MB slide {sha_s:.3f} s, "
        f"thumbnail {thumb_s:.3f} s"
    )
    finish, wall = statistics.median(finishes), statistics.median(walls)
    print(f"finish_s={finish:.2f} finish_share={finish / wall:.3f}")


if __name__ == "__main__":
    main()
