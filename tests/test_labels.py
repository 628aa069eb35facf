"""The label rasteriser: pixel centres inside a polygon get its label, later polygons on top."""

from __future__ import annotations

import numpy as np
import shapely
from skimage.draw import polygon as skimage_polygon

from histo.labels import rasterise


def test_pixel_centres_inside_and_later_on_top():
    square = shapely.box(0.0, 0.0, 4.0, 4.0)  # µm; at 1 µm/px the centres 0.5 … 3.5 are inside
    shifted = shapely.box(2.0, 2.0, 6.0, 6.0)
    out = rasterise(np.array([square, shifted]), np.array([7, 9]), 1.0, (0, 0), (8, 8))
    expected = np.zeros((8, 8), np.int32)
    expected[:4, :4] = 7
    expected[2:6, 2:6] = 9
    assert np.array_equal(out, expected)
    # a chunk whose top-left is grid px (x=3, y=1) sees the same pixels
    assert np.array_equal(rasterise(np.array([square, shifted]), np.array([7, 9]), 1.0, (3, 1), (5, 5)),
                          expected[1:6, 3:8])
    # half the pixel size: the square covers 8 × 8 px
    assert (rasterise(np.array([square]), np.array([1]), 0.5, (0, 0), (10, 10)) == 1).sum() == 64


def test_matches_skimage_away_from_ties():
    """Random star-shaped polygons with non-integer vertices: the same pixels as skimage.draw.polygon."""
    rng = np.random.default_rng(0)
    polys = []
    for _ in range(50):
        angles = np.sort(rng.uniform(0, 2 * np.pi, 24))
        radii = rng.uniform(3, 12, 24)
        cx, cy = rng.uniform(10, 90, 2)
        polys.append(shapely.Polygon(np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)] + 0.123))
    out = rasterise(np.array(polys), np.arange(1, 51), 1.0, (0, 0), (100, 100))
    expected = np.zeros((100, 100), np.int32)
    for label, poly in enumerate(polys, 1):
        xy = shapely.get_coordinates(poly.exterior) - 0.5
        rr, cc = skimage_polygon(xy[:, 1], xy[:, 0], shape=expected.shape)
        expected[rr, cc] = label
    assert np.array_equal(out, expected)


def test_empty():
    assert not rasterise(np.array([]), np.array([]), 1.0, (0, 0), (3, 4)).any()
