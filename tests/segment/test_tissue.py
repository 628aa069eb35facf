"""histo.segment.tissue: tissue blobs found in µm, pen and glass excluded, fluorescence, rectangle queries."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from helpers import shared_path
from shapely.geometry import Point

from histo.io.slide import open_slide
from histo.segment.tissue import detect_tissue, tissue_fraction

MPP = 4.0  # µm/px of the synthetic slides: 1000 × 800 px = 4 × 3.2 mm
RNG = np.random.default_rng(1)


def glass(h=800, w=1000) -> np.ndarray:
    return (RNG.integers(-4, 5, (h, w, 3)) + [240, 238, 242]).astype(np.uint8)


def disk(img, cx_um, cy_um, r_um, color, ry_um=None):
    yy, xx = np.ogrid[: img.shape[0], : img.shape[1]]
    ry = ry_um or r_um
    inside = ((xx + 0.5) * MPP - cx_um) ** 2 / r_um**2 + ((yy + 0.5) * MPP - cy_um) ** 2 / ry**2 <= 1
    img[inside] = np.clip(RNG.integers(-20, 21, (inside.sum(), 3)) + color, 0, 255)
    return np.pi * r_um * ry


def slide_of(tmp_path, img):
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(256, 256), metadata=None)
    return open_slide(tmp_path / "s.tif", mpp=MPP)


def test_blobs_found_pen_excluded(tmp_path):
    img = glass()
    big = disk(img, 1200, 1300, 600, (225, 140, 185))  # eosin pink
    small = disk(img, 3000, 800, 300, (150, 90, 170), ry_um=200)  # haematoxylin purple
    y_um, x_um = (np.mgrid[:800, :1000] + 0.5) * MPP
    pen = np.abs(y_um - (2900 - 0.1 * x_um)) < 50  # a 100 µm wide blue marker stroke on glass
    img[pen] = RNG.integers(-10, 11, (pen.sum(), 3)) + (40, 60, 150)
    t = detect_tissue(slide_of(tmp_path, img))
    assert t.mpp == 8.0 and t.mask.shape == (400, 500)
    assert len(t.pieces) == 2
    assert t.pieces[0].area == pytest.approx(big, rel=0.1) and t.pieces[1].area == pytest.approx(small, rel=0.1)
    assert t.pieces[0].contains(Point(1200, 1300)) and t.pieces[1].contains(Point(3000, 800))
    y_m, x_m = (np.mgrid[:400, :500] + 0.5) * t.mpp
    assert not t.mask[np.abs(y_m - (2900 - 0.1 * x_m)) < 60].any()  # nothing on or next to the pen
    assert tissue_fraction(t, 3400, 2500, 200, 100) == 0
    f = tissue_fraction(t, [1100, 3000, 0], [1200, 780, 0], 100, 40)
    assert f[0] == 1 and f[1] == 1 and f[2] == 0


def test_pure_glass_has_no_tissue(tmp_path):
    t = detect_tissue(slide_of(tmp_path, glass()))
    assert t.pieces == [] and not t.mask.any()


def test_holes_kept_and_small_specks_dropped(tmp_path):
    img = glass()
    disk(img, 2000, 1600, 700, (220, 130, 180))
    disk(img, 2000, 1600, 200, (240, 238, 242))  # a 200 µm lumen: 125,664 µm², kept as a hole
    disk(img, 600, 400, 40, (220, 130, 180))  # a 5,000 µm² speck: dropped
    t = detect_tissue(slide_of(tmp_path, img))
    assert len(t.pieces) == 1 and len(t.pieces[0].interiors) == 1
    assert t.pieces[0].area == pytest.approx(np.pi * (700**2 - 200**2), rel=0.1)


def test_fluorescence_uses_dna_channel(tmp_path):
    img = RNG.integers(150, 250, (2, 400, 500)).astype(np.uint16)
    yy, xx = np.ogrid[:400, :500]
    img[0][(yy - 200) ** 2 + (xx - 250) ** 2 < 125**2] += 5000
    tifffile.imwrite(tmp_path / "f.ome.tif", img, metadata={"axes": "CYX"})
    s = open_slide(tmp_path / "f.ome.tif", mpp=MPP)
    assert s.kind == "fluorescence" and s.levels[0].shape == (400, 500, 2)
    t = detect_tissue(s)
    assert len(t.pieces) == 1 and t.pieces[0].area == pytest.approx(np.pi * 500**2, rel=0.1)
    tifffile.imwrite(tmp_path / "dark.ome.tif", img[:, :, 400:], metadata={"axes": "CYX"})  # noise only
    assert detect_tissue(open_slide(tmp_path / "dark.ome.tif", mpp=MPP)).pieces == []


def test_crop_is_tissue_except_glass(tmp_path):
    """A 250 µm crop (no pyramid): pale stroma and a small lumen stay tissue; a 100 µm glass corner
    does not; pure glass has none."""
    rng = np.random.default_rng(3)
    img = np.clip(rng.normal((215, 170, 205), 12, (1000, 1000, 3)), 0, 255).astype(np.uint8)  # eosin
    img[400:440, 400:440] = 243  # a 10 × 10 µm lumen: not glass (< 50 × 50 µm)
    img[:400, :400] = (rng.integers(-4, 5, (400, 400, 3)) + 240).astype(np.uint8)  # 100 × 100 µm glass
    tifffile.imwrite(tmp_path / "crop.tif", img)
    t = detect_tissue(open_slide(tmp_path / "crop.tif", mpp=0.25))
    assert t.mpp == 2.0 and len(t.pieces) == 1
    assert t.pieces[0].area == pytest.approx(250**2 - 100**2, rel=0.05)
    assert t.pieces[0].contains(Point(105, 105)) and not t.pieces[0].contains(Point(50, 50))
    tifffile.imwrite(tmp_path / "glass.tif", glass(1000, 1000))
    assert detect_tissue(open_slide(tmp_path / "glass.tif", mpp=0.25)).pieces == []


def test_real_annotated_tile_is_all_tissue():
    """MoNuSeg tiles are cut from tissue: the crop rule keeps (nearly) all of every test tile."""
    folder = shared_path("data", "monuseg", "test", "images")
    for path in sorted(folder.glob("*.tif")):
        t = detect_tissue(open_slide(path, mpp=0.25))
        area = sum(p.area for p in t.pieces)
        assert area >= 0.97 * 250**2, (path.name, area)
