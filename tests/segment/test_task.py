"""The tile task's prediction: the second, greyer view of H&E tiles and the mirror images averaged."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from helpers import shared_path
from skimage.color import rgb2hsv
from skimage.io import imread
from skimage.measure import label

from histo.segment.models import load_model, normalize_image, resolve_model
from histo.segment.task import SegmentJob, network_maps, predict_tile, scale_saturation
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


def test_mirror_images_map_back_onto_the_image_grid_and_rays():
    """``network_maps`` on a real MoNuSeg test crop of odd edges: averaged over the 4 mirrors, the maps of
    a mirrored image, mirrored back with their rays renumbered, are the image's own (the same network
    inputs, so equal to rounding); and one mirror's distances, renumbered, match the unmirrored ones far
    better than without renumbering or with the other mirror's numbering (a wrong grid offset or ray
    order would not)."""
    image = shared_path("data", "monuseg", "test", "images") / "TCGA-2Z-A9J9-01A-01-TS1.tif"
    spec = resolve_model("histo-he")
    model = load_model(spec)
    x = normalize_image(tifffile.imread(image)[:301, :255, :3], spec)
    n = model.config.n_rays
    prob4, dist4 = network_maps(model, x, 4)
    assert prob4.shape == (151, 128) and dist4.shape == (151, 128, n)
    for axis, rays in ((1, (n // 2 - np.arange(n)) % n), (0, -np.arange(n) % n)):
        prob_m, dist_m = network_maps(model, np.ascontiguousarray(np.flip(x, axis)), 4)
        np.testing.assert_allclose(np.flip(prob_m, axis), prob4, atol=1e-5)
        np.testing.assert_allclose(np.flip(dist_m, axis)[..., rays], dist4, atol=1e-4)
    prob1, dist1 = network_maps(model, x, 1)
    mirrored = 2 * network_maps(model, x, 2)[1] - dist1  # the left-right mirror's distances, mapped back
    on = prob1 > 0.5
    numbering = {"renumbered": np.arange(n), "as is": (n // 2 - np.arange(n)) % n, "up-down": -np.arange(n) % n}
    error = {name: np.abs(mirrored[..., rays] - dist1)[on].mean() for name, rays in numbering.items()}
    assert error["renumbered"] < 1.0 and error["renumbered"] < 0.3 * min(error["as is"], error["up-down"]), error
    with pytest.raises(ValueError, match="flips"):
        network_maps(model, x, 3)


def test_tiles_predicted_with_mirrors_find_the_same_nuclei(tmp_path):
    """``flips: 4`` through the tile task on a real MoNuSeg test tile (measure only): the nuclei agree
    with one view's: 9 in 10 centres within 3 px (a diagonal step of the network's 2-px output grid)
    and as many nuclei, to a tenth."""
    image = shared_path("data", "monuseg", "test", "images") / "TCGA-2Z-A9J9-01A-01-TS1.tif"
    spec = resolve_model("histo-he")
    tile = Tile(0, 0, 0, 0, 400, 400, 0, 400, 400)
    points = {}
    for flips in (1, 4):
        job = SegmentJob(str(image), 0.25, spec, 0.25, 400, str(tmp_path), second_view_saturation=0.3, flips=flips)
        _, coord, points[flips], prob, _ = predict_tile(job, tile)
        assert len(coord) == len(points[flips]) == len(prob) > 50
    gap = np.linalg.norm(points[1][:, None] - points[4][None], axis=-1).min(axis=1)
    assert np.mean(gap <= 3) >= 0.9 and abs(len(points[4]) - len(points[1])) <= 0.1 * len(points[1]), gap
