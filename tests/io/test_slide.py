"""histo.io.slide: formats, pixel size, errors, exact reads, resampling, laziness, pickling."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import pickle
import time
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

import histo.io.slide as hs
import histo.io.tiff_tiles as tt
from histo.errors import SlideError
from histo.io.slide import open_slide

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SVS = SHARED / "data" / "cmu1_small_region" / "CMU-1-Small-Region.svs"
RNG = np.random.default_rng(0)


def rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), np.uint8)


def pyramid(a: np.ndarray, n: int) -> list[np.ndarray]:
    """Levels with distinct content (not downsamples of level 0) so a read shows which level served it."""
    return [a] + [rgb(a.shape[0] >> i, a.shape[1] >> i) for i in range(1, n)]


def write_ome(path, levels, mpp=0.25, unit="µm", axes=None, **meta):
    with tifffile.TiffWriter(path) as w:
        md = {"PhysicalSizeX": mpp, "PhysicalSizeXUnit": unit, "PhysicalSizeY": mpp, **meta}
        if axes:
            md["axes"] = axes
        w.write(levels[0], tile=(128, 128), compression="zlib", subifds=len(levels) - 1, metadata=md)
        for lv in levels[1:]:
            w.write(lv, tile=(128, 128), compression="zlib", subfiletype=1)
    return path


def write_tiff(path, levels, resolution=None, reduced=True, **kw):
    """Generic tiled TIFF, levels as successive pages; ``resolution`` = (px per cm)."""
    with tifffile.TiffWriter(path) as w:
        for i, lv in enumerate(levels):
            extra = (
                {"resolution": (resolution, resolution), "resolutionunit": "CENTIMETER"}
                if resolution and i == 0
                else {}
            )
            w.write(
                lv,
                tile=(128, 128),
                compression="zlib",
                metadata=None,
                subfiletype=1 if i and reduced else 0,
                **extra,
                **kw,
            )
    return path


def jpeg_tiled(path, shape, tile=512, n_distinct=1, **kw):
    """A big JPEG-tiled TIFF written fast from pre-encoded tiles (cycled)."""
    src = tifffile.imread(SVS)[: tile * 4, : tile * 4] if SVS.exists() else rgb(tile * 4, tile * 4)
    tiles = [
        imagecodecs.jpeg_encode(src[i // 4 * tile : (i // 4 + 1) * tile, i % 4 * tile : (i % 4 + 1) * tile], level=90)
        for i in range(n_distinct)
    ]
    n = -(-shape[0] // tile) * -(-shape[1] // tile)
    with tifffile.TiffWriter(path) as w:
        w.write(
            (tiles[i % n_distinct] for i in range(n)),
            shape=(*shape, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            compression="jpeg",
            photometric="rgb",
            **kw,
        )
    return path


# ---- formats and metadata -----------------------------------------------------------------------


def test_ome_pyramid_reads_exact_levels(tmp_path):
    levels = pyramid(rgb(600, 700), 3)
    s = open_slide(write_ome(tmp_path / "a.ome.tif", levels))
    assert (s.format, s.kind, s.mpp, s.shape) == ("ome-tiff", "brightfield", 0.25, (600, 700))
    assert s.downsamples == [1.0, 2.0, 4.0] and s.channel_names == ["R", "G", "B"]
    for lv, m, a in zip(s.levels, s.mpps, levels):
        assert lv.shape == a.shape and np.array_equal(s.read(13, 7, 150, 140, m), a[7:147, 13:163])
    assert np.array_equal(s.levels[1][100:250, 30:300].compute(), levels[1][100:250, 30:300])


def test_ome_unit_and_fluorescence_channels(tmp_path):
    c = RNG.integers(0, 60000, (3, 300, 260), np.uint16)
    s = open_slide(
        write_ome(
            tmp_path / "f.ome.tif",
            [c, c[:, ::2, ::2]],
            mpp=500,
            unit="nm",
            axes="CYX",
            Channel={"Name": ["DNA", "CD3", "CD20"]},
        )
    )
    assert s.kind == "fluorescence" and s.mpp == pytest.approx(0.5)
    assert s.channel_names == ["DNA", "CD3", "CD20"] and s.levels[0].dtype == np.uint16
    r = s.read(-10, 250, 60, 80, 0.5)  # partly outside: filled with 0
    assert r.shape == (80, 60, 3) and not r[:, :10].any() and not r[50:].any()
    assert np.array_equal(r[:50, 10:], np.moveaxis(c, 0, -1)[250:300, 0:50])


def test_generic_tiff_pages_resolution_in_cm(tmp_path):
    levels = pyramid(rgb(400, 500), 3)
    for reduced in (True, False):  # pages flagged 'reduced' or plain successive pages
        s = open_slide(write_tiff(tmp_path / f"g{reduced}.tif", levels, resolution=1e4 / 0.5, reduced=reduced))
        assert (s.format, s.mpp, len(s.levels)) == ("tiff", 0.5, 3)
        assert np.array_equal(s.read(10, 20, 100, 70, 2.0), levels[2][20:90, 10:110])


def test_svs_description_mpp(tmp_path):
    a, thumb, l1 = rgb(512, 640), rgb(64, 80), rgb(256, 320)
    desc = "Aperio Image Library v12.0.0\r\n640x512 [0,0 640x512] (128x128) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2520"
    with tifffile.TiffWriter(tmp_path / "s.svs") as w:
        w.write(a, tile=(128, 128), compression="zlib", description=desc, metadata=None)
        w.write(
            thumb, compression="zlib", description="Aperio Image Library v12.0.0\r\n640x512 -> 80x64", metadata=None
        )
        w.write(l1, tile=(128, 128), compression="zlib", description="Aperio Image Library v12.0.0\r\n", metadata=None)
    s = open_slide(tmp_path / "s.svs")
    assert (s.format, s.mpp, s.downsamples) == ("svs", 0.252, [1.0, 2.0])
    assert np.array_equal(s.read(0, 0, 320, 256, 0.504), l1)


def test_png_rgba_gray_and_plain_tiff(tmp_path):
    a = rgb(90, 120)
    imagecodecs.imwrite(tmp_path / "a.png", a)
    s = open_slide(tmp_path / "a.png", mpp=0.5)
    assert (s.format, s.kind, len(s.levels)) == ("png", "brightfield", 1)
    assert np.array_equal(s.read(5, 6, 20, 10, 0.5), a[6:16, 5:25])
    rgba = np.dstack([a, np.full(a.shape[:2], 7, np.uint8)])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, tile=(64, 64), extrasamples=["unassalpha"], metadata=None)
    assert np.array_equal(open_slide(tmp_path / "rgba.tif", mpp=1).read(0, 0, 120, 90, 1), a)
    tifffile.imwrite(tmp_path / "gray.tif", a[..., 0], rowsperstrip=16, compression="zlib")  # strips
    g = open_slide(tmp_path / "gray.tif", mpp=1)
    assert g.kind == "brightfield" and g.levels[0].shape == (90, 120, 3)
    assert np.array_equal(g.read(3, 10, 50, 40, 1), np.repeat(a[10:50, 3:53, :1], 3, axis=2))


def test_openslide_fallback_when_tifffile_fails(tmp_path, monkeypatch):
    levels = pyramid(rgb(300, 400), 2)
    path = write_tiff(tmp_path / "o.tif", levels, resolution=1e4 / 0.5)

    def fail(path):
        raise tifffile.TiffFileError("pretend tifffile cannot read this")

    monkeypatch.setattr(hs, "_Tiff", fail)
    s = open_slide(path)
    assert s.format == "openslide-generic-tiff" and s.mpp == 0.5 and len(s.levels) == 2
    assert np.array_equal(s.read(10, 20, 100, 50, 1.0), levels[1][20:70, 10:110])
    assert (s.read(380, 290, 40, 20, 0.5)[15:] == 255).all()  # outside: glass


# ---- errors -------------------------------------------------------------------------------------


def test_errors_name_file_and_problem(tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "missing.svs")
    (tmp_path / "text.tif").write_text("not an image")
    with pytest.raises(SlideError, match="text.tif: not a slide or image tifffile/OpenSlide can read"):
        open_slide(tmp_path / "text.tif")
    tifffile.imwrite(tmp_path / "nompp.tif", rgb(64, 64), metadata=None)
    with pytest.raises(SlideError, match="no pixel size in the file; give one with --mpp"):
        open_slide(tmp_path / "nompp.tif")
    assert open_slide(tmp_path / "nompp.tif", mpp=0.3).mpp == 0.3
    tifffile.imwrite(tmp_path / "c64.tif", np.zeros((8, 8), np.complex64))
    with pytest.raises(SlideError, match="unsupported pixel type"):
        open_slide(tmp_path / "c64.tif", mpp=1)
    jpeg_tiled(tmp_path / "wide.tif", (512, 600_000))
    with pytest.raises(SlideError, match="absurd dimensions"):
        open_slide(tmp_path / "wide.tif", mpp=1)


def test_truncated_file(tmp_path):
    path = write_ome(tmp_path / "t.ome.tif", pyramid(rgb(512, 512), 2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="t.ome.tif: truncated"):
        open_slide(path)


def test_corrupt_tile_names_level_and_place(tmp_path):
    a = rgb(256, 384)
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, a, tile=(128, 128), compression="zlib", metadata=None)
    with tifffile.TiffFile(path) as tif:
        off = tif.pages[0].dataoffsets[4]  # tile row 1, column 1
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * 64)
    s = open_slide(path, mpp=1)
    assert np.array_equal(s.read(0, 0, 128, 128, 1), a[:128, :128])
    with pytest.raises(SlideError, match=r"tile at level 0 128,128 unreadable"):
        s.read(100, 100, 100, 100, 1)


# ---- reading: consistency, resampling, laziness, pickling -----------------------------------------


def test_read_crop_consistent_and_out_of_bounds(tmp_path):
    levels = pyramid(rgb(300, 330), 2)
    s = open_slide(write_ome(tmp_path / "a.ome.tif", levels, mpp=0.5))
    for mpp in (0.5, 1.0, 0.5 * 1.37, 1.7):  # level mpp, or resampled at awkward scales
        big = s.read(-20, -30, 260, 250, mpp)
        assert np.array_equal(big[41:141, 57:190], s.read(37, 11, 133, 100, mpp))
    out = s.read(320, 290, 40, 40, 0.5)
    assert (out[10:] == 255).all() and (out[:, 10:] == 255).all()
    assert np.array_equal(out[:10, :10], levels[0][290:, 320:])


def test_resampling_picks_level_and_averages(tmp_path):
    levels = [np.full((256 >> i, 256 >> i, 3), v, np.uint8) for i, v in enumerate((200, 100, 50))]
    s = open_slide(write_ome(tmp_path / "p.ome.tif", levels, mpp=1.0))
    assert [s.effective_mpp(m) for m in (2.015, 1.985, 1.97, 2.5)] == [2.0, 2.0, 1.97, 2.5]
    for mpp, value in ((1.5, 200), (1.985, 100), (2.0, 100), (3.0, 100), (4.0, 50), (9.0, 50)):
        assert s.level_for(mpp) == {200: 0, 100: 1, 50: 2}[value]
        assert (s.read(0, 0, 10, 10, mpp) == value).all(), mpp
    a = rgb(64, 96)
    one = open_slide(write_ome(tmp_path / "one.ome.tif", [a], mpp=1.0))
    mean = a.reshape(32, 2, 48, 2, 3).mean((1, 3))
    assert np.array_equal(one.read(0, 0, 48, 32, 2.0), np.rint(mean).astype(np.uint8))
    assert one.thumbnail(4.0).shape == (16, 24, 3)


def test_open_is_lazy_and_reads_only_needed_tiles(tmp_path, monkeypatch):
    path = jpeg_tiled(tmp_path / "big.tif", (20_000, 20_000), resolution=(1e4 / 0.25,) * 2, resolutionunit="CENTIMETER")
    calls = []
    real = tt.os.pread
    monkeypatch.setattr(tt.os, "pread", lambda *a: calls.append(a[2]) or real(*a))
    t = time.perf_counter()
    s = open_slide(path)
    assert time.perf_counter() - t < 2 and not calls and s.mpp == 0.25
    assert s.read(600, 1100, 300, 200, 0.25).shape == (200, 300, 3)
    assert sorted(calls) == sorted(s_off for s_off in _offsets(path, [(2, 1)]))


def _offsets(path, tiles):
    with tifffile.TiffFile(path) as tif:
        p = tif.pages[0]
        n = -(-p.imagewidth // p.tilewidth)
        return [p.dataoffsets[r * n + c] for r, c in tiles]


def _read_in_worker(slide):
    # synchronous: dask's thread pool does not survive a fork (the parent's pool threads are gone)
    return slide.read(50, 60, 70, 80, slide.mpps[1]), slide.levels[1][:40, :30].compute(scheduler="sync")


def test_pickles_by_path_and_reopens_in_worker(tmp_path):
    levels = pyramid(rgb(300, 300), 2)
    s = open_slide(write_ome(tmp_path / "w.ome.tif", levels))
    assert len(pickle.dumps(s)) < 1000
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as ex:
        region, chunk = ex.submit(_read_in_worker, s).result()
    assert np.array_equal(region, levels[1][60:140, 50:120]) and np.array_equal(chunk, levels[1][:40, :30])


# ---- the real SVS ------------------------------------------------------------------------------


def test_real_svs():
    if not SVS.exists():
        pytest.skip(f"../shared/data not present: {SVS} is needed for the real-slide test")
    from histo.segment.tissue import detect_tissue, tissue_fraction

    s = open_slide(SVS)
    assert (s.format, s.kind, s.shape) == ("svs", "brightfield", (2967, 2220))
    assert s.mpp == pytest.approx(0.499) and len(s.levels) >= 1
    ref = tifffile.imread(SVS, key=0)
    assert np.array_equal(s.read(1000, 1500, 300, 200, s.mpp), ref[1500:1700, 1000:1300])
    t = detect_tissue(s)
    assert 1 <= len(t.pieces) and 0.2 < t.mask.mean() < 0.6
    assert tissue_fraction(t, 0, 0, 200, 200) == 0  # top-left corner: glass
