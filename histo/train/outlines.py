"""Training our own StarDist nucleus models (H&E, RGB, fixed x/255 normalisation).

``train(...)`` writes a model folder that ``histo.segment.models.resolve_model(FOLDER)`` loads:
``config.json``, ``thresholds.json``, ``weights_best.h5``, ``card.json`` (machine-readable model
card: scale, normalisation, architecture, training data and licences, validation scores) and
``MODEL.md`` (the same in prose). While training it also keeps ``weights_last.h5`` and
``train_state.json`` (epochs done, best validation loss, learning rate, split) so an interrupted
run resumes with the remaining epochs; ``finalize=True`` (default) removes both at the end and the
folder stays a few MB.

Resuming restores the weights, the learning rate and the best validation loss (so
``weights_best.h5`` is only overwritten by a better epoch); Adam's moment estimates restart from
zero, which costs a few steps of warm-up, nothing more.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from histo.errors import HistoError
from histo.run.provenance import versions
from histo.train.augment import HEAugmenter

__all__ = [
    "train",
    "main_train",
    "pairs_from_folders",
    "dataset_pairs",
    "read_mpp_table",
    "pixel_sizes",
    "read_pair",
    "resample_pair",
    "split_by_image",
    "evaluate",
    "write_model_md",
    "NORMALIZE_FIXED",
]

#: the normalisation of every model trained here (must match histo.segment.models.normalize_image)
NORMALIZE_FIXED = {"kind": "fixed", "low": 0, "high": 255}

_IMAGE_EXT = (".tif", ".tiff", ".png")
STATE_FILE = "train_state.json"
DEFAULT_LEARNING_RATE = 3e-4  # Adam, StarDist's default


# ---------------------------------------------------------------- reading data
def _read_array(path: Path) -> np.ndarray:
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        from skimage.io import imread

        return imread(path)
    except Exception as e:  # noqa: BLE001 - reported as a user error naming the file
        raise HistoError(path, f"cannot read image: {e}") from e


def _list_images(folder: Path, extensions: tuple[str, ...] = _IMAGE_EXT) -> dict[str, Path]:
    """Files of ``folder`` with ``extensions`` (lower case, with the dot) by stem, sorted; hidden
    files skipped. HistoError if the folder is missing or two files share a stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HistoError(folder, "folder does not exist")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."):
            if p.stem in out:
                raise HistoError(p, f"two files share the stem '{p.stem}' ({out[p.stem].name})")
            out[p.stem] = p
    return out


def pairs_from_folders(
    images_dir: Path | str, masks_dir: Path | str, check_shapes: bool = True
) -> list[tuple[Path, Path]]:
    """Image/mask pairs matched by file stem (``.tif``/``.tiff``/``.png``), sorted by stem.

    Raises ``HistoError`` naming the file when an image has no mask, or (``check_shapes``) when
    image and mask sizes differ, the image is not RGB, or the mask is not a 2-D label image.
    Masks without an image are ignored.
    """
    images = _list_images(Path(images_dir))
    masks = _list_images(Path(masks_dir))
    if not images:
        raise HistoError(images_dir, "no images (.tif, .tiff, .png) in this folder")
    pairs = []
    for stem, ip in images.items():
        mp = masks.get(stem)
        if mp is None:
            raise HistoError(ip, f"no mask with the same name (stem '{stem}') in {masks_dir}")
        if check_shapes:
            _check_pair(ip, mp)
        pairs.append((ip, mp))
    return pairs


def _shape_of(path: Path) -> tuple[int, ...]:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return tuple(tf.series[0].shape)
    return _read_array(path).shape


def _check_pair(ip: Path, mp: Path) -> None:
    try:
        si, sm = _shape_of(ip), _shape_of(mp)
    except HistoError:
        raise
    except Exception as e:  # noqa: BLE001
        raise HistoError(ip, f"cannot read image: {e}") from e
    if len(sm) != 2:
        raise HistoError(mp, f"mask must be a 2-D label image, got shape {sm}")
    if len(si) != 3 or si[-1] not in (3, 4):
        raise HistoError(ip, f"image must be RGB (H, W, 3), got shape {si}")
    if tuple(si[:2]) != tuple(sm):
        raise HistoError(mp, f"mask shape {sm} differs from image {ip.name} shape {si[:2]}")


