"""Nuclei of ``histo run`` against the generated ground truth (F1 at 3 µm), per kind and pixel size,
and the tiled result against one whole-image StarDist prediction of the same slide (F1 at 1 µm).

    python bench/accuracy_generated.py [--size-um 1024] [--model histo-he] [--workdir /tmp/histo-acc]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from histo.cluster import dask_client
from histo.matching import match_points
from histo.pipeline import run_slide
from histo_sample import write_sample


def whole_image_centres(slide_path: str, model_name: str) -> np.ndarray:
    """StarDist centres (µm) on the whole slide image at once (in a worker: no TensorFlow here)."""
    from histo.models import load_model, normalize_image, resolve_model
    from histo.slide import open_slide

    spec = resolve_model(model_name)
    slide = open_slide(slide_path)
    mpp = slide.effective_mpp(spec.mpp)
    h, w = (int(np.ceil(s * slide.mpp / mpp)) for s in slide.shape)
    img = normalize_image(slide.read(0, 0, w, h, mpp=mpp), spec)
    _, det = load_model(spec).predict_instances(img, axes="YXC", return_labels=False, show_tile_progress=False)
    return (det["points"][:, ::-1] + 0.5) * mpp


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
                bundle = run_slide(slide, args.workdir / "out", workflow, model=args.model, client=client, show_progress=False)
                cells = pd.read_parquet(bundle / "cells.parquet")
                truth = pd.read_parquet(str(slide).replace(".ome.tif", ".truth.parquet"))
                m = match_points(cells[["x_um", "y_um"]].to_numpy(), truth[["x_um", "y_um"]].to_numpy(), 3.0)
                lymph = (cells.cell_type.to_numpy()[m.pred_idx] == "lymphocyte") == (truth.cell_type.to_numpy()[m.true_idx] == "lymphocyte")
                run = json.loads((bundle / "run.json").read_text())
                grid_w, grid_mpp = run["parameters"]["grid_shape_px"][1], run["parameters"]["grid_mpp"]
                tiled = np.stack([(cells.cell_id % grid_w + 0.5) * grid_mpp, (cells.cell_id // grid_w + 0.5) * grid_mpp], 1)
                whole = client.submit(whole_image_centres, str(slide), args.model, pure=False).result()
                mw = match_points(tiled, whole, 1.0)
                print(f"{kind} mpp={mpp}: n_truth={m.n_true} n_found={m.n_pred} F1@3um={m.f1:.4f} "
                      f"precision={m.precision:.4f} recall={m.recall:.4f} lymphocyte_agreement={lymph.mean():.4f} "
                      f"tiles={run['n_tiles']} F1_tiled_vs_whole@1um={mw.f1:.4f}", flush=True)


if __name__ == "__main__":
    main()
