"""Training the nucleus classifier (:mod:`histo.segment.nucleus_classes`) from expert-typed nuclei.

Data are image / instance-mask pairs plus a type per nucleus: a CSV ``tile,label,type`` (CoNSeP's
``types.csv``) or class masks (a class value per pixel, as MoNuSAC's; a nucleus takes the majority
class under it, :func:`types_from_class_masks`). Validation tiles are held out by tile; the best
epoch by validation loss is kept. The classifier and its card section go into an existing nucleus
model folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.measure import find_contours, regionprops

from histo.errors import HistoError
from histo.io.files import read_json, write_json
from histo.segment.nucleus_classes import (
    CLASSES,
    CLASSIFIER_FILE,
    FILTERS,
    PATCH_MPP,
    PATCH_PX,
    STAINS,
    SURE,
    TURNS,
    class_of,
    classifier_members,
    network,
    nucleus_patches,
    to_patch_scale,
)
from histo.timing import stopwatch
from histo.train.augment import brightness_contrast, stain_jitter
from histo.train.data import read_pair, split_by_image
from histo.train.model_card import write_model_md

MARGIN = 8  # px at PATCH_MPP read around each patch for shift augmentation


def read_types(path: Path | str) -> pd.DataFrame:
    """``tile,label,class`` from a CSV with columns tile, label, type (type names: :func:`class_of`)."""
    path = Path(path)
    try:
        t = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - reported naming the file
        raise HistoError(path, f"cannot read the type table: {e}") from e
    if not {"tile", "label", "type"} <= set(t.columns):
        raise HistoError(path, f"type table needs columns tile, label, type; has {list(t.columns)}")
    try:
        cls = [class_of(v) for v in t["type"]]
    except ValueError as e:
        raise HistoError(path, str(e)) from e
    return pd.DataFrame(
        {"tile": t["tile"].astype(str).map(lambda s: Path(s).stem), "label": t["label"].astype(int), "class": cls}
    )


def parse_class_values(items: Sequence[str]) -> dict[int, str]:
    """``["1=epithelial", "2=lymphocyte", …]`` → {1: "epithelial", 2: "lymphocyte", …} (type names:
    :func:`class_of`); HistoError naming the item that is not ``value=type``."""
    out = {}
    for item in items:
        value, sep, name = str(item).partition("=")
        try:
            if not sep:
                raise ValueError("expected value=type")
            out[int(value)] = class_of(name)
        except ValueError as e:
            raise HistoError(None, f"--class-values {item!r}: {e}") from e
    return out


def types_from_class_masks(
    pairs: Sequence[tuple[Path, Path]], class_dir: Path | str, values: dict[int, str]
) -> pd.DataFrame:
    """``tile,label,class`` of every nucleus of the instance masks in ``pairs`` ((image, mask) paths),
    from the class mask of the same stem in ``class_dir``: the class value covering most of the
    nucleus's pixels (0, background, not counted), named through ``values``; nuclei with no class pixel
    or an unnamed value are left out. HistoError naming a missing or misshapen class mask."""
    from histo.train.data import list_images, read_array
    from histo.train.evaluate import overlaps

    found = list_images(Path(class_dir))
    rows = []
    for _, mask in pairs:
        stem = Path(mask).stem
        if stem not in found:
            raise HistoError(Path(class_dir), f"no class mask named {stem}.* for {mask}")
        labels, classes = read_array(mask), read_array(found[stem])
        classes = classes[..., 0] if classes.ndim == 3 else classes
        if classes.shape != labels.shape[:2]:
            raise HistoError(found[stem], f"class mask is {classes.shape}, its instance mask {labels.shape[:2]}")
        _, _, label, value, n = overlaps(labels, classes)  # px of each (nucleus, class value) pair
        best = pd.DataFrame({"label": label, "value": value, "n": n}).sort_values("n", ascending=False)
        best = best.drop_duplicates("label")
        best = best[best["value"].isin(list(values))]
        rows.append(
            pd.DataFrame({"tile": stem, "label": best["label"].astype(int), "class": best["value"].map(values)})
        )
    return pd.concat(rows, ignore_index=True).sort_values(["tile", "label"], ignore_index=True)


def tile_examples(
    img: np.ndarray, labels: np.ndarray, mpp: float, types: dict[int, str], stain: str | None = "macenko"
) -> tuple[np.ndarray, np.ndarray]:
    """Patches (n, PATCH_PX + 2·MARGIN, …, 4) and class indices (n,) of the typed nuclei (``labels``)
    of one RGB tile at ``mpp`` µm/px, read after the tile's stains are standardised
    (``stain="macenko"``, as the tile task does)."""
    f = mpp / PATCH_MPP
    outlines, centres, y = [], [], []
    for r in regionprops(labels):
        cls = types.get(int(r.label))
        if cls is None:
            continue
        ring = max(find_contours(np.pad(r.image, 1).astype(np.float32), 0.5), key=len)
        ring = ring + np.asarray(r.bbox[:2]) - 1
        outlines.append((ring + 0.5) * f - 0.5)
        centres.append((np.asarray(r.centroid) + 0.5) * f - 0.5)
        y.append(CLASSES.index(cls))
    small = to_patch_scale(img, mpp, stain)
    x = nucleus_patches(small, outlines, np.asarray(centres).reshape(-1, 2), PATCH_PX + 2 * MARGIN)
    return x, np.asarray(y, np.int64)


def augment(x: np.ndarray, rng: np.random.Generator, stain_scale: float = 0.4) -> np.ndarray:
    """A batch of enlarged patches → PATCH_PX² patches: random shift (± MARGIN px), flips and 90°
    turns, H&E stain jitter, brightness / contrast, the outline grown or shrunk by a pixel."""
    from scipy.ndimage import binary_dilation, binary_erosion

    out = np.empty((len(x), PATCH_PX, PATCH_PX, 4), np.float32)
    for i, p in enumerate(x):
        r, c = rng.integers(MARGIN - 2, MARGIN + 3, 2)
        p = np.rot90(p[r : r + PATCH_PX, c : c + PATCH_PX], rng.integers(4))
        p = p[:, ::-1] if rng.random() < 0.5 else p
        rgb, _ = stain_jitter(np.ascontiguousarray(p[..., :3]), rng, stain_scale, 0.05)
        rgb = brightness_contrast(rgb, rng)
        m = p[..., 3] > 0.5
        u = rng.random()
        m = binary_dilation(m) if u < 0.25 else binary_erosion(m) if u < 0.4 and m.sum() > 12 else m
        out[i, ..., :3], out[i, ..., 3] = rgb, m
    return out


def _centre(x: np.ndarray) -> np.ndarray:
    return x[:, MARGIN : MARGIN + PATCH_PX, MARGIN : MARGIN + PATCH_PX]


def class_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy and per-class precision / recall / F1 of class indices."""
    out = {"accuracy": round(float(np.mean(y_true == y_pred)), 4), "n": int(len(y_true))}
    for k, name in enumerate(CLASSES):
        tp = int(np.sum((y_true == k) & (y_pred == k)))
        fp, fn = int(np.sum((y_true != k) & (y_pred == k))), int(np.sum((y_true == k) & (y_pred != k)))
        out[name] = {
            "precision": round(tp / max(tp + fp, 1), 4),
            "recall": round(tp / max(tp + fn, 1), 4),
            "f1": round(2 * tp / max(2 * tp + fp + fn, 1), 4),
            "n_true": tp + fn,
        }
    return out


