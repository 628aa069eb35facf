"""Lay out the training data of the default H&E model (models/histo-he) outside the repository.

Run from the repository root: ``python models/prepare_training_data.py ../train``. It writes

- ``../train/consep-fit/{images,masks}``: links to the CoNSeP training tiles that are *not* held out
  (``models/consep-split.csv`` names the split: 6 of 27 tiles held out by tile, seed 0);
- ``../train/consep-held/{images,masks}``: links to the 6 held-out tiles, which measure the outlines
  and the nucleus classes (``histo evaluate --types``) and are never trained on or used for validation;
- ``../train/synth025/{images,masks}``: 12 generated 512² lymph-node / synovium tiles at 0.25 µm/px.

The MoNuSeg training tiles are used in place (``../shared/data/monuseg/train``).
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

CONSEP = Path("../shared/data/consep/train")
SPLIT = Path(__file__).with_name("consep-split.csv")
N_HELD_OUT = 6


def consep_split(seed: int = 0) -> pd.DataFrame:
    """tile, split ('fit' or 'held_out'): whole tiles, seeded."""
    tiles = sorted(p.stem for p in (CONSEP / "images").glob("*.png"))
    held = set(np.random.default_rng(seed).permutation(tiles)[:N_HELD_OUT])
    return pd.DataFrame({"tile": tiles, "split": ["held_out" if t in held else "fit" for t in tiles]})


def main(out: Path) -> None:
    split = consep_split()
    split.to_csv(SPLIT, index=False)
    for folder, part in (("consep-fit", "fit"), ("consep-held", "held_out")):
        for kind, ext in (("images", ".png"), ("masks", ".tif")):
            d = out / folder / kind
            d.mkdir(parents=True, exist_ok=True)
            for tile in split.loc[split["split"] == part, "tile"]:
                link = d / f"{tile}{ext}"
                if not link.exists():
                    link.symlink_to((CONSEP / kind / f"{tile}{ext}").resolve())
    import histo_sample

    if not (out / "synth025" / "images").is_dir():
        histo_sample.write_training_set(out / "synth025", 12, tile_px=512, seed=1, mpp=0.25, per_scene=3)
    print(split.loc[split["split"] == "held_out", "tile"].tolist())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../train"))
