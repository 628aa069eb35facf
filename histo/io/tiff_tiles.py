"""Read TIFF-based slides tile by tile: ``os.pread`` at the page's segment offsets + tifffile's decoders.

tifffile parses the file once (IFDs, OME/SVS metadata); then the file is read with ``os.pread`` on one
raw descriptor (thread- and fork-safe, no seek lock) and only the tiles (or strips, or NDPI MCU rows)
that intersect a rectangle are decoded, with the page's own decode closure (imagecodecs; JPEG tables,
NDPI headers and Aperio's RGB-coded JPEG handled as tifffile does). STACK.md: this scales with threads
and processes where tifffile's zarr store serialises reads.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from histo.errors import SlideError

MAX_SIDE = 500_000
MAX_DECODE_PX = 1 << 28  # px one decode may give: a tile, a strip, a whole PNG / JPEG (768 MiB as RGB)
MAX_SEGMENTS = 1 << 21  # tiles or strips per level (a 200,000² px level in 256-px tiles has 610,000)
MAX_PX_PER_BYTE = 10_000  # a level 0 over MAX_DECODE_PX px needs at least px / this bytes of file (slides: < 10)
PLAUSIBLE_MPP = (0.01, 20.0)  # µm/px; resolution tags outside are DPI defaults, not microscopy
DTYPES = frozenset(np.dtype(t) for t in ("uint8", "uint16", "int16", "uint32", "float32"))
_UM_PER_UNIT = {
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "in": 25400.0,
}
_UM_PER_RESUNIT = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}  # inch, cm, mm, µm


class TileError(SlideError):
    """One tile of a slide cannot be read; ``where`` = its level and px box on that level."""

    def __init__(self, path, level: int, x: int, y: int, w: int, h: int, problem: str):
        self.where = {"level": level, "x_px": x, "y_px": y, "width_px": w, "height_px": h, "problem": problem}
        super().__init__(path, f"tile at level {level} {x},{y} unreadable: {problem}")


_SKIPPED: ContextVar[list | None] = ContextVar("histo_skipped_tiles", default=None)


@contextmanager
def skip_unreadable_tiles():
    """Within this block (this thread or task), a slide tile that cannot be read reads as
    background instead of raising :class:`TileError`; yields the list its ``where`` is added to."""
    skipped: list[dict] = []
    token = _SKIPPED.set(skipped)
    try:
        yield skipped
    finally:
        _SKIPPED.reset(token)


def skipped(exc: TileError) -> bool:
    """True (and ``exc`` recorded) inside :func:`skip_unreadable_tiles`, else False: raise it."""
    found = _SKIPPED.get()
    if found is None:
        return False
    found.append(exc.where)
    return True


@dataclass
class _Level:
    """One pyramid level: ``offsets``/``counts`` (pages, planes, rows, cols) of segments of ``seg`` px."""

    shape: tuple[int, int]
    seg: tuple[int, int]
    offsets: np.ndarray
    counts: np.ndarray
    decode: object
    jpegtables: list[bytes | None]
    jpegheader: bytes | None
    jpeg: bool  # JPEG segments with their own frame header (checked before decoding)


class TiffReader:
    """A tifffile-readable slide: levels of (H, W, ``channels``) ``dtype`` read by :meth:`read`.

    ``channels`` = pages along the C axis × samples per pixel (planes of other axes: the first).
    """

    def __init__(self, path: Path):
        self.path = path
        if (n := _first_segment_count(path)) > MAX_SEGMENTS:  # before tifffile loads n offsets
            raise SlideError(path, f"absurd number of tiles or strips at level 0: {n:,} (at most {MAX_SEGMENTS:,})")
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            self.format = "ome-tiff" if tif.is_ome else "svs" if tif.is_svs else "ndpi" if tif.is_ndpi else "tiff"
            series = tif.series[0]
            levels = list(series.levels)
            if self.format == "tiff" and len(levels) == 1:
                levels += _pyramid_as_series(tif.series)
            key = levels[0].keyframe
            self.dtype = np.dtype(key.dtype) if key.dtype is not None else None
            if self.dtype not in DTYPES:
                raise SlideError(path, f"unsupported pixel type {key.dtype} ({key.bitspersample}-bit)")
            if key.photometric not in (1, 2, 6) or key.imagedepth > 1:  # minisblack, rgb, ycbcr
                raise SlideError(
                    path, f"unsupported TIFF image kind (photometric {int(key.photometric)}, depth {key.imagedepth})"
                )
            self.levels = [self._level(series.axes, lv, key, i) for i, lv in enumerate(levels)]
            self.pages = self.levels[0].offsets.shape[0]  # pages along C
            self.channels = self.pages * key.samplesperpixel
            self.mpp, self.channel_names = _metadata(tif, key)
        end = max(int((lv.offsets + lv.counts).max()) for lv in self.levels)
        size = path.stat().st_size
        if end > size:
            raise SlideError(path, f"truncated: tile data runs to byte {end:,} but the file has {size:,} bytes")
        (h, w), px = self.levels[0].shape, self.levels[0].shape[0] * self.levels[0].shape[1]
        if px > MAX_DECODE_PX and px > size * MAX_PX_PER_BYTE:
            raise SlideError(
                path,
                f"declares {w:,}×{h:,} px in a file of {size:,} bytes: more than "
                f"{MAX_PX_PER_BYTE:,} px per byte, not a slide",
            )
        self.fd = os.open(path, os.O_RDONLY)

    def _level(self, axes: str, level, level0, index: int) -> _Level:
        key = level.keyframe
        h, w = int(key.imagelength), int(key.imagewidth)
        if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
            raise SlideError(self.path, f"absurd dimensions {w}×{h} px at level {index}")
        if key.dtype != self.dtype or key.samplesperpixel != level0.samplesperpixel:
            raise SlideError(self.path, f"level {index} differs in pixel type from level 0")
        other = [(a, n) for a, n in zip(axes, level.shape) if a not in "YXS"]
        pick = np.arange(len(level.pages)).reshape([n for _, n in other] or [1])
        pick = pick[tuple(slice(None) if a == "C" else 0 for a, _ in other)].ravel()
        pages = [level.pages[int(i)] for i in pick]
        if any(p is None for p in pages):
            raise SlideError(self.path, f"truncated or corrupt: pages of level {index} missing")
        seg = (int(key.tilelength), int(key.tilewidth)) if key.is_tiled else (min(int(key.rowsperstrip), h), w)
        grid = (-(-h // seg[0]), -(-w // seg[1]))
        planes = key.samplesperpixel if key.planarconfig == 2 else 1
        n = planes * grid[0] * grid[1]
        kind = "tile" if key.is_tiled else "strip"
        if seg[0] * seg[1] > MAX_DECODE_PX:
            raise SlideError(
                self.path,
                f"absurd {kind} of {seg[1]:,}×{seg[0]:,} px at level {index} (one decode: "
                f"at most {MAX_DECODE_PX:,} px)",
            )
        if n > MAX_SEGMENTS:
            raise SlideError(
                self.path,
                f"absurd number of {kind}s at level {index}: {n:,} of {seg[1]}×{seg[0]} px (at most {MAX_SEGMENTS:,})",
            )
        if any(len(p.dataoffsets) != n or len(p.databytecounts) != n for p in pages):
            raise SlideError(self.path, f"corrupt: level {index} has the wrong number of tiles")
        shape = (len(pages), planes, *grid)
        offsets = np.array([p.dataoffsets for p in pages], np.int64).reshape(shape)
        counts = np.array([p.databytecounts for p in pages], np.int64).reshape(shape)
        return _Level(
            (h, w),
            seg,
            offsets,
            counts,
            key.decode,  # decode: built while the file is open
            [p.jpegtables for p in pages],
            key.jpegheader,
            key.compression == 7 and key.jpegheader is None,
        )

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int, fill: float) -> np.ndarray:
        """Pixels [y0, y1) × [x0, x1) of ``level`` (inside it) as (h, w, channels); empty tiles = ``fill``."""
        lv = self.levels[level]
        (th, tw), planes = lv.seg, lv.offsets.shape[1]
        spp = self.channels // lv.offsets.shape[0] // planes
        out = np.full((y1 - y0, x1 - x0, self.channels), fill, self.dtype)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                ty0, tx0 = ty * th, tx * tw
                ys, xs = slice(max(y0, ty0), min(y1, ty0 + th)), slice(max(x0, tx0), min(x1, tx0 + tw))
                for p in range(lv.offsets.shape[0]):
                    for q in range(planes):
                        try:
                            tile = self._tile(lv, level, p, q, ty, tx)
                        except TileError as exc:
                            if skipped(exc):
                                continue  # this tile stays background
                            raise
                        if tile is None:
                            continue
                        c = (p * planes + q) * spp
                        out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0, c : c + spp] = tile[
                            ys.start - ty0 : ys.stop - ty0, xs.start - tx0 : xs.stop - tx0
                        ]
        return out

    def _tile(self, lv: _Level, level: int, page: int, plane: int, ty: int, tx: int):
        off, n = int(lv.offsets[page, plane, ty, tx]), int(lv.counts[page, plane, ty, tx])
        if off == 0 or n == 0:
            return None
        index = (plane * lv.offsets.shape[2] + ty) * lv.offsets.shape[3] + tx
        spp = self.channels // lv.offsets.shape[0] // lv.offsets.shape[1]
        try:
            data = os.pread(self.fd, n, off)
            if len(data) < n:
                raise ValueError("truncated file")
            frame = jpeg_frame(data) if lv.jpeg else None
            if lv.jpeg and (frame is None or frame[0] > lv.seg[0] or frame[1] > lv.seg[1]):
                raise ValueError(
                    f"JPEG frame header {'missing' if frame is None else f'of {frame[1]}×{frame[0]} px'} "
                    f"in a {lv.seg[1]}×{lv.seg[0]} px tile"
                )
            tile = lv.decode(data, index, jpegtables=lv.jpegtables[page], jpegheader=lv.jpegheader, _fullsize=True)[0]
            tile = tile.reshape(tile.shape[-3], tile.shape[-2], -1)
            if tile.shape[0] < lv.seg[0] or tile.shape[1] < lv.seg[1] or tile.shape[2] != spp:
                raise ValueError(
                    f"decodes to {tile.shape[0]}×{tile.shape[1]} px × {tile.shape[2]} samples, "
                    f"not {lv.seg[0]}×{lv.seg[1]} × {spp}"
                )
        except Exception as exc:  # a read or codec error: this tile's bytes are bad
            raise TileError(
                self.path, level, tx * lv.seg[1], ty * lv.seg[0], lv.seg[1], lv.seg[0], str(exc) or type(exc).__name__
            ) from None
        return tile

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def _first_segment_count(path: Path) -> int:
    """The number of tiles or strips that the first IFD of a TIFF / BigTIFF declares (the count of its
    offsets tag), read from the IFD entry itself; 0 where the file is too short to say."""
    with open(path, "rb") as f:
        head = f.read(16)
        order = "<" if head[:2] == b"II" else ">"
        big = head[2:4] in (b"\x2b\x00", b"\x00\x2b")
        word, entry, counter = ("Q", 20, "Q") if big else ("I", 12, "H")
        if len(head) < 16:
            return 0
        f.seek(struct.unpack(order + word, head[8:16] if big else head[4:8])[0])
        raw = f.read(struct.calcsize(counter))
        n = struct.unpack(order + counter, raw)[0] if len(raw) == struct.calcsize(counter) else 0
        entries = f.read(min(n, 4096) * entry)
    for i in range(0, len(entries) - entry + 1, entry):
        if struct.unpack(order + "H", entries[i : i + 2])[0] in (273, 324):  # StripOffsets, TileOffsets
            return struct.unpack(order + word, entries[i + 4 : i + 4 + struct.calcsize(word)])[0]
    return 0


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) of a JPEG's start-of-frame header, looked for as libjpeg does (bytes
    before a marker skipped), without decoding; None when there is none before the scan data."""
    i, n = 2, len(data)
    while (i := data.find(b"\xff", i)) >= 0:
        while i < n and data[i] == 0xFF:
            i += 1
        if i + 2 >= n:
            return None
        marker, i = data[i], i + 1
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:  # stuffed byte, markers without a length
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (
                (int.from_bytes(data[i + 3 : i + 5], "big"), int.from_bytes(data[i + 5 : i + 7], "big"), data[i + 7])
                if i + 8 <= n
                else None
            )
        i += int.from_bytes(data[i : i + 2], "big")
    return None