def read_pair(ip: Path, mp: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image as uint8 RGB, mask as int32 labels; shape errors name the file."""
    img = _read_array(ip)
    msk = _read_array(mp)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if img.ndim != 3 or img.shape[-1] != 3:
        raise HistoError(ip, f"image must be RGB (H, W, 3), got shape {img.shape}")
    if msk.ndim != 2:
        raise HistoError(mp, f"mask must be a 2-D label image, got shape {msk.shape}")
    if img.shape[:2] != msk.shape:
        raise HistoError(mp, f"mask shape {msk.shape} differs from image {Path(ip).name} shape {img.shape[:2]}")
    if img.dtype != np.uint8:
        if img.dtype == np.uint16 and img.max() > 255:
            img = (img / 257.0).round()
        img = np.clip(img, 0, 255).astype(np.uint8)
    if not np.issubdtype(msk.dtype, np.integer):
        if not np.all(np.mod(msk, 1) == 0):
            raise HistoError(mp, "mask is not an integer label image")
    return np.ascontiguousarray(img), msk.astype(np.int32)


def resample_pair(img: np.ndarray, mask: np.ndarray, image_mpp: float, model_mpp: float):
    """Resample an image (anti-aliased, order 1) and its mask (nearest) from ``image_mpp`` to
    ``model_mpp``. Both get exactly the same output shape, so they stay aligned."""
    if image_mpp <= 0 or model_mpp <= 0:
        raise ValueError("pixel sizes must be positive")
    f = image_mpp / model_mpp
    if abs(f - 1.0) < 1e-3:
        return img, mask
    from skimage.transform import resize

    shape = (max(1, int(round(img.shape[0] * f))), max(1, int(round(img.shape[1] * f))))
    ri = resize(img, shape + img.shape[2:], order=1, anti_aliasing=f < 1, preserve_range=True)
    ri = np.clip(np.round(ri), 0, 255).astype(np.uint8)
    rm = resize(mask, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return ri, rm


def split_by_image(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of image indices into (train, validation); at least one of each."""
    if n < 2:
        raise HistoError(None, f"training needs at least 2 images (1 for validation), got {n}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n).tolist()
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _as_float(img: np.ndarray) -> np.ndarray:
    """The fixed normalisation x/255 (identical to histo.segment.models.normalize_image for our models)."""
    lo, hi = NORMALIZE_FIXED["low"], NORMALIZE_FIXED["high"]
    return (img.astype(np.float32) - lo) / float(hi - lo)


# ---------------------------------------------------------------- state / card
def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(Path(p).read_text())
    except FileNotFoundError:
        return None


def _write_json(p: Path, obj) -> None:
    p = Path(p)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, p)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _max_nucleus_um(masks: Sequence[np.ndarray], mpp: float, floor_um: float = 25.0) -> tuple[float, float]:
    """(value for the card, largest observed nucleus length in µm) over the training masks.

    The card value (it sets the tile halo) is the 99.9th percentile of nucleus lengths, rounded up,
    and never below ``floor_um``: real nuclei (tumour, synovial fibroblasts cut lengthwise) can be
    bigger than most of a small training set, while the very longest outlines of a hand-annotated
    set are merged or mis-drawn nuclei that would double the halo (46.6 µm vs 22.2 µm in MoNuSeg)."""
    from skimage.measure import regionprops

    lengths = [float(r.axis_major_length) * mpp for m in masks for r in regionprops(np.maximum(m, 0))]
    if not lengths:
        return float(floor_um), 0.0
    return float(max(floor_um, math.ceil(np.percentile(lengths, 99.9)))), round(max(lengths), 2)


def evaluate(model, X: Sequence[np.ndarray], Y: Sequence[np.ndarray], thresh: float = 0.5) -> dict:
    """F1/precision/recall etc. at IoU ``thresh`` (stardist.matching.matching_dataset) on
    normalised images ``X`` with the model's current thresholds."""
    from stardist.matching import matching_dataset

    preds = [model.predict_instances(x, show_tile_progress=False, verbose=False)[0] for x in X]
    s = matching_dataset([np.maximum(y, 0) for y in Y], preds, thresh=thresh, show_progress=False)
    d = s._asdict()
    keep = (
        "criterion",
        "thresh",
        "fp",
        "tp",
        "fn",
        "precision",
        "recall",
        "accuracy",
        "f1",
        "n_true",
        "n_pred",
        "mean_true_score",
        "mean_matched_score",
        "panoptic_quality",
    )
    out = {k: d[k] for k in keep if k in d}
    for k, v in list(out.items()):
        if isinstance(v, (float, np.floating)):
            out[k] = round(float(v), 4)
        elif isinstance(v, (np.integer,)):
            out[k] = int(v)
    return out


def _model_md(card: dict) -> str:
    t, v = card["training"], card.get("validation", {})
    arch = card["architecture"]
    lines = [
        f"# {card['name']} — StarDist nucleus model for {card['stain'].upper()} (RGB)",
        "",
        f"A StarDist 2D model (`stardist {card['versions'].get('stardist', '?')}`, `csbdeep "
        f"{card['versions'].get('csbdeep', '?')}`) that segments nuclei in RGB H&E images at "
        f"**{card['mpp']} µm/px**. Images at any other pixel size must be resampled to "
        f"{card['mpp']} µm/px before prediction (histo's pipeline does this).",
        "",
        "## Input",
        "",
        f"- Pixel size: {card['mpp']} µm/px.",
        f"- Normalisation: fixed, `x / 255` on uint8 RGB (`{json.dumps(card['normalize'])}`). It does not "
        "depend on the tile, so a slide cut into tiles gives the same result as the whole image.",
        f"- Largest expected nucleus: {card['max_nucleus_um']} µm (the tile halo is at least this wide; "
        "99.9 % of the training nuclei are shorter; the longest outline is "
        f"{card.get('max_nucleus_um_observed', '?')} µm).",
        f"- Thresholds: prob {card['thresholds'].get('prob')}, nms {card['thresholds'].get('nms')} "
        "(optimised on the validation images with `optimize_thresholds`).",
        "",
        "## Architecture",
        "",
        f"U-Net depth {arch['unet_n_depth']}, {arch['unet_n_filter_base']} base filters, "
        f"{arch['n_rays']} rays, grid {tuple(arch['grid'])}, {arch['n_channel_in']} input channels "
        f"({arch.get('n_params', '?')} parameters).",
        "",
        "## Training",
        "",
        f"- Data: {t['n_images']} images ({t['n_train']} training, {t['n_val']} validation, split by "
        f"image with seed {t['seed']}).",
    ]
    for s in t.get("sources", []):
        extra = f" — {s['note']}" if s.get("note") else ""
        lines.append(
            f"  - {s.get('name')}: {s.get('n_images', '?')} images, licence: {s.get('licence', 'unknown')}{extra}"
        )
    lines += [
        f"- {t['epochs']} epochs × {t['steps_per_epoch']} steps, batch {t['batch_size']}, patches "
        f"{t['patch_size']}², learning rate {t['learning_rate']} (Adam, halved on plateau"
        + "".join(f"; set to {c['to']} after epoch {c['epoch']}" for c in t.get("learning_rate_changes", []))
        + ").",
        f"- Augmentation: flips and 90° rotations, H and E stain jitter in optical-density space "
        f"(Ruifrok vectors, concentrations ×(1 ± {t['augmentation'].get('stain_scale', '?')})"
        + "".join(f"; ±{c['from']} until epoch {c['epoch']}" for c in t.get("stain_scale_changes", []))
        + f"), brightness/contrast, ±{int(round(t['augmentation'].get('scale_range', 0) * 100))} % "
        "scale jitter, Gaussian noise.",
        f"- Wall time: {t['wall_time_s']:.0f} s on {t.get('machine', '?')}.",
    ]
    if t.get("command"):
        cmd = str(t["command"])
        lines += ["- Command:", "", "```", cmd, "```"] if "\n" in cmd else [f"- Command: `{cmd}`"]
    lines += ["", "## Validation (held-out images, IoU ≥ 0.5)", ""]
    if v:
        lines += [
            f"F1 {v.get('f1')}, precision {v.get('precision')}, recall {v.get('recall')} "
            f"({v.get('n_true')} true nuclei, {v.get('n_pred')} predicted, mean matched IoU "
            f"{v.get('mean_matched_score')}, panoptic quality {v.get('panoptic_quality')}).",
        ]
    else:
        lines.append("Not evaluated.")
    evals = card.get("evaluations") or []
    if evals:
        lines += [
            "",
            "## Evaluation on annotated images never used for training (`histo evaluate`)",
            "",
            "Pooled over the images; nuclei matched at IoU ≥ 0.5; PQ = panoptic quality, AJI = aggregated "
            "Jaccard index.",
            "",
            "| dataset | images | true nuclei | precision | recall | F1 | mean IoU | PQ | AJI |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for ev in evals:
            sc = ev["pooled"]
            lines.append(
                f"| {ev['dataset']} | {ev['n_images']} | {sc['n_true']} | {sc['precision']:.3f} | "
                f"{sc['recall']:.3f} | {sc['f1']:.3f} | {sc['mean_iou']:.3f} | {sc['pq']:.3f} | {sc['aji']:.3f} |"
            )
        typed = [ev for ev in evals if any(k.startswith("f1_") for k in ev["pooled"])]
        for ev in typed:
            lines += [
                "",
                f"Per-class F1 on {ev['dataset']} (matched at IoU ≥ 0.5 and both say the class): "
                + ", ".join(f"{k[3:]} {v:.3f}" for k, v in sorted(ev["pooled"].items()) if k.startswith("f1_"))
                + ".",
            ]
        lines += [""] + [f"- {ev['dataset']}: `{ev['command']}`" for ev in evals if ev.get("command")]
    if card.get("nucleus_classes"):
        lines += _classes_md(card["nucleus_classes"])
    if card.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card["notes"]]
    licences = sorted({s.get("licence", "unknown") for s in t.get("sources", [])})
    lines += [
        "",
        "## Licence of the training data",
        "",
        "This model was trained on: " + (", ".join(licences) if licences else "unknown") + ". "
        "A model inherits the obligations of its training data (e.g. CC BY-NC-SA: "
        "non-commercial use, attribution, share-alike).",
        "",
    ]
    return "\n".join(lines)


def _classes_md(c: dict) -> list[str]:
    """The model card's section on the nucleus classifier (histo.train.classes)."""
    v = c.get("validation", {})
    lines = [
        "",
        "## Nucleus classes",
        "",
        f"A separate classifier (`{c['file']}`, histo.segment.nucleus_classes) gives every nucleus one of "
        f"{', '.join(c['classes'])} from a {c.get('patch_px')}² patch at {c.get('patch_mpp')} µm/px and the "
        "nucleus outline; histo's typing keeps the class and splits off large pale nuclei (`large`).",
    ]
    for src in c.get("sources", []):
        lines.append(
            f"- Data: {src['name']} ({src['n_tiles']} tiles at {src['mpp']} µm/px), licence: {src['licence']}."
        )
    if c.get("n_train_nuclei"):
        lines.append(
            f"- {c['n_train_nuclei']} training nuclei ({c.get('train_counts')}), {c['n_val_nuclei']} validation "
            f"nuclei in the validation tiles {', '.join(c.get('val_tiles', []))}; best epoch {c.get('best_epoch')} of "
            f"{c.get('epochs_run')}; {c.get('wall_time_s', 0):.0f} s."
        )
    if v:
        lines.append(
            f"- Validation on the expert outlines (class only): accuracy {v['accuracy']}; F1 "
            + ", ".join(f"{k} {v[k]['f1']}" for k in c["classes"] if k in v)
            + "."
        )
    if c.get("command"):
        lines.append(f"- Command: `{c['command']}`")
    return lines


def write_model_md(folder: Path | str) -> Path:
    """(Re)write ``MODEL.md`` from ``card.json`` (e.g. after adding an evaluation to the card)."""
    folder = Path(folder)
    card = json.loads((folder / "card.json").read_text())
    (folder / "MODEL.md").write_text(_model_md(card))
    return folder / "MODEL.md"


# ---------------------------------------------------------------- training
def _load_data(images, masks, image_mpp, mpp):
    images = [Path(p) for p in images]
    masks = [Path(p) for p in masks]
    if len(images) != len(masks):
        raise HistoError(None, f"{len(images)} images but {len(masks)} masks")
    if isinstance(image_mpp, (int, float)):
        image_mpp = [float(image_mpp)] * len(images)
    image_mpp = [float(m) for m in image_mpp]
    if len(image_mpp) != len(images):
        raise HistoError(None, f"{len(images)} images but {len(image_mpp)} pixel sizes")
    X, Y = [], []
    for ip, mp, m in zip(images, masks, image_mpp):
        img, msk = read_pair(ip, mp)
        img, msk = resample_pair(img, msk, m, mpp)
        X.append(img)
        Y.append(msk)
    return images, X, Y


def train(
    images: Sequence[Path | str],
    masks: Sequence[Path | str],
    out_dir: Path | str,
    mpp: float,
    image_mpp: Sequence[float] | float,
    epochs: int = 50,
    steps_per_epoch: int = 100,
    patch_size: int = 256,
    val_fraction: float = 0.15,
    seed: int = 0,
    n_rays: int = 32,
    grid: tuple[int, int] = (2, 2),
    unet_n_depth: int = 3,
    unet_n_filter_base: int = 32,
    resume: bool = True,
    batch_size: int = 4,
    learning_rate: float | None = None,
    reduce_lr: dict | None = None,
    augment: bool | object = True,
    stain_scale: float | None = None,
    sources: list[dict] | None = None,
    name: str | None = None,
    stain: str = "he",
    command: str | None = None,
    notes: list[str] | None = None,
    optimize: bool = True,
    finalize: bool = True,
    overwrite: bool = False,
    extra_callbacks: list | None = None,
    return_model: bool = False,
    init_weights: Path | str | None = None,
    nms_threshs: Sequence[float] = (0.3, 0.4, 0.5),
    verbose: int = 1,
):
    """Train (or resume) a StarDist 2D model for RGB H&E nuclei; returns the model folder.

    images, masks : paired files (RGB uint8; instance labels, 0 = background).
    out_dir : the model folder to write (its name is the model name unless ``name`` is given —
        ``name`` only changes the card, the folder name is what StarDist loads).
    mpp : the pixel size (µm/px) the model works at; every image is resampled from ``image_mpp``
        (one value, or one per image) to ``mpp`` (images anti-aliased, masks nearest).
    val_fraction, seed : validation images are a seeded fraction of the images (split by image).
    resume : if ``out_dir`` holds ``weights_last.h5`` + ``train_state.json`` of an unfinished run,
        continue it with the remaining epochs (same split, steps per epoch and config); ``epochs``
        larger than the saved total extends the run; if the run is complete, only the finishing
        steps (thresholds, card) are redone.
    learning_rate : Adam's rate for a new run (default DEFAULT_LEARNING_RATE); when resuming, a
        given rate replaces the saved one from the next epoch on (recorded in the card).
    augment : True = ``histo.train.augment.HEAugmenter(seed=seed)``, False/None = none, or a callable.
    stain_scale : strength of the H and E concentration jitter (``HEAugmenter.stain_scale``, a
        fraction: 0.4 = ×0.6–×1.4); when resuming, a new value applies from the next epoch on and,
        because the validation loss is then no longer comparable, the best-weights tracking starts
        afresh (the change is recorded in the card).
    sources : training-data provenance for the card: list of {name, licence, n_images, [note]}.
    reduce_lr : ReduceLROnPlateau parameters (default factor 0.5, patience max(5, epochs // 8)).
    optimize : run ``optimize_thresholds`` on the validation images (else default 0.5 / 0.4).
    finalize : delete weights_last.h5 / train_state.json at the end (folder stays small); keep
        them (False) to be able to extend the training later.
    return_model : return ``(folder, model)`` instead of ``folder`` (the in-memory StarDist2D).
    extra_callbacks : more Keras callbacks (run after the checkpoint/state ones).
    overwrite : a folder that already holds a trained model (weights_best.h5) and no unfinished
        run to resume is an error unless ``overwrite=True``.
    init_weights : a model folder (``config.json`` + ``weights_best.h5``) whose architecture and
        weights a new run starts from (fine-tuning); ignored when resuming, recorded in the card.
    nms_threshs : the NMS thresholds ``optimize_thresholds`` tries (each costs a sweep of prob thresholds).
    """
    t_start = time.time()
    out_dir = Path(out_dir).resolve()
    model_name = out_dir.name
    basedir = out_dir.parent
    basedir.mkdir(parents=True, exist_ok=True)

    import tensorflow as tf  # noqa: F401  (imports keras backend before stardist)
    from stardist.models import Config2D, StarDist2D

    Keras = __import__("keras")
    Callback = Keras.callbacks.Callback
    ModelCheckpoint = Keras.callbacks.ModelCheckpoint

    images_p, X_u8, Y = _load_data(images, masks, image_mpp, mpp)
    small = [str(p) for p, x in zip(images_p, X_u8) if min(x.shape[:2]) < patch_size]
    if small:
        raise HistoError(
            small[0],
            f"image is smaller than the patch size {patch_size} px at "
            f"{mpp} µm/px ({len(small)} such images); use a smaller patch_size",
        )

    state_path = out_dir / STATE_FILE
    state = _read_json(state_path) if resume else None
    resuming = bool(state) and (out_dir / "weights_last.h5").exists() and (out_dir / "config.json").exists()
    if resuming:
        if [str(p) for p in images_p] != state.get("images"):
            raise HistoError(
                out_dir,
                "cannot resume: the training images differ from the saved run (delete train_state.json to start again)",
            )
        tr_idx, va_idx = state["split"]["train"], state["split"]["val"]
        if int(epochs) > int(state["epochs_total"]):  # asked for more: extend the run
            state["epochs_total"] = int(epochs)
            state["complete"] = False
        epochs = int(state["epochs_total"])
        steps_per_epoch = int(state["steps_per_epoch"])
        if learning_rate is not None:  # e.g. a lower rate for the last epochs
            state.setdefault("learning_rate_changes", []).append(
                {"epoch": int(state["epochs_done"]), "from": state["learning_rate"], "to": float(learning_rate)}
            )
            state["learning_rate"] = float(learning_rate)
        saved_scale = state.get("stain_scale", HEAugmenter.stain_scale)
        if stain_scale is not None and float(stain_scale) != float(saved_scale):
            state.setdefault("stain_scale_changes", []).append(
                {"epoch": int(state["epochs_done"]), "from": saved_scale, "to": float(stain_scale)}
            )
            state["stain_scale"] = float(stain_scale)
            state["best_val_loss"] = None
    else:
        learning_rate = DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate
        if (out_dir / "weights_best.h5").exists() and not overwrite:
            raise HistoError(
                out_dir,
                "already holds a trained model and no unfinished run to resume; "
                "pass overwrite=True (or another folder) to train a new one",
            )
        tr_idx, va_idx = split_by_image(len(X_u8), val_fraction, seed)
        if out_dir.exists():
            for f in (
                "weights_best.h5",
                "weights_last.h5",
                "weights_now.h5",
                "thresholds.json",
                "card.json",
                "MODEL.md",
                STATE_FILE,
                "config.json",
            ):
                (out_dir / f).unlink(missing_ok=True)
            shutil.rmtree(out_dir / "logs", ignore_errors=True)
        state = {
            "images": [str(p) for p in images_p],
            "split": {"train": tr_idx, "val": va_idx},
            "epochs_total": int(epochs),
            "steps_per_epoch": int(steps_per_epoch),
            "epochs_done": 0,
            "best_val_loss": None,
            "learning_rate": float(learning_rate),
            "wall_time_s": 0.0,
            "complete": False,
            "seed": int(seed),
            "stain_scale": float(HEAugmenter.stain_scale if stain_scale is None else stain_scale),
            "init_weights": _init_name(init_weights),
        }

    X = [_as_float(x) for x in X_u8]
    X_tr, Y_tr = [X[i] for i in tr_idx], [Y[i] for i in tr_idx]
    X_va, Y_va = [X[i] for i in va_idx], [Y[i] for i in va_idx]

    if reduce_lr is None:
        reduce_lr = {"factor": 0.5, "patience": max(5, epochs // 8), "min_delta": 0}

    if resuming:
        model = StarDist2D(None, name=model_name, basedir=str(basedir))
        model.load_weights("weights_last.h5")
    else:
        if init_weights is not None:
            n_rays, grid, unet_n_depth, unet_n_filter_base = _init_architecture(Path(init_weights))
        conf = Config2D(
            n_rays=n_rays,
            grid=tuple(grid),
            n_channel_in=3,
            unet_n_depth=unet_n_depth,
            unet_n_filter_base=unet_n_filter_base,
            train_patch_size=(patch_size, patch_size),
            train_batch_size=batch_size,
            train_learning_rate=learning_rate,
            train_epochs=epochs,
            train_steps_per_epoch=steps_per_epoch,
            train_reduce_lr=reduce_lr,
            train_tensorboard=False,
            use_gpu=False,
        )
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="output path for model already exists")
            model = StarDist2D(conf, name=model_name, basedir=str(basedir))
        if init_weights is not None:
            model.keras_model.load_weights(str(Path(init_weights) / "weights_best.h5"))
        _write_json(state_path, state)

    if augment is True:
        augmenter = HEAugmenter(
            seed=seed + int(state["epochs_done"]), stain_scale=float(state.get("stain_scale", HEAugmenter.stain_scale))
        )
    elif not augment:
        augmenter = None
    else:
        augmenter = augment

    remaining = int(state["epochs_total"]) - int(state["epochs_done"])
    wall_before = float(state.get("wall_time_s", 0.0))
    if remaining > 0:
        model.prepare_for_training()
        done0 = int(state["epochs_done"])
        for cb in model.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_best_only and state.get("best_val_loss") is not None:
                cb.best = float(state["best_val_loss"])
        if resuming:
            try:
                model.keras_model.optimizer.learning_rate.assign(float(state["learning_rate"]))
            except Exception:  # noqa: BLE001
                model.keras_model.optimizer.learning_rate = float(state["learning_rate"])

        t_fit = time.time()

        class _State(Callback):
            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                model.keras_model.save_weights(str(out_dir / "weights_last.h5"))
                vl = logs.get("val_loss")
                if vl is not None and np.isfinite(vl):
                    b = state.get("best_val_loss")
                    state["best_val_loss"] = float(vl) if b is None else min(float(b), float(vl))
                state["epochs_done"] = done0 + epoch + 1
                try:
                    state["learning_rate"] = float(np.asarray(model.keras_model.optimizer.learning_rate))
                except Exception:  # noqa: BLE001
                    pass
                state["wall_time_s"] = wall_before + (time.time() - t_fit)
                hist = state.setdefault("history", [])
                hist.append(
                    {k: round(float(v), 5) for k, v in logs.items() if isinstance(v, (int, float, np.floating))}
                    | {"epoch": state["epochs_done"]}
                )
                _write_json(state_path, state)

        model.callbacks.append(_State())
        model.callbacks.extend(extra_callbacks or [])
        if verbose:
            print(
                f"[histo.train] {model_name}: epochs {state['epochs_done']}→{state['epochs_total']} "
                f"× {state['steps_per_epoch']} steps; {len(X_tr)} train / {len(X_va)} val images",
                flush=True,
            )
        model.train(
            X_tr,
            Y_tr,
            validation_data=(X_va, Y_va),
            augmenter=augmenter,
            seed=seed + int(state["epochs_done"]),
            epochs=remaining,
            steps_per_epoch=int(state["steps_per_epoch"]),
        )
        # model.train reloads weights_best.h5 at the end (csbdeep _training_finished)
        state["complete"] = True
        state["wall_time_s"] = wall_before + (time.time() - t_fit)
        _write_json(state_path, state)
    else:
        if (out_dir / "weights_best.h5").exists():
            model.load_weights("weights_best.h5")
        state["complete"] = True

    # thresholds on the validation images
    t_opt = time.time()
    if optimize:
        model.optimize_thresholds(
            X_va, Y_va, nms_threshs=list(nms_threshs), predict_kwargs={"show_tile_progress": False}
        )
    else:
        model.thresholds = {"prob": 0.5, "nms": 0.4}
        _write_json(out_dir / "thresholds.json", {"prob": 0.5, "nms": 0.4})
    scores = evaluate(model, X_va, Y_va, thresh=0.5)
    t_opt = time.time() - t_opt

    max_um, obs_um = _max_nucleus_um(Y, mpp)
    n_params = int(model.keras_model.count_params())
    aug_dict = (
        augmenter.as_dict()
        if hasattr(augmenter, "as_dict")
        else ({} if augmenter is None else {"callable": repr(augmenter)})
    )
    import platform

    card = {
        "name": name or model_name,
        "format": "stardist-2d",
        "stain": stain,
        "mpp": float(mpp),
        "normalize": dict(NORMALIZE_FIXED),
        "n_channels": 3,
        "max_nucleus_um": max_um,
        "max_nucleus_um_observed": obs_um,
        "thresholds": {"prob": float(model.thresholds.prob), "nms": float(model.thresholds.nms)},
        "n_rays": int(model.config.n_rays),
        "grid": list(model.config.grid),
        "architecture": {
            "kind": "StarDist2D U-Net",
            "unet_n_depth": int(model.config.unet_n_depth),
            "unet_n_filter_base": int(model.config.unet_n_filter_base),
            "n_rays": int(model.config.n_rays),
            "grid": list(model.config.grid),
            "n_channel_in": int(model.config.n_channel_in),
            "n_params": n_params,
        },
        "training": {
            "sources": list(sources or []),
            "n_images": len(X),
            "n_train": len(X_tr),
            "n_val": len(X_va),
            "val_images": [Path(images_p[i]).name for i in va_idx],
            "image_mpp": sorted(
                set(float(m) for m in ([image_mpp] if isinstance(image_mpp, (int, float)) else image_mpp))
            ),
            "seed": int(seed),
            "epochs": int(state["epochs_total"]),
            "steps_per_epoch": int(state["steps_per_epoch"]),
            "batch_size": int(model.config.train_batch_size),
            "patch_size": int(model.config.train_patch_size[0]),
            "learning_rate": float(model.config.train_learning_rate),
            "learning_rate_changes": state.get("learning_rate_changes", []),
            "stain_scale_changes": state.get("stain_scale_changes", []),
            "augmentation": aug_dict,
            "wall_time_s": round(float(state["wall_time_s"]), 1),
            "thresholds_and_eval_s": round(t_opt, 1),
            "total_wall_time_s_this_call": round(time.time() - t_start, 1),
            "best_val_loss": state.get("best_val_loss"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.system()}",
            "command": command,
            "history": state.get("history", []),
            "init_weights": state.get("init_weights"),
        },
        "validation": scores,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": list(notes or []),
    }
    _write_json(out_dir / "card.json", card)
    (out_dir / "MODEL.md").write_text(_model_md(card))

    if finalize:
        for f in ("weights_last.h5", "weights_now.h5", STATE_FILE):
            (out_dir / f).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "logs", ignore_errors=True)
    if verbose:
        print(
            f"[histo.train] wrote {out_dir}: F1@0.5 = {scores.get('f1')} "
            f"(P {scores.get('precision')}, R {scores.get('recall')}), thresholds {card['thresholds']}",
            flush=True,
        )
    return (out_dir, model) if return_model else out_dir


def _init_name(init_weights: Path | str | None) -> str | None:
    """How the card names the model a run started from: its folder name (no machine paths)."""
    return None if init_weights is None else Path(init_weights).resolve().name


def _init_architecture(folder: Path) -> tuple[int, tuple[int, int], int, int]:
    """(n_rays, grid, unet depth, base filters) of the model folder a run starts from."""
    conf = _read_json(folder / "config.json")
    if conf is None or not (folder / "weights_best.h5").is_file():
        raise HistoError(folder, "cannot start from this model: it needs config.json and weights_best.h5")
    if conf.get("n_channel_in") != 3 or conf.get("n_classes") not in (None, 0):
        raise HistoError(folder, "cannot start from this model: it is not a 3-channel StarDist model without classes")
    return int(conf["n_rays"]), tuple(conf["grid"]), int(conf["unet_n_depth"]), int(conf["unet_n_filter_base"])


def read_mpp_table(path: Path | str) -> dict[str, float]:
    """File stem -> µm/px from a CSV with columns ``image`` (file name or stem) and ``mpp``."""
    import pandas as pd

    path = Path(path)
    try:
        t = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001
        raise HistoError(path, f"cannot read the pixel-size table: {e}") from e
    if not {"image", "mpp"} <= set(t.columns):
        raise HistoError(path, f"pixel-size table needs columns 'image' and 'mpp', has {list(t.columns)}")
    out = {}
    for name, m in zip(t["image"].astype(str), pd.to_numeric(t["mpp"], errors="coerce")):
        if not (m > 0):
            raise HistoError(path, f"image {name!r}: pixel size must be a positive number")
        out[Path(name).stem] = float(m)
    return out


def pixel_sizes(spec: float | str | Path, where: str | Path | None = None) -> Callable[[str], float | None]:
    """µm/px by file stem: ``spec`` is one positive number for every image, or a CSV
    (:func:`read_mpp_table`), whose lookup gives None for a stem it lacks. ``where`` names the
    folder in the error for a non-positive number."""
    try:
        one = float(spec)
    except (TypeError, ValueError):
        return read_mpp_table(spec).get
    if one <= 0:
        raise HistoError(where, f"pixel size must be positive, got {one}")
    return lambda stem: one


def dataset_pairs(images_dir, masks_dir, image_mpp: float | str | Path) -> list[tuple[Path, Path, float]]:
    """(image, mask, µm/px) for one folder pair; ``image_mpp`` is one number for the folder or a
    CSV file (``read_mpp_table``) giving each image its own."""
    pairs = pairs_from_folders(images_dir, masks_dir)
    mpp_of = pixel_sizes(image_mpp, images_dir)
    missing = [i for i, _ in pairs if mpp_of(i.stem) is None]
    if missing:
        raise HistoError(missing[0], f"no pixel size for this image in {image_mpp} ({len(missing)} missing)")
    return [(i, m, mpp_of(i.stem)) for i, m in pairs]


def main_train(datasets: Sequence[tuple], out, mpp: float, epochs: int, steps: int, **kwargs) -> Path:
    """Train from folder pairs: ``datasets`` = [(images_dir, masks_dir, image_mpp, licence), ...]
    (``image_mpp`` a number or a CSV, see ``dataset_pairs``). Each becomes a source in the card."""
    ims, mks, mpps, sources = [], [], [], []
    for images_dir, masks_dir, image_mpp, licence in datasets:
        rows = dataset_pairs(images_dir, masks_dir, image_mpp)
        sources.append(
            {
                "name": str(images_dir),
                "licence": licence or "unknown",
                "n_images": len(rows),
                "image_mpp": sorted({m for _, _, m in rows}),
            }
        )
        for i, m, p in rows:
            ims.append(i), mks.append(m), mpps.append(p)
    kwargs.setdefault("command", " ".join(sys.argv) if sys.argv else None)
    kwargs.setdefault("sources", sources)
    return train(ims, mks, Path(out), mpp=mpp, image_mpp=mpps, epochs=epochs, steps_per_epoch=steps, **kwargs)
