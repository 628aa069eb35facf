"""The per-tile Dask task: read core + halo at the model's µm/px, normalise, StarDist, keep, write.

A task carries coordinates, never pixels: each worker process opens the slide and loads the model
once (cached per process) and writes its nuclei to a parquet part file, returning only a summary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histo.io.files import atomic_write
from histo.io.slide import open_slide
from histo.segment.features import nucleus_features
from histo.segment.models import (
    ModelSpec,
    inference_precision,
    load_model,
    normalize_image,
    one_graph_for_all_shapes,
    resolve_model,
    use_precision,
)
from histo.segment.nuclei import cell_schema, owned, tile_cells
from histo.segment.nucleus_classes import load_classifier, tile_class_probs
from histo.segment.tiling import MIRRORS, Tile
from histo.timing import Timings, stopwatch


@dataclass(frozen=True)
class SegmentJob:
    """Everything a tile task needs besides the tile: small and picklable."""

    slide_path: str
    slide_mpp: float  # level-0 µm/px as the run resolved it (so --mpp reaches the workers)
    model: ModelSpec
    grid_mpp: float  # µm/px of the tile grid: the model's, or the slide level's when within 1 %
    grid_width: int  # width of the model-µm/px grid, px (for cell ids)
    parts_dir: str  # where each tile writes <tile>.parquet
    prob_thresh: float | None = None
    nms_thresh: float | None = None
    percentiles: tuple | None = None  # per-slide normalisation values for percentile models
    stain: str = "he"  # which nucleus stain features to measure (histo.segment.features)
    channel_names: tuple | None = None  # channel names of fluorescence slides
    nucleus_channel: int | None = None  # fluorescence: the one channel the nucleus model reads
    precision: str = "float32"  # the network's arithmetic (histo.segment.models.inference_precision)
    second_view_saturation: float | None = None  # RGB: the tile's saturation × this is a second view (predict_tile)
    flips: int = 1  # mirror images each view's network maps are averaged over (network_maps)

    @property
    def classify(self) -> bool:
        """Whether the tiles' nuclei get learned classes (an H&E model with a nucleus classifier)."""
        return self.stain == "he" and self.model.classes is not None and self.model.path is not None

    @property
    def schema(self) -> pa.Schema:
        return cell_schema(self.stain, self.channel_names, self.classify)


@functools.lru_cache(maxsize=4)
def _slide(path: str, mpp: float):
    return open_slide(path, mpp=mpp)


_MODELS: dict = {}


def _model(spec: ModelSpec, precision: str):
    """The worker's loaded model for ``spec`` running in ``precision`` (loaded on first use, then kept)."""
    key = (spec.name, str(spec.path), precision)
    if key not in _MODELS:
        use_precision(precision)
        _MODELS[key] = load_model(spec)
        one_graph_for_all_shapes(_MODELS[key])
    return _MODELS[key]


def warm_worker(spec: ModelSpec, precision: str) -> None:
    """Load ``spec`` in ``precision`` into this worker process's model cache now
    (``client.run(warm_worker, spec, precision)``) and trace its graph on a small image, so that no
    tile task pays for either later."""
    channels = (spec.n_channels,) if spec.n_channels > 1 else ()
    _model(spec, precision).predict(np.zeros((96, 128, *channels), np.float32), axes="YXC" if channels else "YX")


def predict_tile(job: SegmentJob, tile: Tile) -> tuple:
    """StarDist on the tile's read box; returns its pixels, (coord, points, prob) in read-box px and
    timings (s).

    With ``job.second_view_saturation`` the network also sees the tile with its saturation scaled
    (:func:`scale_saturation`), and each pixel keeps the probability and distances of the view where
    its nucleus probability is higher, before one non-maximum suppression. The model misses most
    nuclei of dark purple, hematoxylin-heavy fields (MoNuSAC's lymphocyte sheets: 0.44 of them found)
    yet finds them in a greyer view of the same pixels (0.83), while keeping what it finds in the
    full-colour view (CoNSeP, where the greyer view alone loses a quarter of the nuclei).
    """
    timings = Timings()
    with timings.time("model_load_s"):
        model = _model(job.model, job.precision)
    with timings.time("read_s"):
        img = _slide(job.slide_path, job.slide_mpp).read(*tile.read_box, mpp=job.grid_mpp)
    with timings.time("normalize_s"):
        x = normalize_image(
            img if job.nucleus_channel is None else img[..., job.nucleus_channel], job.model, job.percentiles
        )
        grey = greyer_view(img, job.second_view_saturation, job.model, job.percentiles)
    with timings.time("stardist_s"):
        det = detect(model, x, job.prob_thresh, job.nms_thresh, grey, job.flips)
    return img, det["coord"], det["points"], det["prob"], dict(timings)


