"""Learned H&E nucleus classes: a small CNN reads a nucleus-centred patch and the nucleus's outline.

The classifier lives in the nucleus model's folder (``nucleus_classes.keras``, described under
``card.json["nucleus_classes"]``) and runs in the tile task right after StarDist, on the same
pixels: each kept nucleus gets ``nucleus_class`` and ``nucleus_class_prob`` in ``cells.parquet``.
It is a separate network rather than StarDist's own class head (``n_classes``) so that datasets
without types (MoNuSeg) still train the outlines, and the classes can be retrained in minutes
without touching the outlines (``histo train-classes``).

Input: a ``PATCH_PX``² window at ``PATCH_MPP`` µm/px (24 µm) centred on the nucleus, RGB as x/255
plus a fourth channel that is 1 inside the nucleus's own outline. A classifier trained with stain
standardisation (``card.json["nucleus_classes"]["stain"] == "macenko"``) reads its patches from the tile
after Macenko's method has mapped the tile's haematoxylin and eosin to one reference
(:func:`standardise_stain`), so a lab's staining does not decide the class. A classifier can have
several members (``card.json["nucleus_classes"]["members"]``, each a network and how it reads its
patches, e.g. one after Macenko's full standardisation and one after its colours only), whose class
probabilities are averaged (:func:`tile_class_probs`). Classes follow CoNSeP's types
(``CLASS_ALIASES``): lymphocyte (CoNSeP "inflammatory": lymphocytes, plasma cells, neutrophils),
epithelial, stromal (CoNSeP "spindle": fibroblasts, muscle, endothelium), other.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from histo.segment.features import polygon_pixels

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
STAINS = (None, "macenko", "macenko-unscaled")  # how a member's patches are read (:func:`to_patch_scale`)
TURNS = 4  # views averaged per nucleus (0°, 90°, 180°, 270°). On the classifier's validation tiles
#   (CoNSeP train_4/6/22) lymphocyte F1 0.796 → 0.828 with 4 views, 0.831 with 8 (flips too): 4× the cost of one
SURE = 0.8  # a nucleus whose upright view gives a class this probability keeps it without the other views:
#   on the validation tiles 50 % of nuclei do, 2.5 views per nucleus instead of 4, every class as with 4 views
ALONE = 0.9  # a nucleus whose first member gives a class this probability keeps it without the other members:
#   another member would have to be 0.8 surer of a second class to change it (the members are averaged).
#   On 20,785 detected nuclei (CoNSeP validation and held-out tiles, MoNuSAC, the lymph-node patches, a
#   generated node) no class changed, and 31–73 % of the nuclei skipped the second member
BATCH = 256  # nuclei per classifier call
MACENKO_MIN_PX = 2000  # stained pixels (OD ≥ 0.15 in every channel) needed to estimate a tile's stains


def class_of(name: str) -> str:
    """histo's class for a dataset's type name (case-insensitive); ValueError for an unknown one."""
    key = str(name).strip().lower()
    key = CLASS_ALIASES.get(key, key)
    if key not in CLASSES:
        raise ValueError(
            f"unknown nucleus type {name!r}: expected one of {', '.join(CLASSES)} or {', '.join(sorted(CLASS_ALIASES))}"
        )
    return key


def to_patch_scale(img: np.ndarray, mpp: float, stain: str | None = None) -> np.ndarray:
    """RGB uint8 image at ``mpp`` µm/px → float32 in [0, 1] at :data:`PATCH_MPP` (linear, anti-aliased);
    ``stain="macenko"`` then standardises its stains (:func:`standardise_stain`), ``"macenko-unscaled"``
    only their colours (the concentrations kept). Training and the tile task both read their patches
    from this image."""
    x = np.asarray(img[..., :3], np.float32) / 255.0
    f = mpp / PATCH_MPP
    if abs(f - 1) >= 1e-3:
        x = _resize(x, (max(1, round(x.shape[0] * f)), max(1, round(x.shape[1] * f))))
    return x if stain is None else standardise_stain(x, scale=stain == "macenko")


def _resize(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``skimage.transform.resize(x, shape + (channels,), order=1, preserve_range=True)`` with its
    anti-aliasing (a Gaussian of σ = (factor - 1) / 2 before shrinking), to the same float32 values,
    run on one contiguous channel at a time: 2× faster than on the interleaved (H, W, 3) array
    (0.19 s against 0.37 s for a 1,248² tile)."""
    factors = np.divide(x.shape[:2], shape)
    sigma = np.maximum(0, (factors - 1) / 2)
    planes = [
        ndi.zoom(
            ndi.gaussian_filter(np.ascontiguousarray(x[..., c]), sigma, mode="mirror"),
            1 / factors,
            order=1,
            mode="mirror",
            grid_mode=True,
        )
        for c in range(x.shape[2])
    ]
    return np.clip(np.stack(planes, axis=-1), x.min(), x.max())