def train_classes(
    datasets: Sequence[tuple],
    model_dir: Path | str,
    epochs: int = 30,
    batch: int = 64,
    val_fraction: float = 0.15,
    seed: int = 0,
    stain_scale: float = 0.4,
    patience: int = 6,
    stain: str | None = "macenko",
    filters: Sequence[int] = FILTERS,
    add: bool = False,
    inference_turns: int = TURNS,
    command: str | None = None,
    verbose: int = 1,
) -> dict:
    """Train the nucleus classifier into ``model_dir`` and return its card section.

    Parameters
    ----------
    datasets : sequence of (pairs, mpp, types, name, licence)
        ``pairs`` a list of (image, mask) paths, ``mpp`` their µm/px, ``types`` a DataFrame
        ``tile, label, class`` (:func:`read_types`), ``name`` and ``licence`` for the card.
    model_dir : str or Path
        A nucleus model folder; ``nucleus_classes.keras`` is written there and
        ``card.json["nucleus_classes"]`` (classes, data, validation scores, time) is updated.
    epochs, batch : int
        At most ``epochs`` passes over the training nuclei in batches of ``batch`` nuclei.
    val_fraction : float
        Share of the tiles held out for validation (by tile).
    seed : int
        Split, augmentation and shuffling.
    stain_scale : float
        H and E concentration jitter, a fraction (0.4: ×0.6–×1.4).
    patience : int
        Epochs without a lower validation loss before training stops (the best epoch is kept).
    stain : str or None
        ``"macenko"`` standardises each tile's stains before its patches are cut
        (:func:`histo.segment.nucleus_classes.standardise_stain`; recorded in the card, and the tile
        task does the same), ``"macenko-unscaled"`` only their colours; None reads the pixels as they are.
    filters : sequence of int
        Filters of the network's conv blocks (:func:`histo.segment.nucleus_classes.network`).
    add : bool
        Add this network to the folder's classifier as another member (``nucleus_classes_<stain>.keras``;
        the members' probabilities are averaged) instead of replacing it; the card's ``validation``
        is then the members' together on this run's validation tiles.
    inference_turns : int
        Turns of a patch the tile task averages for this network (4: 0°, 90°, 180°, 270°, only for
        nuclei its upright view leaves unsure; 1: the upright view alone).
    command : str, optional
        The command line, for the card.
    verbose : int
        Print the data summary and one Keras line per epoch.

    Returns
    -------
    dict
        The card section.
    """
    import keras

    clock = stopwatch()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise HistoError(model_dir, "not a nucleus model folder (no config.json): train the outlines first")
    if stain not in STAINS:
        raise HistoError(None, f"stain {stain!r}: expected one of {', '.join(map(str, STAINS))}")
    card_path = model_dir / "card.json"
    card = read_json(card_path, missing={})
    before = card.get("nucleus_classes")
    if add and not before:
        raise HistoError(model_dir, "no classifier to add a member to: train one without --add first")
    file = f"nucleus_classes_{str(stain).removeprefix('macenko-')}.keras" if add else CLASSIFIER_FILE
    if add and any(m["file"] == file for m in classifier_members(before)):
        raise HistoError(model_dir / file, f"the classifier already has a member read this way (stain {stain!r})")
    tiles = [(img, msk, mpp, types) for pairs, mpp, types, *_ in datasets for img, msk in pairs]
    tr, va = split_by_image(len(tiles), val_fraction, seed)
    xs, ys = [], []
    for image, mask, mpp, types in tiles:
        own = types[types["tile"] == Path(image).stem]
        x, y = tile_examples(*read_pair(image, mask), mpp, dict(zip(own["label"], own["class"])), stain)
        xs.append(x), ys.append(y)
    x_tr, y_tr = np.concatenate([xs[i] for i in tr]), np.concatenate([ys[i] for i in tr])
    x_va, y_va = _centre(np.concatenate([xs[i] for i in va])), np.concatenate([ys[i] for i in va])
    counts = np.bincount(y_tr, minlength=len(CLASSES))
    weights = {k: float(np.sqrt(len(y_tr) / (len(CLASSES) * max(n, 1)))) for k, n in enumerate(counts)}
    if verbose:
        print(
            f"[histo.train_classes] {len(y_tr)} training nuclei in {len(tr)} tiles "
            f"({dict(zip(CLASSES, counts.tolist()))}), {len(y_va)} validation nuclei in {len(va)} tiles",
            flush=True,
        )

    rng = np.random.default_rng(seed)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return int(np.ceil(len(y_tr) / batch))

        def __getitem__(self, i):
            idx = order[i * batch : (i + 1) * batch]
            return augment(x_tr[idx], rng, stain_scale), y_tr[idx]

        def on_epoch_end(self):
            rng.shuffle(order)

    order = rng.permutation(len(y_tr))
    keras.utils.set_random_seed(seed)
    net = network(len(CLASSES), tuple(filters))
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True)
    best = keras.callbacks.ModelCheckpoint(model_dir / file, save_best_only=True)  # safe to interrupt
    plateau = keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=max(2, patience // 2))
    hist = net.fit(
        Batches(),
        validation_data=(x_va, y_va),
        epochs=epochs,
        class_weight=weights,
        callbacks=[stop, plateau, best],
        verbose=2 if verbose else 0,
    )
    probs = net.predict(x_va, batch_size=256, verbose=0)
    net.save(model_dir / file)
    section = {
        "classes": list(CLASSES),
        "file": file,
        "patch_px": PATCH_PX,
        "patch_mpp": PATCH_MPP,
        "input": "RGB x/255 and the nucleus outline (1 inside), centred on the nucleus",
        "filters": [int(n) for n in filters],
        "stain": stain,
        "sources": [
            {"name": name, "licence": licence, "n_tiles": len(pairs), "mpp": mpp}
            for pairs, mpp, _, name, licence in datasets
        ],
        "n_train_nuclei": int(len(y_tr)),
        "n_val_nuclei": int(len(y_va)),
        "train_counts": dict(zip(CLASSES, counts.tolist())),
        "val_tiles": [Path(tiles[i][0]).name for i in va],
        "class_weights": {CLASSES[k]: round(w, 3) for k, w in weights.items()},
        "epochs_run": len(hist.history["loss"]),
        "best_epoch": int(np.argmin(hist.history["val_loss"])) + 1,
        "augmentation": {
            "shift_px": 2,
            "flips_rot90": True,
            "stain_scale": stain_scale,
            "stain_shift": 0.05,
            "brightness": 0.06,
            "contrast": 0.12,
            "outline_grow_shrink_px": 1,
        },
        "validation": class_scores(y_va, np.argmax(probs, axis=1)),
        "inference_turns": int(inference_turns),
        "inference_sure": SURE,
        "wall_time_s": round(clock.s, 1),
        "command": command,
    }
    if add:
        members = [*classifier_members(before), section]
        others = sum(_member_probs(model_dir, m, [tiles[i] for i in va]) for m in members[:-1])
        mean = (probs + others) / len(members)
        section = {**before, "members": members, "validation": class_scores(y_va, np.argmax(mean, axis=1))}
    card["nucleus_classes"] = section
    write_json(card_path, card)
    if (model_dir / "MODEL.md").is_file():
        write_model_md(model_dir)
    return section


def _member_probs(model_dir: Path, member: dict, tiles: list) -> np.ndarray:
    """Class probabilities of a classifier member (its file and stain) for the typed nuclei of
    ``tiles`` ((image, mask, mpp, types) each), upright, in :func:`tile_examples`' order."""
    import keras

    net = keras.models.load_model(model_dir / member["file"], compile=False)
    xs = []
    for image, mask, mpp, types in tiles:
        own = types[types["tile"] == Path(image).stem]
        x, _ = tile_examples(*read_pair(image, mask), mpp, dict(zip(own["label"], own["class"])), member.get("stain"))
        xs.append(_centre(x))
    return net.predict(np.concatenate(xs), batch_size=256, verbose=0)
