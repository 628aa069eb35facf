"""Synthetic slides with ground truth (package histo_sample, folder sample_data/)."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import tifffile
from shapely.geometry import shape

import histo_sample as hs

MPP = 0.5


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One small slide of each kind (2048² px = 1 mm at 0.5 µm/px)."""
    d = tmp_path_factory.mktemp("samples")
    return {k: hs.write_sample(k, d / f"{k}.ome.tif", size=2048, seed=3) for k in ("lymph-node", "synovium")}


def _truth(info):
    return pq.read_table(info["truth"]).to_pandas()


def _features(info, kind=None):
    fc = json.loads(open(info["geojson"], encoding="utf-8").read())
    return [f for f in fc["features"] if kind is None or f["properties"]["kind"] == kind]


def test_unknown_kind_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="tonsil"):
        hs.write_sample("tonsil", tmp_path / "x.ome.tif", size=1024)
    with pytest.raises(ValueError, match="tonsil"):
        hs.make_scene("tonsil", 1024, 0)


@pytest.mark.parametrize("kind", ["lymph-node", "synovium"])
def test_file_is_a_tiled_jpeg_ome_pyramid(written, kind):
    info = written[kind]
    assert info["levels"][0] == (2048, 2048) and len(info["levels"]) >= 2
    with tifffile.TiffFile(info["image"]) as tif:
        assert tif.is_ome
        s = tif.series[0]
        assert s.axes == "YXS" and s.dtype == np.uint8
        assert [lv.shape[:2] for lv in s.levels] == [tuple(v) for v in info["levels"]]
        for lv in s.levels:
            page = lv.keyframe
            assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert float(pixels["PhysicalSizeX"]) == MPP and float(pixels["PhysicalSizeY"]) == MPP
        assert pixels["PhysicalSizeXUnit"] == "µm"
        low = s.levels[-1].asarray()
    # bright glass around the tissue, stained tissue inside
    assert np.percentile(low.mean(-1), 95) > 230
    assert np.percentile(low.mean(-1), 5) < 200


def test_other_pixel_size_is_recorded(tmp_path):
    info = hs.write_sample("synovium", tmp_path / "s.ome.tif", size=1024, seed=1, mpp=0.25)
    with tifffile.TiffFile(info["image"]) as tif:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert float(pixels["PhysicalSizeX"]) == 0.25
        assert len(tif.series[0].levels) >= 2


def test_same_seed_same_output_other_seed_differs(tmp_path):
    a = hs.write_sample("lymph-node", tmp_path / "a.ome.tif", size=1024, seed=5)
    b = hs.write_sample("lymph-node", tmp_path / "b.ome.tif", size=1024, seed=5)
    c = hs.write_sample("lymph-node", tmp_path / "c.ome.tif", size=1024, seed=6)
    assert open(a["truth"], "rb").read() == open(b["truth"], "rb").read()
    assert open(a["geojson"], "rb").read() == open(b["geojson"], "rb").read()
    assert np.array_equal(tifffile.imread(a["image"]), tifffile.imread(b["image"]))
    assert not _truth(a).equals(_truth(c))
    assert not np.array_equal(tifffile.imread(a["image"]), tifffile.imread(c["image"]))


@pytest.mark.parametrize("kind", ["lymph-node", "synovium"])
def test_truth_table(written, kind):
    info = written[kind]
    t = pq.read_table(info["truth"])
    assert {"x_um", "y_um", "cell_type", "area_um2", "region"} <= set(t.column_names)
    df = t.to_pandas()
    assert len(df) == info["n_nuclei"] > 1000
    assert df["x_um"].dtype == np.float64 and df["y_um"].dtype == np.float64
    assert df["area_um2"].dtype.kind == "f"
    assert set(df["cell_type"]) <= {"lymphocyte", "large", "stromal", "lining"}
    assert set(df["region"]) <= {"", "follicle", "germinal_centre", "aggregate", "lining"}
    side = 2048 * MPP
    assert df["x_um"].between(0, side).all() and df["y_um"].between(0, side).all()
    assert df["id"].is_unique
    # sizes (DOMAIN.md §3): small lymphocyte ≈ 28 µm², centroblast-like 50-90, lining 30-45
    med = df.groupby("cell_type")["area_um2"].median()
    assert 25 <= med["lymphocyte"] <= 31
    if "large" in med:
        assert 50 <= med["large"] <= 90
    if kind == "synovium":
        assert 30 <= med["lining"] <= 45
        assert {"stromal", "lining", "lymphocyte"} <= set(df["cell_type"])
    else:
        assert {"lymphocyte", "large"} <= set(df["cell_type"])