def detect(
    model, x: np.ndarray, prob_thresh=None, nms_thresh=None, second: np.ndarray | None = None, flips: int = 1
) -> dict:
    """StarDist's nuclei (``coord``, ``points``, ``prob`` in px) of the normalised image ``x``; the
    model's thresholds where ``prob_thresh`` / ``nms_thresh`` are None.

    With ``second`` (another view of the same pixels, normalised), each pixel keeps the probability and
    distances of the view where its nucleus probability is higher; with ``flips`` 2 or 4 each view's
    maps are averaged over its mirror images (:func:`network_maps`). One non-maximum suppression runs on
    the result (StarDist's own step after the network in ``predict_instances``).
    """
    axes = "YXC" if x.ndim == 3 else "YX"
    if second is None and flips == 1:
        _, det = model.predict_instances(
            x,
            axes=axes,
            prob_thresh=prob_thresh,
            nms_thresh=nms_thresh,
            return_labels=False,
            show_tile_progress=False,
            verbose=False,
        )
        return det
    prob, dist = network_maps(model, x, flips)
    if second is not None:
        prob2, dist2 = network_maps(model, second, flips)
        take = prob2 > prob
        prob, dist = np.where(take, prob2, prob), np.where(take[..., None], dist2, dist)
    _, det = model._instances_from_prediction(
        x.shape[:2], prob, dist, prob_thresh=prob_thresh, nms_thresh=nms_thresh, return_labels=False
    )
    return det