# Macenko's reference: haematoxylin and eosin OD vectors (columns) and their 99th-percentile
# concentrations, as in Macenko's and Vahadane's reference code (schaugf/HEnorm_python).
MACENKO_HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MACENKO_MAX_C_REF = np.array([1.9705, 1.0308])
MACENKO_LIGHT = 240.0  # transmitted light intensity (0–255)
MACENKO_BETA = 0.15  # OD below which a channel counts as glass
MACENKO_ALPHA = 1.0  # percentile of the stain angles taken as the two stain directions


def standardise_stain(small: np.ndarray, scale: bool = True) -> np.ndarray:
    """RGB float32 in [0, 1] with its H&E stains mapped to Macenko's reference stain vectors and
    concentrations (Macenko et al., ISBI 2009: the two stain directions are the extreme angles of the
    stained pixels' optical densities in the plane of their two main axes; with ``scale``, each stain's
    concentration is scaled so its 99th percentile matches the reference). Returned unchanged where
    fewer than :data:`MACENKO_MIN_PX` pixels are stained (glass, a speck of tissue) or the stains cannot
    be separated.

    The scaling depends on what the field holds: in a field of dark lymphocytes their chromatin is the
    99th percentile, so it is scaled to an ordinary nucleus's darkness (MoNuSAC fields where the
    classifier then calls lymphocytes epithelial); ``scale=False`` keeps each pixel's stain amounts.

    Written here rather than taken from torchstain: torchstain 1.4.1's wheel installs a top-level
    ``tests`` package that shadows this project's tests. The constants and steps are the same as its
    numpy backend's (the shipped classifier was trained through it; checked equal to 1 grey level)."""
    return stain_views(small, ("macenko" if scale else "macenko-unscaled",))[0]


def stain_views(small: np.ndarray, stains) -> list[np.ndarray]:
    """``small`` (RGB float32 in [0, 1]) as each of ``stains`` (:data:`STAINS`) reads it, the tile's
    stains estimated once for all (:func:`standardise_stain`)."""
    conc = None if all(s is None for s in stains) else _stain_concentrations(small)
    views = []
    for stain in stains:
        view = None if stain is None or conc is None else _reference_colours(conc, small.shape, stain == "macenko")
        views.append(small if view is None else view)
    return views


def _stain_concentrations(small: np.ndarray) -> np.ndarray | None:
    """(2, h·w) haematoxylin and eosin concentrations of each pixel along the tile's own stain vectors
    (Macenko's estimate); None where they cannot be estimated."""
    rgb = np.clip(np.round(small.reshape(-1, 3) * 255), 0, 255)
    od = -np.log((rgb + 1) / MACENKO_LIGHT)
    stained = od[np.all(od >= MACENKO_BETA, axis=1)]
    if len(stained) < MACENKO_MIN_PX:
        return None
    with np.errstate(all="ignore"):
        try:
            _, vecs = np.linalg.eigh(np.cov(stained.T))
            plane = vecs[:, 1:3]
            proj = stained @ plane
            phi = np.arctan2(proj[:, 1], proj[:, 0])
            lo, hi = np.percentile(phi, [MACENKO_ALPHA, 100 - MACENKO_ALPHA])
            v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
            v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
            he = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo], axis=1)  # haematoxylin first
            return np.linalg.pinv(he) @ od.T  # least squares, as lstsq, which is ~100× slower for 10⁶ pixels
        except (np.linalg.LinAlgError, ValueError):
            return None


def _reference_colours(conc: np.ndarray, shape: tuple, scale: bool) -> np.ndarray | None:
    """RGB float32 (``shape``) of the concentrations ``conc`` in Macenko's reference stains, each stain
    scaled to the reference's 99th percentile where ``scale``; None where that is not finite."""
    with np.errstate(all="ignore"):
        if scale:
            conc = conc / (np.percentile(conc, 99, axis=1) / MACENKO_MAX_C_REF)[:, None]
        out = np.minimum(MACENKO_LIGHT * np.exp(-MACENKO_HE_REF @ conc), 255)
    if not np.isfinite(out).all():
        return None
    return (out.T.reshape(shape).astype(np.uint8) / 255.0).astype(np.float32)