@contextmanager
def _quiet_tifffile():
    """tifffile logs what it skips in damaged files; the SlideError raised here says it in one line."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _pyramid_as_series(series: list) -> list:
    """Levels written as plain pages (no SubIFDs, no 'reduced' flag): later tiled series of the same
    layout whose sides shrink by one common factor."""
    first, out = series[0], []
    h0, w0 = first.levels[0].keyframe.imagelength, first.levels[0].keyframe.imagewidth
    for s in series[1:]:
        k, prev = s.levels[0].keyframe, (out[-1] if out else first.levels[0]).keyframe
        fy, fx = h0 / k.imagelength, w0 / k.imagewidth
        if (
            s.axes != first.axes
            or s.dtype != first.dtype
            or not k.is_tiled
            or k.imagewidth >= prev.imagewidth
            or k.imagelength >= prev.imagelength
            or abs(fy - fx) > 0.01 * fx + fx / min(k.imagelength, k.imagewidth)
        ):
            break
        out.append(s.levels[0])
    return out


def _metadata(tif: tifffile.TiffFile, key) -> tuple[float | None, list[str]]:
    """Level-0 µm/px (None if absent or implausible) and channel names from OME, SVS, TIFF tags."""
    names: list[str] = []
    if tif.is_ome:
        pixels = next((e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("}Pixels")), None)
        if pixels is not None:
            names = [c.get("Name", "") for c in pixels if c.tag.endswith("}Channel")]
            size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
            if size and unit in _UM_PER_UNIT and float(size) > 0:
                return float(size) * _UM_PER_UNIT[unit], names
    if tif.is_svs:
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", key.description)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)), names
    xres = key.resolution[0] if 282 in key.tags else 0.0
    unit = (
        _UM_PER_UNIT.get(tif.imagej_metadata.get("unit"))
        if tif.is_imagej
        else _UM_PER_RESUNIT.get(key.tags.valueof(296))
    )
    if not unit or xres <= 0:
        return None, names
    mpp = unit / xres
    return (mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None), names