def network_maps(model, x: np.ndarray, flips: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """StarDist's nucleus probability (h, w) and ray distances (h, w, n_rays) on its output grid for the
    normalised image ``x``, averaged over ``flips`` mirror images of it (:data:`MIRRORS`, as (up-down,
    left-right): 1 the image itself, 2 also left-right, 4 also up-down and both), each mapped back.

    A mirrored image is first padded (reflected) to an edge of ``k · grid + 1`` px so that its output
    grid points fall on the image's own, and its rays are renumbered: StarDist's ray k points at angle
    2πk/n (y + d·sin, x + d·cos), so a left-right mirror sends it to n/2 - k and an up-down one to -k.
    Averaging over mirrors (test-time augmentation) costs one network pass per mirror.
    """
    n = int(model.config.n_rays)
    if flips not in MIRRORS or (flips > 1 and n % 2):
        raise ValueError(f"flips must be one of {sorted(MIRRORS)} (more than 1 needs an even ray count), not {flips!r}")
    axes = "YXC" if x.ndim == 3 else "YX"
    if flips == 1:  # the shipped path: no copies of the maps
        return model.predict(x, axes=axes, show_tile_progress=False)
    grid = tuple(int(g) for g in model.config.grid)
    out = tuple(-(-s // g) for s, g in zip(x.shape[:2], grid))
    probs, dists = [], []
    for up_down, left_right in MIRRORS[flips]:
        axes_flipped = tuple(a for a, f in ((0, up_down), (1, left_right)) if f)
        pad = [((0, (1 - x.shape[a]) % grid[a]) if a in axes_flipped else (0, 0)) for a in (0, 1)]
        xm = np.pad(x, pad + [(0, 0)] * (x.ndim - 2), mode="reflect") if any(p[1] for p in pad) else x
        prob, dist = model.predict(np.ascontiguousarray(np.flip(xm, axes_flipped)), axes=axes, show_tile_progress=False)
        prob, dist = np.flip(prob, axes_flipped)[: out[0], : out[1]], np.flip(dist, axes_flipped)[: out[0], : out[1]]
        rays = np.arange(n)
        if up_down:
            rays = -rays % n
        if left_right:
            rays = (n // 2 - rays) % n
        probs.append(prob)
        dists.append(dist[..., rays])
    return np.mean(probs, axis=0), np.mean(dists, axis=0)


def greyer_view(rgb: np.ndarray, factor: float | None, spec: ModelSpec, percentiles=None) -> np.ndarray | None:
    """The second view of ``rgb`` for :func:`detect`: its saturation × ``factor``, normalised for
    ``spec`` as the first view is; None where ``factor`` is None (one view)."""
    return None if factor is None else normalize_image(scale_saturation(rgb, factor), spec, percentiles)


def scale_saturation(rgb: np.ndarray, factor: float) -> np.ndarray:
    """``rgb`` (H, W, 3) with its HSV saturation × ``factor`` and its hue and value kept, as float32 in
    the input's range: each channel moves toward the pixel's brightest one, ``max - factor · (max - c)``
    (exactly what scaling S in HSV does)."""
    x = np.asarray(rgb, np.float32)
    top = x.max(axis=-1, keepdims=True)
    return top - np.float32(factor) * (top - x)


def segment_tile(job: SegmentJob, tile: Tile) -> dict:
    """Segment one tile and write its nuclei to ``parts_dir/<tile>.parquet``; return a summary."""
    img, coord, points, prob, timings = predict_tile(job, tile)
    with stopwatch() as features_clock:
        keep = owned(points, tile)
        coord, points, prob = coord[keep], points[keep], prob[keep]
        features = nucleus_features(img, coord, job.grid_mpp, job.stain, job.channel_names)
        if job.classify:
            features = features.assign(**nucleus_classes(img, coord, points, job))
    with stopwatch() as write_clock:
        cells = tile_cells(coord, points, prob, tile, job.grid_mpp, job.grid_width, features)
        part = Path(job.parts_dir) / f"{tile.name}.parquet"
        with atomic_write(part, unique=True) as tmp:
            pq.write_table(pa.Table.from_pandas(cells, schema=job.schema, preserve_index=False), tmp)
    timings["features_s"] = features_clock.s
    timings["table_write_s"] = write_clock.s
    return {"tile": tile.name, "n_cells": len(cells), **timings}


def nucleus_classes(img: np.ndarray, coord: np.ndarray, points: np.ndarray, job: SegmentJob) -> dict:
    """``nucleus_class`` (the classifier's most probable class, its members' probabilities averaged) and
    ``nucleus_class_prob`` per nucleus; the classifier runs in the precision the worker's StarDist model
    set (:func:`_model`)."""
    graphs = load_classifier(str(job.model.path))
    probs = tile_class_probs(graphs, img, coord, points, job.grid_mpp)
    best = np.argmax(probs, axis=1)
    return {
        "nucleus_class": np.asarray(job.model.classes, dtype=object)[best],
        "nucleus_class_prob": probs[np.arange(len(best)), best].astype(np.float32),
    }


def whole_image_centres(
    slide_path: str, model: str, second_view_saturation: float | None = None, flips: int = 1
) -> np.ndarray:
    """Reference: StarDist centres (n, 2) as (x, y) µm from one prediction on the whole slide image
    at once, normalised as the tiles are, with the tiles' second view (:func:`predict_tile`) where
    ``second_view_saturation`` is given and their ``flips``. For small slides only; call it in a
    worker process."""
    spec = resolve_model(model)
    slide = open_slide(slide_path)
    mpp = slide.effective_mpp(spec.mpp)
    h, w = (int(np.ceil(s * slide.mpp / mpp)) for s in slide.shape)
    rgb = slide.read(0, 0, w, h, mpp=mpp)
    second = greyer_view(rgb, second_view_saturation, spec)
    det = detect(_model(spec, inference_precision()), normalize_image(rgb, spec), second=second, flips=flips)
    return (det["points"][:, ::-1] + 0.5) * mpp