def nucleus_patches(
    small: np.ndarray, outlines: list[np.ndarray], centres: np.ndarray, size: int = PATCH_PX
) -> np.ndarray:
    """(n, size, size, 4) float32: RGB windows of ``small`` (an image from :func:`to_patch_scale`)
    centred on ``centres`` (n, 2) (row, col) px, glass (1.0) beyond its edge, and each nucleus's
    outline ``outlines[i]`` ((k, 2) (row, col) px) filled in channel 4."""
    corner = _corners(centres, size)
    return _patches(_padded(small, size), corner, _outline_pixels(_rings(outlines), corner, size), size)


def _padded(small: np.ndarray, size: int) -> np.ndarray:
    """``small`` with ``size`` px of glass (1.0) around it, so that every window lies inside."""
    return np.pad(small, ((size, size), (size, size), (0, 0)), constant_values=1.0)


def _rings(outlines: list[np.ndarray]) -> np.ndarray:
    """(n, 2, k) outline vertices (row, col) px; shorter rings are padded with their last vertex (a
    zero-length edge fills no pixel)."""
    k = max((len(r) for r in outlines), default=1)
    out = np.empty((len(outlines), 2, k), np.float64)
    for i, ring in enumerate(outlines):
        ring = np.asarray(ring, np.float64)
        out[i] = np.concatenate([ring, np.repeat(ring[-1:], k - len(ring), axis=0)]).T
    return out


def _corners(centres: np.ndarray, size: int) -> np.ndarray:
    """(n, 2) top-left (row, col) px, in the unpadded image, of the ``size``² windows centred on ``centres``."""
    return np.rint(np.asarray(centres, np.float64)).astype(np.int64).reshape(-1, 2) - size // 2


