"""The tile task's prediction: the second, greyer view of H&E tiles."""

from __future__ import annotations

import numpy as np
from helpers import shared_path
from skimage.color import rgb2hsv
from skimage.io import imread
from skimage.measure import label

from histo.segment.models import resolve_model
from histo.segment.task import SegmentJob, predict_tile, scale_saturation
from histo.segment.tiling import Tile

LYMPHOCYTE = 2  # MoNuSAC class value


def test_scale_saturation_scales_hsv_saturation_and_keeps_hue_and_value():
    rgb = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    grey = scale_saturation(rgb, 0.3)
    assert grey.dtype == np.float32 and grey.shape == rgb.shape and 0 <= grey.min() and grey.max() <= 255
    before, after = rgb2hsv(rgb), rgb2hsv(grey / 255)
    np.testing.assert_allclose(after[..., 2], before[..., 2], atol=1e-6)
    np.testing.assert_allclose(after[..., 1], 0.3 * before[..., 1], atol=1e-6)
    coloured = before[..., 1] > 0.05
    turn = (after[..., 0] - before[..., 0] + 0.5) % 1 - 0.5
    assert np.abs(turn[coloured]).max() < 1e-5
    np.testing.assert_array_equal(scale_saturation(rgb, 1.0), rgb.astype(np.float32))


def test_second_view_finds_the_lymphocytes_of_a_dark_purple_field(tmp_path):
    """A real MoNuSAC lung field of dark purple, hematoxylin-heavy lymphocyte sheets (measure only,
    never trained on): one view finds few of its lymphocytes; the greyer second view most of them,
    with no extra nuclei off the annotated ones."""
    root = shared_path("data", "monusac_test_classes")
    name = "TCGA-49-6743-01Z-00-DX2_003"
    image = root / "images" / f"{name}.jpg"
    classes = imread(root / "class_masks" / f"{name}.png")
    components = label(classes == LYMPHOCYTE)
    h, w = classes.shape
    spec = resolve_model("histo-he")
    tile = Tile(0, 0, 0, 0, w, h, 0, w, h)
    found, on_annotated = {}, {}
    for view in (None, 0.3):
        job = SegmentJob(str(image), 0.25, spec, 0.25, w, str(tmp_path), second_view_saturation=view)
        img, coord, points, prob, timings = predict_tile(job, tile)
        assert img.shape == (h, w, 3) and len(coord) == len(points) == len(prob) and timings["stardist_s"] > 0
        rows, cols = np.clip(points.round().astype(int), 0, [h - 1, w - 1]).T
        found[view] = len(set(components[rows, cols].tolist()) - {0}) / components.max()
        on_annotated[view] = (classes[rows, cols] > 0).mean()
    assert found[None] < 0.35 and found[0.3] > found[None] + 0.25, found
    assert on_annotated[0.3] >= on_annotated[None] - 0.05, on_annotated