@pytest.mark.parametrize("kind", ["lymph-node", "synovium"])
def test_truth_geojson(written, kind):
    info = written[kind]
    feats = _features(info)
    kinds = {f["properties"]["kind"] for f in feats}
    assert kinds <= {"tissue", "follicle", "germinal_centre", "aggregate", "lining"}
    for f in feats:
        g = shape(f["geometry"])
        assert g.geom_type == "Polygon" and g.is_valid and g.area > 0
    tissue = shapely.union_all([shape(f["geometry"]) for f in _features(info, "tissue")])
    df = _truth(info)
    pts = shapely.points(df["x_um"].to_numpy(), df["y_um"].to_numpy())
    inside = shapely.contains(tissue.buffer(1.0), pts)
    assert inside.all()
    if kind == "lymph-node":
        foll = _features(info, "follicle")
        assert len(foll) >= 2
        assert any(f["properties"]["has_gc"] for f in foll)
        assert len(_features(info, "germinal_centre")) >= 1
    else:
        aggs = _features(info, "aggregate")
        assert len(aggs) >= 2
        assert all(f["properties"]["grade"] in (1, 2, 3) for f in aggs)
        lin = _features(info, "lining")
        assert lin and all(1 <= f["properties"]["layers"] <= 6 for f in lin)


@pytest.mark.parametrize("kind,struct", [("lymph-node", "follicle"), ("synovium", "aggregate")])
def test_lymphocytes_denser_in_structures(written, kind, struct):
    info = written[kind]
    df = _truth(info)
    lym = df[df["cell_type"] == "lymphocyte"]
    tissue = shapely.union_all([shape(f["geometry"]) for f in _features(info, "tissue")])
    zone = shapely.union_all([shape(f["geometry"]) for f in _features(info, struct)])
    if kind == "lymph-node":  # the mantle of packed small B cells, not the germinal centre
        zone = zone.difference(shapely.union_all([shape(f["geometry"]) for f in _features(info, "germinal_centre")]))
    pts = shapely.points(lym["x_um"].to_numpy(), lym["y_um"].to_numpy())
    n_in = shapely.contains(zone, pts).sum()
    n_tis = shapely.contains(tissue, pts).sum()
    d_in = n_in / zone.area
    d_out = (n_tis - n_in) / (tissue.area - zone.area)
    assert d_in > (1.4 if kind == "lymph-node" else 2.5) * d_out
    # DOMAIN §2: lymphocyte density inside lymphoid aggregates ≈ 0.0128 /µm²
    assert 0.009 < d_in < 0.025
    # truth 'region' agrees with the polygons
    regions = ["follicle"] if kind == "lymph-node" else ["aggregate"]
    assert lym["region"].isin(regions).sum() == pytest.approx(n_in, rel=0.1)


def test_aggregate_grades_match_their_size():
    s = hs.make_scene("synovium", 4096, 2)
    grades = {a.grade for a in s.structures}
    assert grades == {1, 2, 3}
    for a in s.structures:
        r = np.sqrt(a.blob.ax * a.blob.ay)
        layers = r / 8.5  # DOMAIN §7.3: radius / lymphocyte spacing
        lo, hi = {1: (2, 5), 2: (6, 10), 3: (10.5, 99)}[a.grade]
        assert lo <= layers <= hi


