"""Training our own StarDist nucleus models (H&E, RGB, fixed x/255 normalisation).

``train(...)`` writes a model folder that ``histo.segment.models.resolve_model(FOLDER)`` loads:
``config.json``, ``thresholds.json``, ``weights_best.h5``, ``card.json`` (machine-readable model
card: scale, normalisation, architecture, training data and licences, validation scores, and the
run's :class:`TrainConfig` under ``training.config``) and ``MODEL.md`` (the same in prose). While
training it also keeps ``weights_last.h5`` and ``train_state.json`` (epochs done, best validation
loss, learning rate, split) so an interrupted run resumes with the remaining epochs;
``finalize=True`` (default) removes both at the end and the folder stays a few MB.

Resuming restores the weights, Adam's state, the learning rate and the best validation loss, and
takes the validation loss on the same crops as before (so ``weights_best.h5`` is only overwritten by
a better epoch). The settings are :class:`~histo.train.config.TrainConfig`; ``MODEL.md`` is written
by :mod:`histo.train.model_card`.

A run is six phases, each a function: :func:`load_training_data` (read, resample, check the
pairs), :func:`start_run` (a new ``train_state.json`` or the saved one of a run to resume),
:func:`build_model` (a new network, one started from ``init_weights``, or the saved one),
:func:`fit` (the remaining epochs, checkpointing every epoch), :func:`optimise_thresholds` (on the
validation images) and :func:`write_card`.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError
from histo.io.files import atomic_write, read_json, write_json
from histo.run.provenance import versions
from histo.segment.models import NORMALIZE_FIXED
from histo.timing import Stopwatch, stopwatch
from histo.train.augment import HEAugmenter
from histo.train.config import AUGMENTATION_SETTINGS, DEFAULT_LEARNING_RATE, TrainConfig, augmentation_setting
from histo.train.data import (
    dataset_pairs,
    load_pairs,
    pairs_from_folders,
    patch_grid,
    pixel_sizes,
    read_mpp_table,
    read_pair,
    resample_pair,
    split_by_image,
)
from histo.train.model_card import model_md

__all__ = [
    "TrainConfig",
    "train",
    "main_train",
    "load_training_data",
    "start_run",
    "build_model",
    "fit",
    "optimise_thresholds",
    "score_validation",
    "write_card",
    "STATE_FILE",
    # reading data, from histo.train.data (imported from here by histo.cli and histo.train.classes)
    "pairs_from_folders",
    "dataset_pairs",
    "read_mpp_table",
    "pixel_sizes",
    "read_pair",
    "resample_pair",
    "split_by_image",
]

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer_last.npz"  # Adam's step count and moments after the last epoch, for a resume
#: what the validation loss is computed on (``state["validation_patches"]``): :func:`fit`'s fixed crops.
#: Runs saved before it was recorded were scored on one random patch per validation image, redrawn at
#: every call; a resume of such a run restarts the best-weights tracking.
VALIDATION_PATCHES = "grid covering each validation image"
#: at most this many validation pixels in those crops: StarDist holds them with their targets in memory,
#: about 46 bytes per pixel (image 12, probability 1, 32 rays and their mask 33, at grid 2), so 0.74 GB
VALIDATION_PIXELS = 16_000_000
#: files of a model folder that a new run (not a resumed one) deletes first
_RUN_FILES = (
    "weights_best.h5",
    "weights_last.h5",
    "weights_now.h5",
    "thresholds.json",
    "card.json",
    "MODEL.md",
    STATE_FILE,
    OPTIMIZER_FILE,
    "config.json",
)


def _as_float(img: np.ndarray) -> np.ndarray:
    """The fixed normalisation x/255 (identical to histo.segment.models.normalize_image for our models)."""
    lo, hi = NORMALIZE_FIXED["low"], NORMALIZE_FIXED["high"]
    return (img.astype(np.float32) - lo) / float(hi - lo)


def _stardist():
    """StarDist's ``Config2D`` and ``StarDist2D`` (TensorFlow imported first, so Keras gets its backend)."""
    import tensorflow as tf  # noqa: F401  (imports keras backend before stardist)
    from stardist.models import Config2D, StarDist2D

    return Config2D, StarDist2D


