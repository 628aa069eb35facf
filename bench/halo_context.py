"""How wide a tile's halo must be: agreement with StarDist's own whole-slide prediction against pixels read.

    python bench/halo_context.py [--quick] [--halos-um 8 12 16 20 28] [--workers 2] [--workdir DIR]

Each tile reads its core (the part near tissue) plus a halo on every side; the U-Net's outputs at a
core pixel depend on its receptive field (about 100 px at the model's µm/px for ``histo-he``'s U-Net
of depth 3, by the layer arithmetic; StarDist's own estimate, ``_axes_tile_overlap``, says 94), and a
kept nucleus reaches past its tile's box by at most its radius. A wider halo reads more pixels; a
narrower one can change the nuclei found near tile borders. For each halo in ``--halos-um`` (the
workflow's ``segmentation.halo_um``) and each slide:

- the pixels the tiles read (``read_px`` in the bundle's ``run.json``);
- ``histo run``'s segmentation wall time (``segment_s``) on a warm LocalCluster of ``--workers``;
- the agreement of its nuclei with StarDist's ``predict_instances_big`` on the whole slide read at the
  model's µm/px (the StarDist docs' blocks of ``bench/throughput.py``: 4096 px, overlap 128, context
  128), normalised with the same percentiles: F1 of the StarDist centres matched one-to-one within
  1 µm.

Slides: the generated lymph node of ``bench/throughput.py`` (6,144²; ``--quick``: 2,048²) and, where
``../shared`` is present, the real ``CMU-1-Small-Region.svs`` (skin, 0.499 µm/px, read at 0.25).
The default halo (``histo.segment.tiling.halo_px`` for the workflow's model) is always among those
measured. The last line is ``default_halo_um=<it> read_ratio=<its read px / the widest halo's,
summed over the slides> f1_drop=<the widest halo's F1 less its F1, on the slide where that is
largest>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
from throughput import BIG, generated, with_segmentation

from histo.run.cluster import dask_client
from histo.run.pipeline import plan_slide, run_slide
from histo.segment.labels import rasterise
from histo.segment.models import inference_precision, load_model, normalize_image, resolve_model, use_precision
from histo.segment.task import warm_worker
from histo.segment.tiling import halo_px
from histo.train.evaluate import score
from histo.workflow import load_workflow

CMU1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmu1_small_region" / "CMU-1-Small-Region.svs"


def grid_labels(polygons_um: np.ndarray, plan) -> np.ndarray:
    """Label image of ``polygons_um`` (shapely, µm) on ``plan``'s grid (the model's µm/px)."""
    return rasterise(polygons_um, np.arange(1, len(polygons_um) + 1), plan.grid_mpp, (0, 0), plan.shape)


def stardist_labels(slide: Path, out: Path, workflow: str):
    """Label image, on the grid of the model's µm/px, of the nuclei StarDist's ``predict_instances_big``
    finds on the whole slide read at that µm/px and normalised with the slide percentiles histo's tiles
    use; and the plan."""
    plan = plan_slide(slide, out, workflow)
    shutil.rmtree(plan.partial)  # only its layout and percentiles were needed
    use_precision(plan.job.precision)
    net = load_model(plan.spec)
    h, w = plan.shape
    x = normalize_image(plan.slide.read(0, 0, w, h, mpp=plan.grid_mpp), plan.spec, plan.percentiles)
    big = BIG | {"block_size": min(BIG["block_size"], *x.shape[:2])}
    _, polys = net.predict_instances_big(
        x, axes="YXC", prob_thresh=plan.job.prob_thresh, nms_thresh=plan.job.nms_thresh, show_progress=False, **big
    )
    coord = (polys["coord"] + 0.5) * plan.grid_mpp  # (n, 2, rays) as (y, x) µm
    return grid_labels(shapely.polygons(np.stack([coord[:, 1], coord[:, 0]], axis=-1)), plan), plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2,048² generated slide, and no CMU-1")
    ap.add_argument("--halos-um", type=float, nargs="+", default=[8.0, 12.0, 16.0, 20.0, 28.0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workflow", default="lymph-node-he")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "histo-halo")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = load_workflow(args.workflow).model
    spec = resolve_model(model)
    default = halo_px(spec.max_nucleus_um, spec.mpp) * spec.mpp
    halos = sorted(set(args.halos_um) | {default})
    slides = [generated(args.workdir, 2048 if args.quick else 6144, 0.25)]
    if not args.quick:
        if CMU1.is_file():
            slides.append(CMU1)
        else:
            print(f"no {CMU1}: real tissue skipped", flush=True)
    print(f"halos {halos} µm, {inference_precision()}, {args.workers} workers", flush=True)

    rows = []
    with dask_client(n_workers=args.workers) as client:
        for slide in slides:
            out = args.workdir / "out" / slide.stem
            shutil.rmtree(out, ignore_errors=True)
            reference, plan = stardist_labels(slide, out, args.workflow)
            client.run(warm_worker, plan.spec, plan.job.precision)
            run_slide(slide, out / "warm", args.workflow, client=client, show_progress=False)  # untimed
            for halo in halos:
                wf = with_segmentation(
                    args.workflow, halo_um=halo, second_view_saturation=None
                )  # as StarDist: one view
                bundle = run_slide(slide, out / f"halo{halo:g}", wf, client=client, show_progress=False)
                run = json.loads((bundle / "run.json").read_text())
                read, segment_s = run["parameters"]["read_px"], run["timings_s"]["segment_s"]
                polygons = pq.read_table(bundle / "cells.parquet", columns=["polygon"]).column("polygon")
                labels = grid_labels(shapely.from_wkb(polygons.to_numpy(zero_copy_only=False)), plan)
                f1 = score(reference, labels)["f1"]
                rows.append(
                    {
                        "slide": slide.stem,
                        "halo_um": halo,
                        "read_mpx": read / 1e6,
                        "segment_s": segment_s,
                        "nuclei": int(labels.max()),
                        "f1": f1,
                    }
                )
                r = rows[-1]
                print(
                    f"{slide.stem}: halo {halo:g} µm ({halo / plan.grid_mpp:.0f} px): read {r['read_mpx']:.1f} Mpx, "
                    f"segmentation {r['segment_s']:.1f} s, {r['nuclei']} nuclei (StarDist {int(reference.max())}), "
                    f"agreement F1 {f1:.5f}",
                    flush=True,
                )
    table = pd.DataFrame(rows)
    f1 = table.pivot(index="halo_um", columns="slide", values="f1")
    read = table.groupby("halo_um")["read_mpx"].sum()
    widest = max(halos)
    print(
        f"default_halo_um={default:g} read_ratio={read[default] / read[widest]:.3f} "
        f"f1_drop={(f1.loc[widest] - f1.loc[default]).max():.5f}"
    )


if __name__ == "__main__":
    main()