@pytest.mark.parametrize("kind", ["lymph-node", "synovium"])
def test_rendered_nucleus_areas(kind):
    s = hs.make_scene(kind, 4096, 1)
    # a region on tissue: around the first structure
    st = s.structures[0].blob
    x0, y0 = int(st.cx / s.mpp) - 256, int(st.cy / s.mpp) - 256
    rgb, lab = hs.render_region(s, x0, y0, 512, 512)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    assert lab.shape == (512, 512) and lab.dtype == np.int32
    nuc = s.nuclei_in(x0 * s.mpp + 10, y0 * s.mpp + 10, (x0 + 512) * s.mpp - 10, (y0 + 512) * s.mpp - 10)
    ids = nuc["id"]
    counts = np.bincount(lab.ravel())
    area = counts[ids] * s.mpp**2  # µm² per nucleus from its labelled pixels
    types = hs.scene.cell_type(nuc["style"])
    assert (area > 0).mean() > 0.97  # nearly every nucleus is visible in the labels
    lym = area[types == "lymphocyte"]
    assert 24 <= np.median(lym) <= 32
    large = area[types == "large"]
    if large.size > 5:
        assert 45 <= np.median(large) <= 92
    # nuclei are dark: mean RGB over labelled pixels well below the background
    assert rgb[lab > 0].mean() < rgb[lab == 0].mean() - 30


def test_regions_render_the_same_wherever_cut():
    s = hs.make_scene("lymph-node", 4096, 2)
    x0, y0 = 1500, 1700  # straddles a block border (256 µm = 512 px)
    rgb, lab = hs.render_region(s, x0, y0, 160, 120)
    left_rgb, left_lab = hs.render_region(s, x0, y0, 80, 120)
    right_rgb, right_lab = hs.render_region(s, x0 + 80, y0, 80, 120)
    assert np.array_equal(rgb, np.concatenate([left_rgb, right_rgb], 1))
    assert np.array_equal(lab, np.concatenate([left_lab, right_lab], 1))
    # a lower level, too
    a, _ = hs.render_region(s, 400, 400, 64, 64, downsample=4)
    b, _ = hs.render_region(s, 432, 400, 32, 64, downsample=4)
    assert np.array_equal(a[:, 32:], b)


def test_nuclei_barely_overlap():
    s = hs.make_scene("lymph-node", 2048, 4)
    nuc = s.nuclei_in(0, 0, s.width_um, s.height_um)
    from scipy.spatial import cKDTree

    r = np.sqrt(nuc["a"] * nuc["b"])
    tree = cKDTree(np.stack([nuc["x"], nuc["y"]], 1))
    d, j = tree.query(np.stack([nuc["x"], nuc["y"]], 1), k=2)
    round_ = np.isin(nuc["style"], [0, 1, 2, 5])
    tight = d[:, 1] < 0.85 * (r + r[j[:, 1]])
    assert tight[round_].mean() < 0.01


def test_huge_scene_is_lazy():
    t = time.perf_counter()
    s = hs.make_scene("lymph-node", 100_000, 0)
    x0 = y0 = 50_000
    rgb, lab = hs.render_region(s, x0, y0, 512, 512)
    dt = time.perf_counter() - t
    assert rgb.mean() < 235 and lab.max() > 0  # it is tissue, with nuclei
    assert len(s._cache) < 60  # only the blocks around the region were generated
    assert dt < 30


def test_training_set(tmp_path):
    hs.write_training_set(tmp_path, n_tiles=6, tile_px=128, seed=1)
    imgs = sorted((tmp_path / "images").glob("*.tif"))
    masks = sorted((tmp_path / "masks").glob("*.tif"))
    assert [p.name for p in imgs] == [p.name for p in masks] and len(imgs) == 6
    n_nuc = 0
    for ip, mp in zip(imgs, masks):
        im, m = tifffile.imread(ip), tifffile.imread(mp)
        assert im.shape == (128, 128, 3) and im.dtype == np.uint8
        assert m.shape == (128, 128) and m.dtype in (np.uint16, np.int32)
        labels = np.unique(m)
        assert labels[0] == 0 and np.array_equal(labels, np.arange(labels.size))  # 1..n, no gaps
        n_nuc += labels.size - 1
    assert n_nuc > 50
