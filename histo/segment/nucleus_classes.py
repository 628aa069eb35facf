"""Learned H&E nucleus classes: a small CNN reads a nucleus-centred patch and the nucleus's outline.

The classifier lives in the nucleus model's folder (``nucleus_classes.keras``, described under
``card.json["nucleus_classes"]``) and runs in the tile task right after StarDist, on the same
pixels: each kept nucleus gets ``nucleus_class`` and ``nucleus_class_prob`` in ``cells.parquet``.
It is a separate network rather than StarDist's own class head (``n_classes``) so that datasets
without types (MoNuSeg) still train the outlines, and the classes can be retrained in minutes
without touching the outlines (``histo train-classes``).

Input: a ``PATCH_PX``² window at ``PATCH_MPP`` µm/px (24 µm) centred on the nucleus, RGB as x/255
plus a fourth channel that is 1 inside the nucleus's own outline. Classes follow CoNSeP's types
(``CLASS_ALIASES``): lymphocyte (CoNSeP "inflammatory": lymphocytes, plasma cells, neutrophils),
epithelial, stromal (CoNSeP "spindle": fibroblasts, muscle, endothelium), other.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon
from skimage.transform import resize

CLASSES = ("lymphocyte", "epithelial", "stromal", "other")
CLASS_ALIASES = {
    "inflammatory": "lymphocyte",
    "spindle": "stromal",
    "fibroblast": "stromal",
    "lymphocytes": "lymphocyte",
    "epithelium": "epithelial",
}
PATCH_MPP = 0.5  # µm/px of the patches
PATCH_PX = 48  # patch edge, px (24 µm)
CLASSIFIER_FILE = "nucleus_classes.keras"


def class_of(name: str) -> str:
    """histo's class for a dataset's type name (case-insensitive); ValueError for an unknown one."""
    key = str(name).strip().lower()
    key = CLASS_ALIASES.get(key, key)
    if key not in CLASSES:
        raise ValueError(
            f"unknown nucleus type {name!r}: expected one of {', '.join(CLASSES)} or {', '.join(sorted(CLASS_ALIASES))}"
        )
    return key


def to_patch_scale(img: np.ndarray, mpp: float) -> np.ndarray:
    """RGB uint8 image at ``mpp`` µm/px → float32 in [0, 1] at :data:`PATCH_MPP` (linear, anti-aliased)."""
    x = np.asarray(img[..., :3], np.float32) / 255.0
    f = mpp / PATCH_MPP
    if abs(f - 1) < 1e-3:
        return x
    shape = (max(1, round(x.shape[0] * f)), max(1, round(x.shape[1] * f)))
    return resize(x, shape + (3,), order=1, anti_aliasing=f < 1, preserve_range=True).astype(np.float32)


def nucleus_patches(
    small: np.ndarray, outlines: list[np.ndarray], centres: np.ndarray, size: int = PATCH_PX
) -> np.ndarray:
    """(n, size, size, 4) float32: RGB windows of ``small`` (an image from :func:`to_patch_scale`)
    centred on ``centres`` (n, 2) (row, col) px, glass (1.0) beyond its edge, and each nucleus's
    outline ``outlines[i]`` ((k, 2) (row, col) px) filled in channel 4."""
    h = size // 2
    padded = np.pad(small, ((size, size), (size, size), (0, 0)), constant_values=1.0)
    out = np.zeros((len(centres), size, size, 4), np.float32)
    for i, ((r, c), ring) in enumerate(zip(np.asarray(centres, np.float64), outlines)):
        r0, c0 = int(round(r)) - h, int(round(c)) - h
        out[i, :, :, :3] = padded[r0 + size : r0 + 2 * size, c0 + size : c0 + 2 * size]
        rr, cc = draw_polygon(ring[:, 0] - r0, ring[:, 1] - c0, (size, size))
        out[i, rr, cc, 3] = 1.0
    return out


def tile_patches(
    img: np.ndarray, coord: np.ndarray, points: np.ndarray, mpp: float, size: int = PATCH_PX
) -> np.ndarray:
    """Patches (``size``² px) of StarDist's nuclei in a tile: ``img`` RGB uint8 at ``mpp`` µm/px,
    ``coord`` (n, 2, n_rays) and ``points`` (n, 2) as (row, col) px of ``img`` (pixel centres on integers)."""
    f = mpp / PATCH_MPP
    small = to_patch_scale(img, mpp)
    outlines = [np.stack([(c[0] + 0.5) * f - 0.5, (c[1] + 0.5) * f - 0.5], axis=1) for c in coord]
    return nucleus_patches(small, outlines, (np.asarray(points, np.float64) + 0.5) * f - 0.5, size)


def network(n_classes: int = len(CLASSES)):
    """The classifier: four conv blocks (16–128 filters), global average pooling, softmax. (Batch
    normalisation was tried: its validation loss swung between epochs and its lymphocyte F1 was lower.)"""
    import keras
    from keras import layers

    inp = keras.Input((PATCH_PX, PATCH_PX, 4))
    x = inp
    for filters in (16, 32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x) if filters < 128 else x
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inp, layers.Dense(n_classes, activation="softmax")(x), name="nucleus_classes")


@functools.lru_cache(maxsize=2)
def load_classifier(folder: str):
    """The classifier of a model folder as one traced TensorFlow graph (loaded once per process; it
    runs in the precision set for this process's graphs, ``histo.segment.models.use_precision``)."""
    import keras
    import tensorflow as tf

    net = keras.models.load_model(Path(folder) / CLASSIFIER_FILE, compile=False)
    size = int(net.input_shape[1])  # the patch edge it was trained on
    graph = tf.function(
        lambda x: net(x, training=False), input_signature=[tf.TensorSpec((None, size, size, 4), tf.float32)]
    )
    graph.n_classes, graph.patch_px = int(net.output_shape[-1]), size
    return graph


def predict_classes(graph, patches: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class probabilities (n, n_classes) for :func:`nucleus_patches` output."""
    if not len(patches):
        return np.zeros((0, graph.n_classes), np.float32)
    return np.concatenate([graph(patches[i : i + batch]).numpy() for i in range(0, len(patches), batch)])
