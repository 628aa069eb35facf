"""Data augmentation for H&E nucleus segmentation training (StarDist ``augmenter=`` hook).

Every transform takes an image ``x`` (H, W, 3) float32 in [0, 1] (already normalised as x/255, the
fixed normalisation of our models) and an instance mask ``y`` (H, W) int, and returns the pair with
the SAME shape. Geometric transforms act on both; photometric ones leave the mask untouched.

- flips + 90° rotations (the 8 symmetries of the square);
- stain jitter in optical-density (OD) space: Beer–Lambert colour deconvolution with the Ruifrok &
  Johnston H&E(-DAB) vectors (the same matrix as ``skimage.color.hed_from_rgb``); the hematoxylin
  and eosin concentrations are scaled by ``1 ± stain_scale`` and shifted by ``± stain_shift``
  (in OD units), then recomposed; ``haze`` adds up to that much hematoxylin OD to every stained
  pixel (MoNuSAC's hematoxylin-heavy fields, where nuclei hold only 1.5× the background's H against
  3–10× in MoNuSeg and CoNSeP);
- hue / saturation jitter in HSV (Tellez et al., Med Image Anal 2019: HSV + HED jitter generalises
  best across labs); haematoxylin's hue and the slide's saturation vary more between labs and
  scanners than the H and E amounts alone (MoNuSAC's deep-purple fields);
- brightness / contrast;
- small isotropic scale jitter (± ``scale_range``): bilinear image, nearest mask; when zooming out
  the border that has no source pixels is filled by reflection in the image and marked ``-1``
  ("ignore", StarDist's convention) in the mask, so no unlabelled nucleus is taught as background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb, hsv2rgb, rgb2hsv, rgb_from_hed

__all__ = [
    "HEAugmenter",
    "flip_rot",
    "stain_jitter",
    "recolour",
    "brightness_contrast",
    "hsv_jitter",
    "scale_jitter",
    "rgb_to_od",
    "od_to_rgb",
    "OD_EPS",
]

#: smallest transmitted intensity (as a fraction of white) used in the OD transform (1/255: one grey level)
OD_EPS = 1.0 / 255.0

_HED_FROM_RGB = np.asarray(hed_from_rgb, dtype=np.float32)
_RGB_FROM_HED = np.asarray(rgb_from_hed, dtype=np.float32)


def rgb_to_od(x: np.ndarray) -> np.ndarray:
    """Optical density ``-log10(I / I0)`` of an RGB image in [0, 1] (white = 1)."""
    return -np.log10(np.clip(x, OD_EPS, 1.0)).astype(np.float32)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    return np.clip(np.power(10.0, -od), 0.0, 1.0).astype(np.float32)


def flip_rot(x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
    """A random one of the 8 symmetries of the square, applied to image and mask alike."""
    k = int(rng.integers(4))
    x, y = np.rot90(x, k, axes=(0, 1)), np.rot90(y, k, axes=(0, 1))
    if rng.random() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def stain_jitter(x: np.ndarray, rng: np.random.Generator, scale: float = 0.2, shift: float = 0.05, haze: float = 0.0):
    """Scale/shift the H and E concentrations (OD space) by random amounts (see :func:`recolour`);
    ``haze`` adds up to that much more hematoxylin OD to every stained pixel (a hematoxylin-heavy
    background that lowers the contrast between nuclei and cytoplasm).

    Returns the new image and the (alpha, beta) used: ``c' = alpha * c + beta`` per stain.
    """
    alpha = np.ones(3, np.float32)
    beta = np.zeros(3, np.float32)
    alpha[:2] = rng.uniform(1 - scale, 1 + scale, 2)
    beta[:2] = rng.uniform(-shift, shift, 2)
    if haze:
        beta[0] += rng.uniform(0.0, haze)
    return recolour(x, alpha, beta), (alpha, beta)


def recolour(x: np.ndarray, alpha, beta=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Hematoxylin, eosin and DAB/residual concentrations ``c`` (OD, Ruifrok vectors) of an RGB
    image in [0, 1] set to ``alpha * c + beta`` (the shift only where a stain is present, so glass
    stays white), then recomposed to RGB."""
    conc = rgb_to_od(x) @ _HED_FROM_RGB  # (H, W, 3): hematoxylin, eosin, DAB (residual)
    conc = conc * np.asarray(alpha, np.float32) + np.asarray(beta, np.float32) * (conc > 0.02)
    conc[..., :2] = np.maximum(conc[..., :2], 0)
    return od_to_rgb(conc @ _RGB_FROM_HED)


