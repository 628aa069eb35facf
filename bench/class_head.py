"""StarDist's own class head (``n_classes``) against histo's nucleus classifier, on held-out CoNSeP tiles.

    python bench/class_head.py --out DIR [--model models/histo-he] [--epochs 10] [--shared ../shared/data]

Issue 16 asked which is better for typing nuclei: StarDist's multi-class head (one network, outlines and
class together) or histo's classifier on each nucleus (a second small network; the outline model can
still learn from datasets without types, e.g. MoNuSeg). Both start from the same outline model and learn
from the same 21 CoNSeP ``fit`` tiles (``models/consep-split.csv``; the 18 / 3 train / validation split of
``histo train-classes``), and both are scored on the 6 held-out tiles, which neither saw:

(a) the class head: ``--model``'s architecture and weights with a 4-class head added (histo's classes:
    lymphocyte, epithelial, stromal, other), fine-tuned on CoNSeP alone (StarDist cannot train a class head
    on images without types), with the outline training's augmentation (flips, turns, stain, intensity,
    noise) but no scale jitter;
(b) histo's path: ``histo evaluate --types`` on the same tiles with ``--model`` (its outlines and
    classifier), as a user runs it.

Both are scored with ``histo.train.evaluate`` (IoU ≥ 0.5, one-to-one; per class the field's F_c). Writes
DIR/class_head.csv and prints one line per path; the last line is ``lymphocyte_f1 head=… classifier=…``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.transform import resize

from histo.segment.models import load_model, resolve_model
from histo.segment.nucleus_classes import CLASSES
from histo.timing import stopwatch
from histo.train.augment import HEAugmenter
from histo.train.classes import read_types
from histo.train.data import load_pairs, read_array, split_by_image
from histo.train.evaluate import class_counts, pooled, score

MPP, CONSEP_MPP = 0.25, 0.275


def consep_tiles(shared: Path) -> tuple[list[str], list[str]]:
    split = pd.read_csv(Path(__file__).resolve().parents[1] / "models" / "consep-split.csv")
    return list(split.loc[split.split == "fit", "tile"]), list(split.loc[split.split == "held_out", "tile"])


def read_tiles(shared: Path, tiles: list[str]):
    root = shared / "consep" / "train"
    ims = [root / "images" / f"{t}.png" for t in tiles]
    mks = [root / "masks" / f"{t}.tif" for t in tiles]
    return load_pairs(ims, mks, CONSEP_MPP, MPP)


def class_maps(types: pd.DataFrame, tiles: list[str], labels: list[np.ndarray]) -> list[dict[int, int]]:
    """Per tile, label → class number (1 … 4, histo's CLASSES order) for StarDist; untyped labels get 'other'."""
    out = []
    for t, y in zip(tiles, labels):
        own = types[types.tile == t]
        lut = dict(zip(own.label, own["class"]))
        out.append({int(i): CLASSES.index(lut.get(int(i), "other")) + 1 for i in np.unique(y) if i > 0})
    return out


def head_model(init: Path, out: Path, lr: float):
    """``init``'s architecture with a class head; every other layer starts from init's weights."""
    from stardist.models import Config2D, StarDist2D

    base = load_model(resolve_model(str(init)))
    c = base.config
    config = Config2D(
        n_rays=c.n_rays,
        grid=tuple(c.grid),
        n_channel_in=c.n_channel_in,
        n_classes=len(CLASSES),
        unet_n_depth=c.unet_n_depth,
        unet_n_filter_base=c.unet_n_filter_base,
        train_patch_size=(256, 256),
        train_batch_size=4,
        train_learning_rate=lr,
        train_tensorboard=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        model = StarDist2D(config, name=out.name, basedir=str(out.parent))
    # Keras numbers unnamed layers per session (conv2d vs conv2d_4): pair the layers in order, the head's aside
    shared = [layer for layer in model.keras_model.layers if "class" not in layer.name]
    copied = 0
    for old, layer in zip(base.keras_model.layers, shared, strict=True):
        if [w.shape for w in old.get_weights()] != [w.shape for w in layer.get_weights()]:
            raise ValueError(f"layer {layer.name} does not match {old.name} of {init}")
        layer.set_weights(old.get_weights())
        copied += bool(layer.get_weights())
    return model, copied


def score_head(
    model, X: list[np.ndarray], truth: list[np.ndarray], tiles: list[str], types: pd.DataFrame
) -> pd.DataFrame:
    """Per held-out tile, the counts of the class head's nuclei against the experts' (at the tile's own size)."""
    rows = []
    for t, x, y0 in zip(tiles, X, truth):
        labels, res = model.predict_instances(x.astype(np.float32) / 255, verbose=False)
        labels = resize(labels, y0.shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
        pred_cls = np.array([""] + [CLASSES[int(k) - 1] if k > 0 else "other" for k in res["class_id"]], object)
        own = types[types.tile == t]
        true_cls = np.full(int(y0.max()) + 1, "", object)
        true_cls[own.label.to_numpy()] = own["class"].to_numpy()
        pairs: list = []
        row = score(y0, labels, pairs=pairs)
        ti, pi = (pairs[0], pairs[1]) if pairs else (np.array([], int), np.array([], int))
        rows.append({"image": t, **row, **class_counts(true_cls, pred_cls, ti, pi, list(CLASSES))})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=Path("models/histo-he"))
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    args = ap.parse_args()
    if not (args.shared / "consep" / "train").is_dir():
        sys.exit(f"{args.shared / 'consep' / 'train'}: absent (the shared data folder sits beside the repository)")
    args.out.mkdir(parents=True, exist_ok=True)
    types = read_types(args.shared / "consep" / "train" / "types.csv")
    fit, held = consep_tiles(args.shared)

    _, X, Y = read_tiles(args.shared, fit)
    cls = class_maps(types, fit, Y)
    tr, va = split_by_image(len(fit), 0.15, 0)
    model, copied = head_model(args.model, args.out / "class-head", args.learning_rate)
    print(f"class head: {copied} layers from {args.model}; {len(tr)} train / {len(va)} val tiles", flush=True)
    with stopwatch() as fit_clock:
        with contextlib.redirect_stdout(io.StringIO()):
            model.train(
                [X[i].astype(np.float32) / 255 for i in tr],
                [Y[i] for i in tr],
                classes=[cls[i] for i in tr],
                validation_data=([X[i].astype(np.float32) / 255 for i in va], [Y[i] for i in va], [cls[i] for i in va]),
                augmenter=HEAugmenter(seed=7, stain_scale=0.4, p_scale=0),  # no scale jitter: its ignore border
                epochs=args.epochs,
                steps_per_epoch=args.steps,
            )
        model.optimize_thresholds([X[i].astype(np.float32) / 255 for i in va], [Y[i] for i in va], nms_threshs=[0.3])

    _, Xh, _ = read_tiles(args.shared, held)
    truth = [read_array(args.shared / "consep" / "train" / "masks" / f"{t}.tif") for t in held]
    head = pooled(score_head(model, Xh, truth, held, types))
    head_row = {"path": "StarDist class head (CoNSeP only)", "train_s": round(fit_clock.s)} | head

    ev = args.out / "histo-evaluate"
    root = args.shared / "consep" / "train"
    held_dir = _held_folder(args.out, root, held)
    subprocess.run(
        [
            str(Path(sys.executable).parent / "histo"),
            "evaluate",
            str(held_dir / "masks"),
            "--images",
            str(held_dir / "images"),
        ]
        + ["--mpp", str(CONSEP_MPP), "--types", str(root / "types.csv"), "--model", str(args.model)]
        + ["--out", str(ev), "--quiet", "--workers", "2"],
        check=True,
    )
    scores = pd.read_csv(ev / "scores.csv")
    ours = scores[scores["image"] == "pooled"].iloc[0].to_dict()
    ours_row = {"path": f"histo classifier ({args.model.name})", "train_s": None} | ours
    table = pd.DataFrame([head_row, ours_row])
    table.to_csv(args.out / "class_head.csv", index=False)
    keys = ["f1", "pq"] + [f"f1_{c}" for c in CLASSES]
    for r in (head_row, ours_row):
        print(r["path"] + ": " + ", ".join(f"{k} {float(r[k]):.3f}" for k in keys if k in r), flush=True)
    print(f"lymphocyte_f1 head={head_row['f1_lymphocyte']:.3f} classifier={float(ours_row['f1_lymphocyte']):.3f}")


def _held_folder(out: Path, root: Path, held: list[str]) -> Path:
    """The held-out tiles as an images/masks folder pair of links (``histo evaluate`` reads folders)."""
    d = out / "consep-held"
    for sub, ext in (("images", "png"), ("masks", "tif")):
        (d / sub).mkdir(parents=True, exist_ok=True)
        for t in held:
            link = d / sub / f"{t}.{ext}"
            if not link.exists():
                link.symlink_to(root / sub / f"{t}.{ext}")
    return d


if __name__ == "__main__":
    main()