# ---------------------------------------------------------------- phases of a run
def load_training_data(
    images: Sequence[Path | str], masks: Sequence[Path | str], image_mpp: Sequence[float] | float, config: TrainConfig
) -> tuple[list[Path], list[np.ndarray], list[np.ndarray]]:
    """Phase 1: the image / mask pairs at ``config.mpp`` (:func:`histo.train.data.load_pairs`).

    Parameters
    ----------
    images, masks : sequences of str or Path
        Paired files (RGB uint8; instance labels, 0 = background).
    image_mpp : float or sequence of float
        Their pixel size, µm/px: one for all or one per image.
    config : TrainConfig
        ``mpp`` and ``patch_size`` are used.

    Returns
    -------
    paths : list of Path
        The images.
    X, Y : lists of numpy.ndarray
        uint8 RGB images and int32 labels at ``config.mpp``.

    Raises
    ------
    HistoError
        Naming a file that cannot be read, or an image smaller than the patch size.
    """
    paths, X, Y = load_pairs(images, masks, image_mpp, config.mpp)
    small = [str(p) for p, x in zip(paths, X) if min(x.shape[:2]) < config.patch_size]
    if small:
        raise HistoError(
            small[0],
            f"image is smaller than the patch size {config.patch_size} px at "
            f"{config.mpp} µm/px ({len(small)} such images); use a smaller patch_size",
        )
    return paths, X, Y


def start_run(
    out_dir: Path,
    images: Sequence[Path],
    config: TrainConfig,
    *,
    resume: bool = True,
    overwrite: bool = False,
    init_weights: Path | str | None = None,
) -> tuple[dict, bool]:
    """Phase 2: the run's state, new or the saved one of an unfinished run in ``out_dir``.

    A run resumes when ``out_dir`` holds ``train_state.json``, ``weights_last.h5`` and ``config.json``
    (and ``resume``): its split, epochs and steps per epoch are kept; ``config.epochs`` larger than the
    saved total extends the run; a given ``config.learning_rate`` or augmentation setting
    (:data:`AUGMENTATION_SETTINGS`) applies from the next epoch on and is recorded as a change (a new
    augmentation also restarts the best-weights tracking, since the validation loss is no longer
    comparable; so does a run saved before :data:`VALIDATION_PATCHES`). A new run deletes the files of
    an earlier one (:data:`_RUN_FILES`, ``logs/``) first.

    Parameters
    ----------
    out_dir : Path
        The model folder (resolved).
    images : sequence of Path
        The training images, in order (a resumed run must have the same ones).
    config : TrainConfig
        The settings of this call.
    resume : bool
        Whether to continue an unfinished run.
    overwrite : bool
        Whether a new run may replace a trained model (``weights_best.h5``) in ``out_dir``.
    init_weights : str or Path, optional
        The model folder a new run starts from (its name is recorded).

    Returns
    -------
    state : dict
        The contents of ``train_state.json`` (not yet written for a new run).
    resuming : bool
        Whether the saved run continues.
    """
    state = read_json(out_dir / STATE_FILE, missing=None) if resume else None
    resuming = bool(state) and (out_dir / "weights_last.h5").exists() and (out_dir / "config.json").exists()
    if resuming:
        if [str(p) for p in images] != state.get("images"):
            raise HistoError(
                out_dir,
                "cannot resume: the training images differ from the saved run (delete train_state.json to start again)",
            )
        if int(config.epochs) > int(state["epochs_total"]):  # asked for more: extend the run
            state["epochs_total"] = int(config.epochs)
            state["complete"] = False
        if config.learning_rate is not None:  # e.g. a lower rate for the last epochs
            _record_change(state, "learning_rate", state["learning_rate"], float(config.learning_rate))
        for key in AUGMENTATION_SETTINGS:  # a changed augmentation applies from now on
            saved, given = augmentation_setting(state, key), getattr(config, key)
            if given is not None and float(given) != saved:
                _record_change(state, key, saved, float(given))
                state["best_val_loss"] = None
        saved_val = state.get("validation_patches", "one random patch per validation image, redrawn at each call")
        if saved_val != VALIDATION_PATCHES:  # a loss on other patches is not comparable with the saved best
            _record_change(state, "validation_patches", saved_val, VALIDATION_PATCHES)
            state["best_val_loss"] = None
        return state, True

    if (out_dir / "weights_best.h5").exists() and not overwrite:
        raise HistoError(
            out_dir,
            "already holds a trained model and no unfinished run to resume; "
            "pass overwrite=True (or another folder) to train a new one",
        )
    tr_idx, va_idx = split_by_image(len(images), config.val_fraction, config.seed)
    if out_dir.exists():
        for f in _RUN_FILES:
            (out_dir / f).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "logs", ignore_errors=True)
    state = {
        "images": [str(p) for p in images],
        "split": {"train": tr_idx, "val": va_idx},
        "epochs_total": int(config.epochs),
        "steps_per_epoch": int(config.steps_per_epoch),
        "epochs_done": 0,
        "best_val_loss": None,
        "learning_rate": float(DEFAULT_LEARNING_RATE if config.learning_rate is None else config.learning_rate),
        "wall_time_s": 0.0,
        "complete": False,
        "seed": int(config.seed),
        **{
            k: float(getattr(HEAugmenter, k) if getattr(config, k) is None else getattr(config, k))
            for k in AUGMENTATION_SETTINGS
        },
        "init_weights": _init_name(init_weights),
        "validation_patches": VALIDATION_PATCHES,
    }
    return state, False