def brightness_contrast(x: np.ndarray, rng: np.random.Generator, brightness: float = 0.06, contrast: float = 0.12):
    c = rng.uniform(1 - contrast, 1 + contrast)
    b = rng.uniform(-brightness, brightness)
    m = float(x.mean())
    return np.clip((x - m) * c + m + b, 0.0, 1.0).astype(np.float32)


def hsv_jitter(x: np.ndarray, rng: np.random.Generator, hue: float = 0.05, saturation: float = 0.5):
    """Hue turned by ``± hue`` (fraction of the colour circle) and saturation scaled by ``1 ± saturation``."""
    hsv = rgb2hsv(x)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue)) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - saturation, 1 + saturation), 0.0, 1.0)
    return hsv2rgb(hsv).astype(np.float32)


def scale_jitter(x: np.ndarray, y: np.ndarray, s: float):
    """Zoom image (bilinear) and mask (nearest) by ``s`` about the centre, keeping the shape.

    Both use the same inverse coordinate map, so they stay aligned. Pixels that map outside the
    source take a reflected image value and mask ``-1`` (ignored by StarDist's loss).
    """
    h, w = y.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    sr, sc = (rr - cy) / s + cy, (cc - cx) / s + cx
    coords = np.stack([sr, sc])
    xo = np.stack(
        [ndi.map_coordinates(x[..., c], coords, order=1, mode="mirror") for c in range(x.shape[-1])],
        axis=-1,
    ).astype(np.float32)
    yo = ndi.map_coordinates(y, coords, order=0, mode="constant", cval=0).astype(y.dtype)
    outside = (sr < -0.5) | (sr > h - 0.5) | (sc < -0.5) | (sc > w - 0.5)
    if outside.any():
        yo = yo.astype(np.int32)
        yo[outside] = -1
    return xo, yo


@dataclass
class HEAugmenter:
    """Picklable callable ``(x, y) -> (x', y')`` for ``StarDist2D.train(augmenter=...)``.

    Probabilities/strengths are fields so a model card can record them (``as_dict``).
    """

    seed: int | None = None
    p_stain: float = 0.9
    stain_scale: float = 0.2
    stain_shift: float = 0.05
    haze: float = 0.0
    p_hsv: float = 0.7
    hue_shift: float = 0.0
    saturation_range: float = 0.0
    p_intensity: float = 0.7
    brightness: float = 0.06
    contrast: float = 0.12
    p_scale: float = 0.5
    scale_range: float = 0.1
    p_noise: float = 0.3
    noise_sigma: float = 0.02

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __call__(self, x: np.ndarray, y: np.ndarray):
        rng = self._rng
        x = np.asarray(x, np.float32)
        x, y = flip_rot(x, y, rng)
        if rng.random() < self.p_scale and self.scale_range > 0:
            s = rng.uniform(1 - self.scale_range, 1 + self.scale_range)
            x, y = scale_jitter(x, y, s)
        if x.ndim == 3 and x.shape[-1] == 3 and rng.random() < self.p_stain:
            x, _ = stain_jitter(x, rng, self.stain_scale, self.stain_shift, self.haze)
        if (self.hue_shift or self.saturation_range) and rng.random() < self.p_hsv:
            x = hsv_jitter(x, rng, self.hue_shift, self.saturation_range)
        if rng.random() < self.p_intensity:
            x = brightness_contrast(x, rng, self.brightness, self.contrast)
        if rng.random() < self.p_noise:
            x = np.clip(x + rng.normal(0, self.noise_sigma, x.shape), 0, 1).astype(np.float32)
        return x, y
