"""Nuclei of ``histo run`` against the generated ground truth (F1 at 3 µm), per kind and pixel size,
and the tiled result against one whole-image StarDist prediction of the same slide (F1 at 1 µm).

    python bench/accuracy_generated.py [--size-um 1024] [--model histo-he] [--workdir /tmp/histo-acc]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from histo.run.cluster import dask_client
from histo.run.pipeline import run_slide
from histo.segment.nuclei import id_centres_um
from histo.segment.task import whole_image_centres
from histo.train.matching import match_points
from histo_sample import write_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-um", type=float, default=1024.0)
    ap.add_argument("--model", default="histo-he")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/histo-acc"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    with dask_client(n_workers=2) as client:
        for kind, workflow in (("lymph-node", "lymph-node-he"), ("synovium", "synovium-he")):
            for mpp in (0.5, 0.25):
                slide = args.workdir / f"{kind}-{mpp}.ome.tif"
                write_sample(kind, slide, size=int(args.size_um / mpp), seed=11, mpp=mpp)
                bundle = run_slide(
                    slide, args.workdir / "out", workflow, model=args.model, client=client, show_progress=False
                )
                cells = pd.read_parquet(bundle / "cells.parquet")
                truth = pd.read_parquet(str(slide).replace(".ome.tif", ".truth.parquet"))
                m = match_points(cells[["x_um", "y_um"]].to_numpy(), truth[["x_um", "y_um"]].to_numpy(), 3.0)
                lymph = (cells.cell_type.to_numpy()[m.pred_idx] == "lymphocyte") == (
                    truth.cell_type.to_numpy()[m.true_idx] == "lymphocyte"
                )
                run = json.loads((bundle / "run.json").read_text())
                params = run["parameters"]
                tiled = id_centres_um(cells.cell_id, params["grid_shape_px"][1], params["grid_mpp"])
                seg = run["workflow"]["segmentation"]  # as the tiles did
                whole = client.submit(
                    whole_image_centres, str(slide), args.model, seg["second_view_saturation"], seg["flips"], pure=False
                ).result()
                mw = match_points(tiled, whole, 1.0)
                print(
                    f"{kind} mpp={mpp}: n_truth={m.n_true} n_found={m.n_pred} F1@3um={m.f1:.4f} "
                    f"precision={m.precision:.4f} recall={m.recall:.4f} lymphocyte_agreement={lymph.mean():.4f} "
                    f"tiles={run['n_tiles']} F1_tiled_vs_whole@1um={mw.f1:.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