def _record_change(state: dict, key: str, saved, new) -> None:
    """Set a resumed run's ``key`` to ``new`` and list the change under ``{key}_changes`` (the epochs
    done, the value before and after), where the card and MODEL.md read it."""
    state.setdefault(f"{key}_changes", []).append({"epoch": int(state["epochs_done"]), "from": saved, "to": new})
    state[key] = new


def build_model(
    out_dir: Path, config: TrainConfig, state: dict, resuming: bool, init_weights: Path | str | None = None
):
    """Phase 3: the StarDist2D model of the run, named after ``out_dir`` and saved in it.

    Parameters
    ----------
    out_dir : Path
        The model folder (resolved); StarDist writes ``config.json`` there for a new run.
    config : TrainConfig
        Architecture and training settings of a new run.
    state : dict
        The run's state (:func:`start_run`): its learning rate.
    resuming : bool
        Load the saved ``config.json`` and ``weights_last.h5`` instead of building a network.
    init_weights : str or Path, optional
        A model folder (``config.json`` + ``weights_best.h5``) whose architecture and weights a new run
        starts from (fine-tuning).

    Returns
    -------
    stardist.models.StarDist2D
    """
    Config2D, StarDist2D = _stardist()
    if resuming:
        model = StarDist2D(None, name=out_dir.name, basedir=str(out_dir.parent))
        model.load_weights("weights_last.h5")
        return model
    if init_weights is not None:
        config = config.with_settings(**_init_architecture(Path(init_weights)))
    reduce_lr = config.reduce_lr
    if reduce_lr is None:
        reduce_lr = {"factor": 0.5, "patience": max(5, config.epochs // 8), "min_delta": 0}
    conf = Config2D(
        n_rays=config.n_rays,
        grid=config.grid,
        n_channel_in=3,
        unet_n_depth=config.unet_n_depth,
        unet_n_filter_base=config.unet_n_filter_base,
        net_conv_after_unet=config.net_conv_after_unet,
        train_patch_size=(config.patch_size, config.patch_size),
        train_batch_size=config.batch_size,
        train_learning_rate=state["learning_rate"],
        train_epochs=config.epochs,
        train_steps_per_epoch=config.steps_per_epoch,
        train_reduce_lr=reduce_lr,
        train_tensorboard=False,
        use_gpu=False,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="output path for model already exists")
        model = StarDist2D(conf, name=out_dir.name, basedir=str(out_dir.parent))
    if init_weights is not None:
        model.keras_model.load_weights(str(Path(init_weights) / "weights_best.h5"))
    return model


def _augmenter(augment, seed: int, state: dict):
    """``augment`` as StarDist's ``augmenter``: True = HEAugmenter at the run's stain scale, seeded by
    the epochs done; False/None = none; else the callable itself."""
    if augment is True:
        return HEAugmenter(
            seed=seed + int(state["epochs_done"]), **{k: augmentation_setting(state, k) for k in AUGMENTATION_SETTINGS}
        )
    return augment or None


def _save_optimizer(optimizer, path: Path) -> None:
    """The optimizer's variables (Adam's step count and first and second moments) in one ``.npz``."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, *[np.asarray(v) for v in optimizer.variables])


def _restore_optimizer(keras_model, path: Path) -> bool:
    """Load :func:`_save_optimizer`'s variables into ``keras_model``'s (built) optimizer; False, and the
    optimizer left fresh, when there is no file or it does not fit this network.

    Without it a resumed run restarts Adam from zero: its first steps move every weight by about the
    learning rate whatever its gradient. (A resumed fine-tuning run's validation loss jumped from 0.556
    to 0.622 at the first resumed epoch, 2026-12-06, histo-he, epochs 8–20; that run was also scored on
    newly drawn validation patches after the resume, which :func:`fit` no longer does, so how much of
    the jump was the optimizer is not known.)"""
    if not path.is_file():
        return False
    optimizer = keras_model.optimizer
    optimizer.build(keras_model.trainable_variables)
    with np.load(path) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    variables = list(optimizer.variables)
    if len(arrays) != len(variables) or any(a.shape != tuple(v.shape) for a, v in zip(arrays, variables)):
        return False
    for v, a in zip(variables, arrays):
        v.assign(a)
    return True


class _EpochRecorder:
    """Keras ``on_epoch_end`` hook (through ``LambdaCallback``): after every epoch, save
    ``weights_last.h5``, the optimizer's state (:data:`OPTIMIZER_FILE`) and the run's state (epochs done,
    best validation loss, learning rate, wall time, history) to ``train_state.json``, so a killed run
    resumes from its last epoch as if it had not stopped."""

    def __init__(self, model, out_dir: Path, state: dict, clock: Stopwatch) -> None:
        self.model, self.out_dir, self.state, self.clock = model, out_dir, state, clock
        self.done0 = int(state["epochs_done"])
        self.wall_before = float(state.get("wall_time_s", 0.0))

    def __call__(self, epoch: int, logs: dict | None = None) -> None:
        logs, state, keras_model = logs or {}, self.state, self.model.keras_model
        keras_model.save_weights(str(self.out_dir / "weights_last.h5"))
        _save_optimizer(keras_model.optimizer, self.out_dir / OPTIMIZER_FILE)
        vl = logs.get("val_loss")
        if vl is not None and np.isfinite(vl):
            b = state.get("best_val_loss")
            state["best_val_loss"] = float(vl) if b is None else min(float(b), float(vl))
        state["epochs_done"] = self.done0 + epoch + 1
        try:
            state["learning_rate"] = float(np.asarray(keras_model.optimizer.learning_rate))
        except Exception:  # noqa: BLE001
            pass
        state["wall_time_s"] = self.wall_before + self.clock.s
        state.setdefault("history", []).append(
            {k: round(float(v), 5) for k, v in logs.items() if isinstance(v, (int, float, np.floating))}
            | {"epoch": state["epochs_done"]}
        )
        write_json(self.out_dir / STATE_FILE, state)


def fit(
    model,
    train_data: tuple[list[np.ndarray], list[np.ndarray]],
    val_data: tuple[list[np.ndarray], list[np.ndarray]],
    state: dict,
    out_dir: Path,
    *,
    seed: int = 0,
    augmenter=None,
    extra_callbacks: Sequence | None = None,
    verbose: int = 1,
) -> None:
    """Phase 4: train the remaining epochs of the run, checkpointing after every epoch.

    Keeps ``weights_best.h5`` (StarDist's checkpoint on the validation loss, primed with the saved
    best loss), ``weights_last.h5`` and ``train_state.json`` (:class:`_EpochRecorder`) up to date; at
    the end the model holds the best weights and the state is complete. With no epoch left it only
    loads ``weights_best.h5``.

    Parameters
    ----------
    model : stardist.models.StarDist2D
        From :func:`build_model`.
    train_data, val_data : (images, labels)
        Normalised float32 images and int labels.
    state : dict
        The run's state (:func:`start_run`), updated in place and saved.
    out_dir : Path
        The model folder.
    seed : int
        The validation loss is taken on :func:`~histo.train.data.patch_grid`'s crops of the validation
        images (at most :data:`VALIDATION_PIXELS`), in the order ``seed`` shuffles them (the loss is
        averaged per batch, so the order counts), the same in every call; training patch sampling is
        then reseeded with ``seed`` + epochs done. StarDist's own validation patches (one random crop
        per image, drawn at the seed it is given) changed at each resume: the losses stepped (narrow
        network, epoch 39 to 40: validation distance loss 2.47 to 3.03) and were no longer comparable
        with the saved best.
    augmenter : callable, optional
        StarDist's ``augmenter``.
    extra_callbacks : sequence of keras callbacks, optional
        Run after the checkpoint and state ones.
    verbose : int
        Print a line before training.
    """
    remaining = int(state["epochs_total"]) - int(state["epochs_done"])
    if remaining <= 0:
        if (out_dir / "weights_best.h5").exists():
            model.load_weights("weights_best.h5")
        state["complete"] = True
        return
    import keras

    model.prepare_for_training()
    for cb in model.callbacks:
        if (
            isinstance(cb, keras.callbacks.ModelCheckpoint)
            and cb.save_best_only
            and state.get("best_val_loss") is not None
        ):
            cb.best = float(state["best_val_loss"])
    if int(state["epochs_done"]) > 0:
        state["optimizer_restored"] = _restore_optimizer(model.keras_model, out_dir / OPTIMIZER_FILE)
    try:  # the run's rate (a resumed run's saved or new one)
        model.keras_model.optimizer.learning_rate.assign(float(state["learning_rate"]))
    except Exception:  # noqa: BLE001
        model.keras_model.optimizer.learning_rate = float(state["learning_rate"])

    clock = stopwatch()
    wall_before = float(state.get("wall_time_s", 0.0))
    model.callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=_EpochRecorder(model, out_dir, state, clock)))
    # StarDist samples training patches from numpy's global generator: reseed it once the validation
    # crops were shuffled at ``seed``, so that a resumed run draws other patches than its first epochs
    sampling_seed = seed + int(state["epochs_done"])
    reseed = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: np.random.seed(sampling_seed))  # noqa: NPY002
    model.callbacks.append(reseed)
    model.callbacks.extend(extra_callbacks or [])
    if verbose:
        print(
            f"[histo.train] {out_dir.name}: epochs {state['epochs_done']}→{state['epochs_total']} "
            f"× {state['steps_per_epoch']} steps; {len(train_data[0])} train / {len(val_data[0])} val images",
            flush=True,
        )
    patch = int(model.config.train_patch_size[0])
    model.train(
        *train_data,
        validation_data=patch_grid(*val_data, patch, max_patches=VALIDATION_PIXELS // patch**2),
        augmenter=augmenter,
        seed=seed,
        epochs=remaining,
        steps_per_epoch=int(state["steps_per_epoch"]),
    )
    # model.train reloads weights_best.h5 at the end (csbdeep _training_finished)
    state["complete"] = True
    state["wall_time_s"] = wall_before + clock.s
    write_json(out_dir / STATE_FILE, state)


def optimise_thresholds(
    model, X_va: Sequence[np.ndarray], Y_va: Sequence[np.ndarray], config: TrainConfig, out_dir: Path
) -> dict:
    """Phase 5: the prob / nms thresholds on the validation images, then the validation scores.

    Parameters
    ----------
    model : stardist.models.StarDist2D
        Trained; ``optimize_thresholds`` writes its ``thresholds.json``.
    X_va, Y_va : sequences of numpy.ndarray
        Normalised validation images and their labels.
    config : TrainConfig
        ``optimize`` (else the thresholds are prob 0.5, nms 0.4) and ``nms_threshs``.
    out_dir : Path
        The model folder (its ``thresholds.json``).

    Returns
    -------
    dict
        :func:`score_validation` at IoU 0.5.
    """
    if config.optimize:
        model.optimize_thresholds(
            X_va, Y_va, nms_threshs=list(config.nms_threshs), predict_kwargs={"show_tile_progress": False}
        )
    else:
        model.thresholds = {"prob": 0.5, "nms": 0.4}
        write_json(out_dir / "thresholds.json", {"prob": 0.5, "nms": 0.4})
    return score_validation(model, X_va, Y_va, thresh=0.5)


def score_validation(model, X: Sequence[np.ndarray], Y: Sequence[np.ndarray], thresh: float = 0.5) -> dict:
    """Detection scores of ``model`` on held-out images (``stardist.matching.matching_dataset``).

    Parameters
    ----------
    model : stardist.models.StarDist2D
        Predicts with its current thresholds.
    X : sequence of numpy.ndarray
        Normalised images.
    Y : sequence of numpy.ndarray
        Their instance labels (negative = ignore, counted as background).
    thresh : float
        IoU at which a nucleus counts as found.

    Returns
    -------
    dict
        ``f1``, ``precision``, ``recall``, ``tp``/``fp``/``fn``, ``n_true``/``n_pred``,
        ``mean_matched_score``, ``panoptic_quality``, ... (floats rounded to 4 decimals).
    """
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


def _started_config(config: TrainConfig, model, state: dict) -> TrainConfig:
    """The settings the run started with, as the model folder and state saved them (a resumed run's
    architecture, epochs and split are the saved ones; later rate and augmentation changes are listed beside)."""
    c = model.config
    reduce_lr = getattr(c, "train_reduce_lr", None)
    return config.with_settings(
        epochs=int(state["epochs_total"]),
        steps_per_epoch=int(state["steps_per_epoch"]),
        patch_size=int(c.train_patch_size[0]),
        batch_size=int(c.train_batch_size),
        n_rays=int(c.n_rays),
        grid=tuple(c.grid),
        unet_n_depth=int(c.unet_n_depth),
        unet_n_filter_base=int(c.unet_n_filter_base),
        net_conv_after_unet=int(c.net_conv_after_unet),
        learning_rate=float(c.train_learning_rate),  # the saved config.json keeps the run's first rate
        reduce_lr=dict(reduce_lr) if isinstance(reduce_lr, Mapping) else config.reduce_lr,
        **{
            k: float(state[f"{k}_changes"][0]["from"]) if state.get(f"{k}_changes") else augmentation_setting(state, k)
            for k in AUGMENTATION_SETTINGS
        },
    )


def write_card(
    out_dir: Path,
    model,
    config: TrainConfig,
    state: dict,
    *,
    images: Sequence[Path],
    masks: Sequence[np.ndarray],
    image_mpp: Sequence[float] | float,
    scores: dict,
    augmenter=None,
    seconds: Mapping[str, float] | None = None,
    name: str | None = None,
    sources: list[dict] | None = None,
    command: str | None = None,
    notes: list[str] | None = None,
) -> dict:
    """Phase 6: write ``card.json`` and ``MODEL.md`` of the trained model.

    Parameters
    ----------
    out_dir : Path
        The model folder.
    model : stardist.models.StarDist2D
        The trained model with its thresholds.
    config : TrainConfig
        This call's settings (recorded as the run started: :func:`_started_config`).
    state : dict
        The run's state: split, epochs, wall time, history, changes.
    images : sequence of Path
        The training images (validation ones are named in the card).
    masks : sequence of numpy.ndarray
        All labels at ``config.mpp`` (the largest nucleus sets ``max_nucleus_um``).
    image_mpp : float or sequence of float
        The images' own pixel sizes, µm/px.
    scores : dict
        Validation scores (:func:`score_validation`).
    augmenter : optional
        The augmenter used (its ``as_dict()`` is recorded).
    seconds : mapping, optional
        ``thresholds_and_eval_s`` and ``total_wall_time_s_this_call``, s.
    name, sources, command, notes : optional
        The model's name (default: the folder name), training-data provenance
        (``[{name, licence, n_images, [note]}]``), the command line and free notes.

    Returns
    -------
    dict
        The card.
    """
    seconds = dict(seconds or {})
    tr_idx, va_idx = state["split"]["train"], state["split"]["val"]
    max_um, obs_um = _max_nucleus_um(masks, config.mpp)
    aug_dict = (
        augmenter.as_dict()
        if hasattr(augmenter, "as_dict")
        else ({} if augmenter is None else {"callable": repr(augmenter)})
    )
    c = model.config
    card = {
        "name": name or out_dir.name,
        "format": "stardist-2d",
        "stain": config.stain,
        "mpp": float(config.mpp),
        "normalize": dict(NORMALIZE_FIXED),
        "n_channels": 3,
        "max_nucleus_um": max_um,
        "max_nucleus_um_observed": obs_um,
        "thresholds": {"prob": float(model.thresholds.prob), "nms": float(model.thresholds.nms)},
        "n_rays": int(c.n_rays),
        "grid": list(c.grid),
        "architecture": {
            "kind": "StarDist2D U-Net",
            "unet_n_depth": int(c.unet_n_depth),
            "unet_n_filter_base": int(c.unet_n_filter_base),
            "net_conv_after_unet": int(c.net_conv_after_unet),
            "n_rays": int(c.n_rays),
            "grid": list(c.grid),
            "n_channel_in": int(c.n_channel_in),
            "n_params": int(model.keras_model.count_params()),
        },
        "training": {
            "sources": list(sources or []),
            "n_images": len(images),
            "n_train": len(tr_idx),
            "n_train_drawn": int(state.get("n_train_drawn", len(tr_idx))),
            "n_val": len(va_idx),
            "val_images": [Path(images[i]).name for i in va_idx],
            "image_mpp": sorted(
                set(float(m) for m in ([image_mpp] if isinstance(image_mpp, (int, float)) else image_mpp))
            ),
            "seed": int(config.seed),
            "epochs": int(state["epochs_total"]),
            "steps_per_epoch": int(state["steps_per_epoch"]),
            "batch_size": int(c.train_batch_size),
            "patch_size": int(c.train_patch_size[0]),
            "learning_rate": float(c.train_learning_rate),
            "learning_rate_changes": state.get("learning_rate_changes", []),
            **{f"{k}_changes": state.get(f"{k}_changes", []) for k in AUGMENTATION_SETTINGS},
            "validation_patches": state.get("validation_patches"),
            "validation_patches_changes": state.get("validation_patches_changes", []),
            "augmentation": aug_dict,
            "wall_time_s": round(float(state["wall_time_s"]), 1),
            "thresholds_and_eval_s": round(seconds.get("thresholds_and_eval_s", 0.0), 1),
            "total_wall_time_s_this_call": round(seconds.get("total_wall_time_s_this_call", 0.0), 1),
            "best_val_loss": state.get("best_val_loss"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.system()}",
            "command": command,
            "history": state.get("history", []),
            "init_weights": state.get("init_weights"),
            "config": _started_config(config, model, state).as_dict(),
        },
        "validation": scores,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": list(notes or []),
    }
    write_json(out_dir / "card.json", card)
    atomic_write(out_dir / "MODEL.md", model_md(card))
    return card


# ---------------------------------------------------------------- the whole run
def train(
    images: Sequence[Path | str],
    masks: Sequence[Path | str],
    out_dir: Path | str,
    config: TrainConfig | None = None,
    *,
    image_mpp: Sequence[float] | float,
    draws: Sequence[int] | None = None,
    init_weights: Path | str | None = None,
    name: str | None = None,
    sources: list[dict] | None = None,
    command: str | None = None,
    notes: list[str] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    finalize: bool = True,
    augment: bool | object = True,
    extra_callbacks: list | None = None,
    return_model: bool = False,
    verbose: int = 1,
    **settings,
):
    """Train (or resume) a StarDist 2D model for RGB H&E nuclei.

    Parameters
    ----------
    images, masks : sequences of str or Path
        Paired files (RGB uint8; instance labels, 0 = background).
    out_dir : str or Path
        The model folder to write (its name is the model name unless ``name`` is given — ``name``
        only changes the card, the folder name is what StarDist loads).
    config : TrainConfig, optional
        The settings (default ``TrainConfig()``); ``**settings`` change single ones.
    image_mpp : float or sequence of float
        Pixel size of the images, µm/px (one value, or one per image); every image is resampled to
        ``config.mpp`` (images anti-aliased, masks nearest).
    draws : sequence of int, optional
        How often each image is drawn for training patches relative to the others (one per image;
        default 1 each): a training image with 2 is listed twice, so it gives twice the patches per
        epoch. Gives a small dataset the weight of a large one; validation is unaffected.
    init_weights : str or Path, optional
        A model folder (``config.json`` + ``weights_best.h5``) whose architecture and weights a new
        run starts from (fine-tuning); ignored when resuming, recorded in the card.
    name : str, optional
        The model's name in the card (default: the folder name).
    sources : list of dict, optional
        Training-data provenance for the card: ``[{name, licence, n_images, [note]}]``.
    command, notes : optional
        The command line and free notes, for the card.
    resume : bool
        If ``out_dir`` holds ``weights_last.h5`` + ``train_state.json`` of an unfinished run, continue
        it with the remaining epochs (same split, steps per epoch and architecture); ``epochs`` larger
        than the saved total extends the run; if the run is complete, only the finishing steps
        (thresholds, card) are redone. A given ``learning_rate`` or augmentation setting
        (:data:`AUGMENTATION_SETTINGS`) applies from the next epoch on (:func:`start_run`).
    overwrite : bool
        A folder that already holds a trained model (``weights_best.h5``) and no unfinished run to
        resume is an error unless True.
    finalize : bool
        Delete ``weights_last.h5`` / ``train_state.json`` at the end (the folder stays small); keep
        them (False) to be able to extend the training later.
    augment : bool or callable
        True = ``histo.train.augment.HEAugmenter`` at the run's stain scale, False/None = none, or a
        callable ``(x, y) -> (x, y)``.
    extra_callbacks : list, optional
        More Keras callbacks (run after the checkpoint/state ones).
    return_model : bool
        Return ``(folder, model)`` instead of ``folder``.
    verbose : int
        Print a line before and after training.
    **settings
        Fields of :class:`TrainConfig` (``mpp``, ``epochs``, ``steps_per_epoch``, ``patch_size``,
        ``learning_rate``, ...) replacing those of ``config``; an unknown one is a TypeError.

    Returns
    -------
    Path or (Path, stardist.models.StarDist2D)
        The model folder (and the in-memory model with ``return_model``).

    Raises
    ------
    HistoError
        Unreadable or mismatched data, a folder that holds a trained model, or a resumed run whose
        images differ.
    """
    config = (config or TrainConfig()).with_settings(**settings)
    clock = stopwatch()
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    paths, X_u8, Y = load_training_data(images, masks, image_mpp, config)
    state, resuming = start_run(out_dir, paths, config, resume=resume, overwrite=overwrite, init_weights=init_weights)
    X = [_as_float(x) for x in X_u8]
    tr_idx, va_idx = state["split"]["train"], state["split"]["val"]
    draws = [1] * len(X) if draws is None else [int(d) for d in draws]
    if len(draws) != len(X) or min(draws) < 1:
        raise HistoError(None, f"draws: need one whole number ≥ 1 per image ({len(X)}), got {len(draws)}")
    X_tr = [X[i] for i in tr_idx for _ in range(draws[i])]
    Y_tr = [Y[i] for i in tr_idx for _ in range(draws[i])]
    state["n_train_drawn"] = len(X_tr)  # training images as listed for patch sampling, repeats counted
    X_va, Y_va = [X[i] for i in va_idx], [Y[i] for i in va_idx]

    model = build_model(out_dir, config, state, resuming, init_weights)
    if not resuming:
        write_json(out_dir / STATE_FILE, state)
    augmenter = _augmenter(augment, config.seed, state)
    fit(
        model,
        (X_tr, Y_tr),
        (X_va, Y_va),
        state,
        out_dir,
        seed=config.seed,
        augmenter=augmenter,
        extra_callbacks=extra_callbacks,
        verbose=verbose,
    )
    with stopwatch() as thresholds_clock:
        scores = optimise_thresholds(model, X_va, Y_va, config, out_dir)
    card = write_card(
        out_dir,
        model,
        config,
        state,
        images=paths,
        masks=Y,
        image_mpp=image_mpp,
        scores=scores,
        augmenter=augmenter,
        seconds={"thresholds_and_eval_s": thresholds_clock.s, "total_wall_time_s_this_call": clock.s},
        name=name,
        sources=sources,
        command=command,
        notes=notes,
    )
    if finalize:
        for f in ("weights_last.h5", "weights_now.h5", STATE_FILE, OPTIMIZER_FILE):
            (out_dir / f).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "logs", ignore_errors=True)
    if verbose:
        print(
            f"[histo.train] wrote {out_dir}: F1@0.5 = {scores.get('f1')} "
            f"(P {scores.get('precision')}, R {scores.get('recall')}), thresholds {card['thresholds']}",
            flush=True,
        )
    return (out_dir, model) if return_model else out_dir


def main_train(datasets: Sequence[tuple], out, mpp: float, epochs: int, steps: int, **kwargs) -> Path:
    """Train from folder pairs (``histo train``); each folder pair becomes a source in the card.

    Parameters
    ----------
    datasets : sequence of (images_dir, masks_dir, image_mpp, licence) or (…, licence, draws)
        ``image_mpp`` a number or a CSV (:func:`histo.train.data.dataset_pairs`); ``draws`` (default 1)
        how often each of the folder's images is drawn relative to the others (:func:`train`).
    out : str or Path
        The model folder.
    mpp : float
        µm/px the model works at.
    epochs, steps : int
        Epochs in all and steps per epoch.
    **kwargs
        More arguments and settings of :func:`train`.

    Returns
    -------
    Path
        The model folder.
    """
    ims, mks, mpps, draws, sources = [], [], [], [], []
    for images_dir, masks_dir, image_mpp, licence, *weight in datasets:
        rows = dataset_pairs(images_dir, masks_dir, image_mpp)
        n_draws = int(weight[0]) if weight else 1
        sources.append(
            {
                "name": str(images_dir),
                "licence": licence or "unknown",
                "n_images": len(rows),
                "image_mpp": sorted({m for _, _, m in rows}),
                "draws": n_draws,
            }
        )
        for i, m, p in rows:
            ims.append(i), mks.append(m), mpps.append(p), draws.append(n_draws)
    kwargs.setdefault("command", " ".join(sys.argv) if sys.argv else None)
    kwargs.setdefault("sources", sources)
    return train(
        ims, mks, Path(out), mpp=mpp, image_mpp=mpps, draws=draws, epochs=epochs, steps_per_epoch=steps, **kwargs
    )


# ---------------------------------------------------------------- the card
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


# ---------------------------------------------------------------- starting from another model
def _init_name(init_weights: Path | str | None) -> str | None:
    """How the card names the model a run started from: its folder name (no machine paths)."""
    return None if init_weights is None else Path(init_weights).resolve().name


def _init_architecture(folder: Path) -> dict[str, Any]:
    """The architecture settings (:class:`TrainConfig` names) of the model folder a run starts from."""
    conf = read_json(folder / "config.json", missing=None)
    if conf is None or not (folder / "weights_best.h5").is_file():
        raise HistoError(folder, "cannot start from this model: it needs config.json and weights_best.h5")
    if conf.get("n_channel_in") != 3 or conf.get("n_classes") not in (None, 0):
        raise HistoError(folder, "cannot start from this model: it is not a 3-channel StarDist model without classes")
    return {
        "n_rays": int(conf["n_rays"]),
        "grid": tuple(conf["grid"]),
        "unet_n_depth": int(conf["unet_n_depth"]),
        "unet_n_filter_base": int(conf["unet_n_filter_base"]),
        "net_conv_after_unet": int(conf.get("net_conv_after_unet", TrainConfig.net_conv_after_unet)),
    }
