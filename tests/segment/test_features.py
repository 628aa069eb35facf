"""Nucleus features: polygon shape vs skimage regionprops, stain OD recovered from painted tiles."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb_from_hed
from skimage.draw import polygon as draw_polygon
from skimage.measure import regionprops

from histo.segment.features import feature_columns, nucleus_features, polygon_pixels, shape_features, stain_features


def ellipse(cy, cx, a, b, theta, n=64):
    """(2, n) (y, x) vertices of an ellipse with semi-axes a ≥ b (px) rotated by theta (rad)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    u, v = a * np.cos(t), b * np.sin(t)
    return np.stack([cy + u * np.sin(theta) + v * np.cos(theta), cx + u * np.cos(theta) - v * np.sin(theta)])


def star(cy, cx, r, k, amp, n=64):
    """(2, n) vertices of a non-convex star-shaped polygon r·(1 + amp·cos kθ)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rr = r * (1 + amp * np.cos(k * t))
    return np.stack([cy + rr * np.sin(t), cx + rr * np.cos(t)])


def random_stars(rng, n, size, r=(3, 8), n_rays=32):
    """StarDist-like (n, 2, n_rays) polygons with noisy rays, centres anywhere in a size² tile."""
    ang = 2 * np.pi * np.arange(n_rays) / n_rays
    rad = np.abs(rng.uniform(*r, (n, 1)) * (1 + 0.2 * rng.standard_normal((n, n_rays))))
    cy, cx = rng.uniform(-5, size + 5, (2, n, 1))
    return np.stack([cy + rad * np.sin(ang), cx + rad * np.cos(ang)], axis=1)


SHAPES = [
    ellipse(60, 60, 30, 30, 0),
    ellipse(60, 60, 40, 15, 0.3),
    ellipse(60, 60, 35, 25, 1.2),
    ellipse(60, 60, 45, 9, 2.0),
    star(60, 60, 30, 3, 0.3),
    star(60, 60, 30, 5, 0.2),
    star(60, 60, 35, 2, 0.4),
]


def test_shape_features_match_regionprops():
    mpp = 0.5
    f = shape_features(np.stack(SHAPES), mpp)
    assert list(f.columns) == feature_columns("he")[:6]
    for i, c in enumerate(SHAPES):
        mask = np.zeros((120, 120), np.uint8)
        mask[draw_polygon(c[0], c[1], mask.shape)] = 1
        p = regionprops(mask, spacing=(mpp, mpp))[0]
        assert f.major_axis_um[i] == pytest.approx(p.axis_major_length, rel=0.01)
        assert f.minor_axis_um[i] == pytest.approx(p.axis_minor_length, rel=0.01)
        assert f.eccentricity[i] == pytest.approx(p.eccentricity, abs=0.05)  # pixel steps: 0.046 on a disc
        assert f.perimeter_um[i] == pytest.approx(p.perimeter_crofton, rel=0.02)
        assert f.solidity[i] == pytest.approx(p.solidity, rel=0.06)  # pixel hulls add their pixels' area
    convex = [0, 1, 2, 3]
    np.testing.assert_allclose(f.solidity[convex], 1, atol=1e-6)
    assert f.circularity[0] == pytest.approx(1, abs=0.005)
    assert f.eccentricity[1] == pytest.approx(np.sqrt(1 - (15 / 40) ** 2), abs=0.005)
    assert (f.solidity[4:] < 0.97).all() and (f.circularity[4:] < 0.85).all()


def test_shape_features_degenerate_and_empty():
    flat = np.zeros((1, 2, 32))
    assert shape_features(flat, 0.5).isna().all(axis=None)
    assert len(shape_features(np.zeros((0, 2, 32)), 0.5)) == 0


def test_polygon_pixels_match_skimage_draw():
    rng = np.random.default_rng(1)
    coord = random_stars(rng, 300, 64)
    nuc, flat = polygon_pixels(coord, (64, 70))
    for i in range(len(coord)):
        rr, cc = draw_polygon(coord[i, 0], coord[i, 1], (64, 70))
        assert set((rr * 70 + cc).tolist()) == set(flat[nuc == i].tolist())


def paint(shape, coord, conc, background, texture=None):
    """uint8 RGB by Beer–Lambert: decadic OD = Σ concentration × stain vector; I = 255·10^-OD.

    ``conc`` (n, 3) (H, E, DAB) inside each polygon, ``background`` (3,) elsewhere; ``texture``
    maps flat pixel indices to a factor on haematoxylin.
    """
    h, w = shape
    c = np.tile(np.asarray(background, np.float64), (h * w, 1))
    nuc, flat = polygon_pixels(coord, shape)
    c[flat] = conc[nuc]
    if texture is not None:
        c[flat, 0] *= texture(flat)
    return np.clip(np.rint(255 * 10.0 ** -(c @ rgb_from_hed)), 0, 255).astype(np.uint8).reshape(h, w, 3)


def test_stain_features_recover_painted_he():
    rng = np.random.default_rng(2)
    n, side = 150, 13
    cy, cx = np.divmod(np.arange(n), side)
    ang = 2 * np.pi * np.arange(32) / 32
    r = rng.uniform(3, 7, (n, 1))
    coord = np.stack([cy[:, None] * 20 + 10 + r * np.sin(ang), cx[:, None] * 20 + 10 + r * np.cos(ang)], axis=1)
    conc = np.stack([rng.uniform(0.1, 1.2, n), rng.uniform(0.02, 0.4, n), np.zeros(n)], axis=1)
    # chromatin texture: haematoxylin × 1.3 / × 0.7 on a checkerboard
    img = paint(
        (side * 20, side * 20), coord, conc, [0.02, 0.1, 0], lambda flat: np.where((flat + flat // 260) % 2, 1.3, 0.7)
    )
    nuc, flat = polygon_pixels(coord, img.shape[:2])
    h = conc[nuc, 0] * np.where((flat + flat // 260) % 2, 1.3, 0.7)
    h_mean = np.bincount(nuc, h) / np.bincount(nuc)
    h_std = np.sqrt(np.bincount(nuc, h * h) / np.bincount(nuc) - h_mean**2)
    f = stain_features(img, coord, "he")
    assert list(f.columns) == feature_columns("he")[6:]
    np.testing.assert_allclose(f.hematoxylin_od, h_mean, atol=0.01, rtol=0.01)
    np.testing.assert_allclose(f.hematoxylin_od_std, h_std, atol=0.01, rtol=0.03)
    np.testing.assert_allclose(f.eosin_od, conc[:, 1], atol=0.01, rtol=0.01)
    od_sum = rgb_from_hed[:2].sum(axis=1)  # OD_R + OD_G + OD_B per unit H, E
    np.testing.assert_allclose(f.od_total, h_mean * od_sum[0] + conc[:, 1] * od_sum[1], atol=0.01, rtol=0.01)


def test_stain_features_ihc_if_and_empty_nuclei():
    rng = np.random.default_rng(3)
    coord = np.stack(
        [ellipse(20, 20, 8, 6, 0.4, 32), ellipse(20, 50, 7, 7, 0, 32), ellipse(40.3, 40.3, 0.2, 0.2, 0, 32)]
    )  # the last holds no pixel centre
    conc = np.array([[0.6, 0, 0.05], [0.3, 0, 0.8], [0.5, 0, 0.5]])
    img = paint((64, 72), coord, conc, [0.01, 0.05, 0])
    f = stain_features(img, coord, "ihc")
    np.testing.assert_allclose(f.hematoxylin_od[:2], conc[:2, 0], atol=0.02)
    np.testing.assert_allclose(f.dab_od[:2], conc[:2, 2], atol=0.02)
    assert f.iloc[2].isna().all()
    fluo = rng.integers(0, 4000, (64, 72, 2)).astype(np.uint16)
    nuc, flat = polygon_pixels(coord, (64, 72))
    fluo.reshape(-1, 2)[flat[nuc == 0]] = (1000, 7)
    f = stain_features(fluo, coord, "if", ["CD20", "CD3"])
    assert list(f.columns) == ["mean_CD20", "mean_CD3"]
    assert (f.mean_CD20[0], f.mean_CD3[0]) == (1000, 7) and np.isnan(f.mean_CD3[2])
    with pytest.raises(ValueError, match="channel names"):
        stain_features(fluo, coord, "if", ["CD20"])
    with pytest.raises(ValueError, match="uint8 RGB"):
        stain_features(fluo, coord, "he")


def test_nucleus_features_rows_follow_coord():
    rng = np.random.default_rng(4)
    coord = random_stars(rng, 400, 256)
    img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    f = nucleus_features(img, coord, 0.5, "he")
    assert list(f.columns) == feature_columns("he") and len(f) == 400
    g = nucleus_features(img, coord[::-1], 0.5, "he")
    np.testing.assert_array_equal(g.to_numpy(), f.to_numpy()[::-1])
    assert f.dtypes.eq(np.float32).all()
    empty = nucleus_features(img, np.zeros((0, 2, 32)), 0.5, "he")
    assert list(empty.columns) == feature_columns("he") and len(empty) == 0