def _outline_pixels(rings: np.ndarray, corner: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(nucleus, flat index in its window) of the pixels inside each outline ``rings`` ((n, 2, k) px of the
    unpadded image), all nuclei at once: :func:`histo.segment.features.polygon_pixels`' scanline fill
    (``skimage.draw.polygon``'s pixels) in each window at ``corner`` (:func:`_corners`)."""
    return polygon_pixels(rings - corner[:, :, None], (size, size))


def _patches(padded: np.ndarray, corner: np.ndarray, outline: tuple, size: int) -> np.ndarray:
    """(n, size, size, 4): the windows of ``padded`` (:func:`_padded`) at ``corner`` (:func:`_corners`),
    cut by one fancy index, with the pixels ``outline`` (:func:`_outline_pixels`) set to 1 in channel 4."""
    span = np.arange(size)
    rows = (corner[:, 0, None] + size + span)[:, :, None]
    cols = (corner[:, 1, None] + size + span)[:, None, :]
    out = np.zeros((len(corner), size, size, 4), np.float32)
    out[..., :3] = padded[rows, cols]
    nuc, flat = outline
    out.reshape(len(corner), size * size, 4)[nuc, flat, 3] = 1.0
    return out


def tile_patches(
    img: np.ndarray,
    coord: np.ndarray,
    points: np.ndarray,
    mpp: float,
    views: tuple = ((PATCH_PX, None),),
    batch: int = BATCH,
) -> Iterator[list[np.ndarray]]:
    """Patches of StarDist's nuclei in a tile, ``batch`` nuclei at a time (a dense tile's 4,000 nuclei
    would be 150 MB of patches at once), one array (n, size, size, 4) per view ``(size, stain)``
    (``stain`` as :func:`to_patch_scale`'s): ``img`` RGB uint8 at ``mpp`` µm/px, ``coord`` (n, 2, n_rays)
    and ``points`` (n, 2) as (row, col) px of ``img`` (pixel centres on integers). The tile is scaled,
    its stains estimated and each outline drawn once for all views."""
    f = mpp / PATCH_MPP
    small = to_patch_scale(img, mpp)
    stains = sorted({stain for _, stain in views}, key=str)
    sizes = {size for size, _ in views}
    stained = dict(zip(stains, stain_views(small, stains)))
    padded = {(size, stain): _padded(stained[stain], size) for size, stain in views}
    centres = (np.asarray(points, np.float64) + 0.5) * f - 0.5
    rings = (np.asarray(coord, np.float64) + 0.5) * f - 0.5
    for i in range(0, len(centres), batch):
        corners = {size: _corners(centres[i : i + batch], size) for size in sizes}
        outlines = {size: _outline_pixels(rings[i : i + batch], corners[size], size) for size in sizes}
        yield [_patches(padded[size, stain], corners[size], outlines[size], size) for size, stain in views]


FILTERS = (16, 32, 64, 128)  # filters of the classifier's four conv blocks


def network(n_classes: int = len(CLASSES), filters: tuple[int, ...] = FILTERS):
    """The classifier: four conv blocks of two 3×3 convolutions (``filters`` per block), global average
    pooling, softmax; its cost per nucleus grows with the square of the filters. (Batch normalisation
    was tried: its validation loss swung between epochs and its lymphocyte F1 was lower.)"""
    import keras
    from keras import layers

    inp = keras.Input((PATCH_PX, PATCH_PX, 4))
    x = inp
    for i, n in enumerate(filters):
        x = layers.Conv2D(n, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(n, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x) if i < len(filters) - 1 else x
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inp, layers.Dense(n_classes, activation="softmax")(x), name="nucleus_classes")


def classifier_members(section: dict) -> list[dict]:
    """The networks of a card's ``nucleus_classes`` section, ``[{"file", "stain", …}, …]``: its
    ``members``, else the section itself (a classifier of one network). A member's
    ``inference_turns`` (default :data:`TURNS`) is how many turns of a patch it averages."""
    return section.get("members") or [{"file": CLASSIFIER_FILE, **section}]


@functools.lru_cache(maxsize=2)
def load_classifier(folder: str) -> tuple:
    """The classifier of a model folder: one traced TensorFlow graph per member
    (:func:`classifier_members`; loaded once per process; they run in the precision set for this
    process's graphs, ``histo.segment.models.use_precision``), each with ``n_classes``, ``patch_px``,
    ``stain`` (how its patches are read, :func:`to_patch_scale`) and ``turns`` (:func:`predict_classes`)."""
    import keras
    import tensorflow as tf

    card = Path(folder) / "card.json"
    section = json.loads(card.read_text()).get("nucleus_classes", {}) if card.is_file() else {}
    graphs = []
    for member in classifier_members(section):
        net = keras.models.load_model(Path(folder) / member["file"], compile=False)
        size = int(net.input_shape[1])  # the patch edge it was trained on
        graph = tf.function(
            lambda x, net=net: net(x, training=False),
            input_signature=[tf.TensorSpec((None, size, size, 4), tf.float32)],
        )
        graph.n_classes, graph.patch_px, graph.stain = int(net.output_shape[-1]), size, member.get("stain")
        graph.turns = int(member.get("inference_turns", TURNS))
        graphs.append(graph)
    return tuple(graphs)


def predict_classes(
    graph, patches: np.ndarray, batch: int = BATCH, turns: int = TURNS, sure: float = SURE
) -> np.ndarray:
    """Class probabilities (n, n_classes) for :func:`nucleus_patches` output, averaged over the patch
    turned by 0°, 90°, … (``turns`` views; a nucleus has no orientation). A nucleus whose upright view
    gives one class a probability ≥ ``sure`` keeps that view's probabilities: the other views are run
    only for the rest, ``batch`` nuclei per network call."""
    out = [np.zeros((0, graph.n_classes), np.float32)]
    for i in range(0, len(patches), batch):
        part = patches[i : i + batch]
        p = graph(part).numpy()
        unsure = p.max(axis=1) < sure
        if turns > 1 and unsure.any():
            views = np.concatenate([np.rot90(part[unsure], k, axes=(1, 2)) for k in range(1, turns)])
            turned = graph(views).numpy().reshape(turns - 1, int(unsure.sum()), -1)
            p[unsure] = (p[unsure] + turned.sum(axis=0)) / turns
        out.append(p)
    return np.concatenate(out)


def tile_class_probs(
    graphs, img: np.ndarray, coord: np.ndarray, points: np.ndarray, mpp: float, alone: float = ALONE
) -> np.ndarray:
    """Class probabilities (n, n_classes) of a tile's nuclei (:func:`tile_patches`' arguments): the mean
    over the classifier's members ``graphs`` (:func:`load_classifier`), each reading its own patches,
    ``BATCH`` nuclei at a time; a nucleus to which the first member gives a class ≥ ``alone`` keeps the
    first member's probabilities (the others are not run for it)."""
    views = tuple((graph.patch_px, graph.stain) for graph in graphs)
    out = [np.zeros((0, graphs[0].n_classes), np.float32)]
    for first, *others in tile_patches(img, coord, points, mpp, views):
        p = predict_classes(graphs[0], first, turns=graphs[0].turns)
        unsure = p.max(axis=1) < alone
        if others and unsure.any():
            more = [predict_classes(g, x[unsure], turns=g.turns) for g, x in zip(graphs[1:], others)]
            p[unsure] = np.mean([p[unsure], *more], axis=0)
        out.append(p)
    return np.concatenate(out)
