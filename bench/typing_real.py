"""Cell typing on real tissue that histo never trained on: MoNuSAC class masks and lymph-node patches.

    python bench/typing_real.py --out DIR [--model M] [--workflow W] [--shared ../shared/data]

- ``monusac_test_classes`` (class masks: 1 epithelial, 2 lymphocyte, 3 macrophage, 4 neutrophil; ≈0.25
  µm/px): every image of at least ``--min-px`` on both sides through ``histo run``; prints the fraction
  of lymphocyte-class pixels covered by nuclei called lymphocyte (``coverage``) and the fraction of
  nuclei called lymphocyte whose centre lies on lymphocyte pixels, among those on any annotated
  nucleus (``precision``; MoNuSAC leaves other nuclei, e.g. stromal, unannotated) and among all
  (``precision_all``). The masks' lymphocyte components (approximate instances) split the misses:
  ``found`` is the share of components holding the centre of a nucleus histo found (any class),
  ``typed`` the share of those whose nucleus there is called lymphocyte.
- ``lymph_node_patches`` (224² JPEG, ≈0.46 µm/px): the fraction of nuclei called lymphocyte per
  patch; median per group (reactive node: mostly small lymphocytes).

Writes DIR/monusac.csv, DIR/lymph_node_patches.csv and DIR/typing_real.json (the summary).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
from skimage.io import imread
from skimage.measure import label

from histo.errors import HistoError
from histo.run.cluster import dask_client
from histo.run.pipeline import run_slide
from histo.segment.labels import rasterise

LYMPHOCYTE = 2  # MoNuSAC class value


def called_nuclei(bundle: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """cells (x_um, y_um, cell_type) and their polygons (µm) of a bundle."""
    t = pq.read_table(bundle / "cells.parquet", columns=["x_um", "y_um", "cell_type", "polygon"]).to_pandas()
    return t, shapely.from_wkb(t["polygon"].to_numpy())


def monusac(root: Path, out: Path, client, model, workflow: str, min_px: int) -> pd.DataFrame:
    index = pd.read_csv(root / "images_index.csv")
    rows = []
    for r in index.itertuples():
        if min(r.width, r.height) < min_px:
            continue
        row = {"image": r.image}
        try:
            bundle = run_slide(
                root / "images" / f"{r.image}.jpg",
                out / "bundles-monusac",
                workflow,
                model=model,
                mpp=0.25,
                client=client,
                show_progress=False,
            )
            cells, polys = called_nuclei(bundle)
            classes = imread(root / "class_masks" / f"{r.image}.png")
            lym_cells = (cells["cell_type"].astype(str) == "lymphocyte").to_numpy()
            drawn = rasterise(polys[lym_cells], np.arange(1, lym_cells.sum() + 1), 0.25, (0, 0), classes.shape)
            col = np.clip((cells["x_um"] / 0.25).astype(int), 0, classes.shape[1] - 1)
            row_ = np.clip((cells["y_um"] / 0.25).astype(int), 0, classes.shape[0] - 1)
            under = classes[row_, col]
            components = label(classes == LYMPHOCYTE)
            hit = np.unique(components[row_, col])
            hit_lym = np.unique(components[row_[lym_cells], col[lym_cells]])
            row |= {
                "n_nuclei": len(cells),
                "n_called_lymphocyte": int(lym_cells.sum()),
                "lymphocyte_px": int((classes == LYMPHOCYTE).sum()),
                "covered_px": int(((classes == LYMPHOCYTE) & (drawn > 0)).sum()),
                "called_on_lymphocyte": int((lym_cells & (under == LYMPHOCYTE)).sum()),
                "called_on_annotated": int((lym_cells & (under > 0)).sum()),
                "lymphocyte_components": int(components.max()),
                "components_found": int((hit > 0).sum()),
                "components_called": int((hit_lym > 0).sum()),
            }
        except HistoError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return pd.DataFrame(rows)


def patches(root: Path, out: Path, client, model, workflow: str) -> pd.DataFrame:
    rows = []
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(group.glob("*.jpg")):
            row = {"group": group.name, "image": image.stem}
            try:
                bundle = run_slide(
                    image,
                    out / f"bundles-{group.name}",
                    workflow,
                    model=model,
                    mpp=0.46,
                    client=client,
                    show_progress=False,
                )
                types = pq.read_table(bundle / "cells.parquet", columns=["cell_type"]).column("cell_type").to_pandas()
                row |= {
                    "n_nuclei": len(types),
                    "lymphocyte_fraction": float((types.astype(str) == "lymphocyte").mean())
                    if len(types)
                    else float("nan"),
                }
            except HistoError as exc:
                row["error"] = str(exc)
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model")
    ap.add_argument("--workflow", default="lymph-node-he", help="preset name or YAML file (default lymph-node-he)")
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--min-px", type=int, default=256, help="MoNuSAC images smaller than this on a side are skipped")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with dask_client(n_workers=2) as client:
        m = monusac(args.shared / "monusac_test_classes", args.out, client, args.model, args.workflow, args.min_px)
        p = patches(args.shared / "lymph_node_patches", args.out, client, args.model, args.workflow)
    m.to_csv(args.out / "monusac.csv", index=False)
    p.to_csv(args.out / "lymph_node_patches.csv", index=False)
    ok = m.dropna(subset=["n_nuclei"]) if "n_nuclei" in m else m.iloc[:0]
    summary = {
        "monusac": {
            "images": len(ok),
            "failed": int(len(m) - len(ok)),
            "coverage": ok.covered_px.sum() / max(ok.lymphocyte_px.sum(), 1),
            "precision": ok.called_on_lymphocyte.sum() / max(ok.called_on_annotated.sum(), 1),
            "precision_all": ok.called_on_lymphocyte.sum() / max(ok.n_called_lymphocyte.sum(), 1),
            "n_called_lymphocyte": int(ok.n_called_lymphocyte.sum()),
            "found": ok.components_found.sum() / max(ok.lymphocyte_components.sum(), 1),
            "typed": ok.components_called.sum() / max(ok.components_found.sum(), 1),
        },
        "lymph_node_patches": {
            g: {
                "patches": int(len(d)),
                "median_lymphocyte_fraction": float(d.lymphocyte_fraction.median()),
                "median_nuclei": float(d.n_nuclei.median()),
            }
            for g, d in p.dropna(subset=["n_nuclei"]).groupby("group")
        }
        if "n_nuclei" in p
        else {},
    }
    (args.out / "typing_real.json").write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
