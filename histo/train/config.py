"""The settings of a training run (:class:`TrainConfig`), as ``histo train`` takes them and a model's
``card.json`` saves them (``training.config``), and the augmentation settings a resumed run may change.

Used by :mod:`histo.train.outlines` (the run) and :mod:`histo.train.model_card` (MODEL.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from histo.train.augment import HEAugmenter

__all__ = ["TrainConfig", "DEFAULT_LEARNING_RATE", "AUGMENTATION_SETTINGS", "augmentation_setting"]

DEFAULT_LEARNING_RATE = 3e-4  # Adam, StarDist's default

AUGMENTATION_SETTINGS = (
    "stain_scale",
    "scale_range",
    "hue_shift",
    "saturation_range",
    "haze",
)  # HEAugmenter fields a run sets and a resume may change


def augmentation_setting(state: dict, key: str) -> float:
    """A run's current ``key`` (one of :data:`AUGMENTATION_SETTINGS`) from its state; HEAugmenter's
    default for runs saved before it was recorded."""
    return float(state.get(key, getattr(HEAugmenter, key)))


@dataclass(frozen=True)
class TrainConfig:
    """The settings of a training run, saved in the model's ``card.json`` under ``training.config``.

    Like StarDist's ``Config2D``, one object with a typed default for every setting; unlike it, it
    also holds the data scale, the augmentation strength and the threshold search. What the run is
    trained *on* (images, pixel sizes, a model to start from, provenance) and how the call behaves
    (resume, overwrite, finalize, callbacks) are arguments of :func:`histo.train.outlines.train`, not settings.

    When a run resumes, the saved run's split, epochs, steps per epoch and architecture win; a given
    ``learning_rate`` or augmentation setting (:data:`AUGMENTATION_SETTINGS`) applies from the next epoch on
    (:func:`histo.train.outlines.start_run`). The card records the settings the run started with
    (``TrainConfig.from_dict(card["training"]["config"])``); later changes are listed beside them.
    """

    mpp: float = 0.25  # µm/px the model works at; every image is resampled to it
    stain: str = "he"  # the stain the model is for (card only)
    epochs: int = 50  # epochs in all (a resumed run with more extends the run)
    steps_per_epoch: int = 100  # batches per epoch
    patch_size: int = 256  # px at ``mpp``, square training patches
    batch_size: int = 4  # patches per batch
    val_fraction: float = 0.15  # fraction of the images held out for validation (split by image)
    seed: int = 0  # split, augmentation and patch sampling
    n_rays: int = 32  # StarDist rays per nucleus
    grid: tuple[int, int] = (2, 2)  # px of the input per output pixel (rows, columns)
    unet_n_depth: int = 3  # U-Net levels
    unet_n_filter_base: int = 32  # filters of the first U-Net level
    net_conv_after_unet: int = 128  # filters of the convolution between the U-Net and the prob / ray outputs
    learning_rate: float | None = None  # Adam's rate; None: DEFAULT_LEARNING_RATE (new run), the saved one (resume)
    reduce_lr: Mapping[str, float] | None = None  # ReduceLROnPlateau; None: factor 0.5, patience max(5, epochs // 8)
    stain_scale: float | None = None  # H and E concentration jitter, fraction (0.4: ×0.6–×1.4); None: HEAugmenter's
    scale_range: float | None = None  # zoom jitter, fraction (0.3: ×0.7–×1.3, half the patches); None: HEAugmenter's
    hue_shift: float | None = None  # HSV hue turn, fraction of the circle (0.05: ±18°); None: HEAugmenter's
    saturation_range: float | None = None  # HSV saturation jitter, fraction (0.6: ×0.4–×1.6); None: HEAugmenter's
    haze: float | None = None  # hematoxylin OD added to stained pixels, at most (0.25: +0–0.25); None: HEAugmenter's
    optimize: bool = True  # optimise the prob / nms thresholds on the validation images (else 0.5 / 0.4)
    nms_threshs: tuple[float, ...] = (0.3, 0.4, 0.5)  # NMS thresholds the optimisation tries (each costs a sweep)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "nms_threshs", tuple(float(t) for t in self.nms_threshs))
        if self.reduce_lr is not None:
            object.__setattr__(self, "reduce_lr", dict(self.reduce_lr))

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The config saved by :meth:`as_dict` (e.g. a card's ``training.config``); TypeError naming
        an unknown key."""
        _check_settings(d)
        return cls(**d)

    def with_settings(self, **settings) -> TrainConfig:
        """A copy with ``settings`` changed; TypeError naming an unknown one."""
        _check_settings(settings)
        return dataclasses.replace(self, **settings) if settings else self


def _check_settings(names) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise TypeError(f"unknown training setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v
