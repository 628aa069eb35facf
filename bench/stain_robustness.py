"""F1 / PQ / AJI of ``histo run`` on annotated H&E tiles as they are and after strong hematoxylin /
eosin stain changes (optical-density space, beyond the training augmentation's ±20 %).

    python bench/stain_robustness.py TRUTH IMAGES --mpp MPP_OR_CSV --out DIR [--model M]

e.g. ``python bench/stain_robustness.py ../shared/data/monuseg/test/masks
../shared/data/monuseg/test/images --mpp bench/monuseg-test-mpp.csv --out /tmp/stain``. Writes the
recoloured images under DIR/images-<change>/, the bundles, DIR/stain_robustness.csv (pooled scores
per change) and prints the F1 drop of each change against the original stain.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from histo.run.cluster import dask_client
from histo.train.augment import recolour
from histo.train.classes import read_types
from histo.train.data import list_images, read_array
from histo.train.evaluate import evaluate, run_images

#: name → (hematoxylin, eosin) concentration factors
CHANGES = {"original": None, "pale-H-strong-E": (0.65, 1.35), "strong-H-pale-E": (1.35, 0.65)}


def recoloured(images: Path, out: Path, factors: tuple[float, float]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for stem, path in list_images(images).items():
        rgb = read_array(path)[..., :3].astype(np.float32) / 255
        alpha = (factors[0], factors[1], 1.0)
        tifffile.imwrite(out / f"{stem}.tif", np.round(recolour(rgb, alpha) * 255).astype(np.uint8))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("truth")
    ap.add_argument("images", type=Path)
    ap.add_argument("--mpp", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model")
    ap.add_argument("--workflow", default="lymph-node-he")
    ap.add_argument("--types", help="CSV tile,label,type of the true nuclei: per-class F1 per change too")
    args = ap.parse_args()
    rows = []
    with dask_client(n_workers=2) as client:
        for name, factors in CHANGES.items():
            images = args.images if factors is None else recoloured(args.images, args.out / f"images-{name}", factors)
            bundles = args.out / f"bundles-{name}"
            errors = run_images(
                args.truth,
                images,
                bundles,
                args.mpp,
                model=args.model,
                workflow=args.workflow,
                client=client,
                show_progress=False,
            )
            types = read_types(args.types) if args.types else None
            pooled = evaluate(args.truth, bundles_dir=bundles, errors=errors, types=types).iloc[-1]
            rows.append(
                {"change": name, "h_factor": factors[0] if factors else 1.0, "e_factor": factors[1] if factors else 1.0}
                | {k: pooled[k] for k in ("n_true", "n_pred", "precision", "recall", "f1", "pq", "aji")}
                | {k: pooled[k] for k in pooled.index if k.startswith("f1_")}
            )
    table = pd.DataFrame(rows)
    table["f1_drop"] = table["f1"].iloc[0] - table["f1"]
    if "f1_lymphocyte" in table:
        table["f1_lymphocyte_drop"] = table["f1_lymphocyte"].iloc[0] - table["f1_lymphocyte"]
    table.to_csv(args.out / "stain_robustness.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
