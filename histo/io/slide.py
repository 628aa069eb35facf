"""Open whole-slide images lazily and read rectangles at any µm/px.

Formats: OME-TIFF, Aperio SVS, Hamamatsu NDPI, generic tiled or plain TIFF (through tifffile and
:mod:`histo.io.tiff_tiles`), PNG/JPEG (decoded whole, one level), and whatever else OpenSlide opens
(MIRAX, VMS, ...). Coordinates: x = column, y = row; a virtual grid at ``mpp`` µm/px covers the whole
slide, grid pixel i spanning level-0 µm [i·mpp, (i+1)·mpp).
"""

from __future__ import annotations

import errno
import math
import numbers
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize
from scipy import sparse

from histo.errors import SlideError
from histo.io.tiff_tiles import (
    DTYPES,
    MAX_DECODE_PX,
    PLAUSIBLE_MPP,
    TiffReader,
    TileError,
    jpeg_frame,
    skip_unreadable_tiles,
    skipped,
)

__all__ = ["Slide", "check_stain", "open_slide", "skip_unreadable_tiles"]

_TOL = 0.01  # a level serves a request whose µm/px is within 1 % of its own, as is
_BLOCK = 2048  # resampling works on windows of at most about this many level px per side
_READERS: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


@dataclass(eq=False)
class Slide:
    """A lazily read slide. Pickles as its path (a worker reopens the file, cached per process).

    ``levels``: dask arrays (H, W, C) channels-last, finest first; ``downsamples`` relative to level 0;
    ``mpp``: level-0 µm/px; ``shape``: level-0 (H, W) px; ``kind``: ``"brightfield"`` (RGB uint8;
    RGBA loses alpha, 8-bit grayscale is replicated to RGB) or ``"fluorescence"`` (all channels, own
    dtype: 16-bit or multichannel); ``format``: e.g. ``"svs"``, ``"ome-tiff"``, ``"openslide-mirax"``.
    """

    path: Path
    mpp: float
    levels: list[da.Array]
    downsamples: list[float]
    shape: tuple[int, int]
    kind: str
    channel_names: list[str]
    format: str
    _backend: str = field(repr=False)

    @property
    def background(self) -> int:
        """Fill value outside the slide: white glass (255) for brightfield, 0 for fluorescence."""
        return 255 if self.kind == "brightfield" else 0

    @property
    def mpps(self) -> list[float]:
        """µm/px of each level."""
        return [self.mpp * d for d in self.downsamples]

    def level_for(self, mpp: float) -> int:
        """The coarsest level whose µm/px is at most ``mpp``·1.01 (level 0 if none): never upsampled."""
        ok = [i for i, m in enumerate(self.mpps) if m <= mpp * (1 + _TOL)]
        return max(ok, key=lambda i: self.mpps[i]) if ok else 0

    def effective_mpp(self, mpp: float) -> float:
        """The µm/px that :meth:`read` delivers for ``mpp``: its level's own when within 1 %, else
        ``mpp``. Lay tile grids and convert their px to µm with this value, or µm drift by up to 1 %."""
        level_mpp = self.mpps[self.level_for(mpp)]
        return level_mpp if abs(mpp / level_mpp - 1) <= _TOL else mpp

    def read(self, x: int, y: int, w: int, h: int, mpp: float) -> np.ndarray:
        """Pixels (h, w, C) of the rectangle at (x, y) of size (w, h) on the grid at ``mpp`` µm/px.

        Reads only the tiles it needs from :meth:`level_for`'s level, as is when its µm/px is within 1 %
        (see :meth:`effective_mpp`), else area-averaged (exact box footprints, dtype kept). Outside the slide:
        :attr:`background`. Reads are crop-consistent: a sub-rectangle read directly equals the crop
        of a larger read (bit for bit, resampled or not).
        """
        if not (mpp > 0 and w >= 0 and h >= 0):
            raise ValueError(f"bad read request: w={w} h={h} mpp={mpp}")
        level = self.level_for(mpp)
        reader = _reader(self.path, self._backend)
        s = self.effective_mpp(mpp) / self.mpps[level]  # level px per output px
        if s == 1:
            return reader.region(level, int(y), int(x), int(h), int(w), self.background)
        out = np.empty((h, w, self.levels[0].shape[2]), self.levels[0].dtype)
        step = max(64, int(_BLOCK / s))
        for by in range(0, h, step):
            for bx in range(0, w, step):
                bh, bw = min(step, h - by), min(step, w - bx)
                out[by : by + bh, bx : bx + bw] = _resampled(
                    reader, level, y + by, x + bx, bh, bw, s, self.background, out.dtype
                )
        return out

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px (from the coarsest adequate level), (H, W, C)."""
        h, w = (math.ceil(n * self.mpp / mpp) for n in self.shape)
        return self.read(0, 0, w, h, mpp)

    def __reduce__(self):
        return _reopen, (str(self.path), self.mpp, self._backend)


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide lazily (reads metadata, no pixels).

    Parameters
    ----------
    path : str or Path
        OME-TIFF, Aperio SVS, Hamamatsu NDPI, generic tiled TIFF, plain TIFF/PNG crop, or any format
        OpenSlide reads.
    mpp : float, optional
        Level-0 pixel size, µm/px; overrides the file's (needed when the file has none).

    Returns
    -------
    Slide
        Its levels, shape (px), pixel size (µm/px) and channels; pixels are read on demand.

    Raises
    ------
    SlideError
        A missing, unreadable, truncated or absurd file, an unsupported pixel type, or neither the
        file nor ``mpp`` giving a plausible pixel size (0.01–20 µm/px).
    """
    _check_regular_file(path)
    path = Path(path).absolute()
    if mpp is not None and not _plausible(mpp):
        raise SlideError(path, f"pixel size must be {PLAUSIBLE_MPP[0]}–{PLAUSIBLE_MPP[1]} µm/px, not {mpp}")
    reader = _open_any(path)
    with _LOCK:
        _remember(reader)
    return _slide(path, reader, mpp)


def _check_regular_file(path: str | Path) -> None:
    """SlideError unless ``path`` is a regular file (through symlinks): a FIFO would block the first read
    forever, a device or folder is no slide."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SlideError(path, "file not found") from None
    except OSError as exc:
        problem = "symbolic link loop" if exc.errno == errno.ELOOP else exc.strerror
        raise SlideError(path, f"cannot open: {problem}") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
        )
        raise SlideError(path, f"not a slide: {kind}, not a regular file")


def check_stain(slide: Slide, stain: str, workflow: str) -> None:
    """A brightfield workflow (``stain`` ``he`` or ``ihc``; ``workflow`` its name, for the message)
    needs an 8-bit RGB slide (8-bit gray and RGBA are made RGB): a 16-bit, float or multichannel one is
    a SlideError."""
    if stain != "if" and slide.kind != "brightfield":
        raise SlideError(
            slide.path,
            f"{slide.levels[0].dtype} image with {slide.levels[0].shape[2]} channel(s) is not "
            f"8-bit RGB, which the workflow '{workflow}' (stain {stain}) needs",
        )


def _reopen(path: str, mpp: float, backend: str) -> Slide:
    return _slide(Path(path), _reader(Path(path), backend), mpp)


def _plausible(mpp) -> bool:
    return isinstance(mpp, numbers.Real) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def _slide(path: Path, reader, mpp: float | None) -> Slide:
    if mpp is None:
        mpp = reader.mpp
        if not mpp:
            raise SlideError(path, "no pixel size in the file; give one with --mpp")
        if not _plausible(mpp):
            raise SlideError(
                path,
                f"implausible pixel size in the file ({mpp:g} µm/px, expected "
                f"{PLAUSIBLE_MPP[0]}–{PLAUSIBLE_MPP[1]}); give the right one with --mpp",
            )
    bf, channels = reader.brightfield, reader.out_channels
    names = (
        reader.channel_names
        if len(reader.channel_names) == channels
        else (["R", "G", "B"] if bf else [f"ch{i}" for i in range(channels)])
    )
    h0, w0 = reader.shapes[0]
    token = tokenize(str(path), path.stat().st_mtime_ns, reader.backend)
    levels = [
        da.from_array(
            _LevelArray(reader, i),
            chunks=_chunks(reader.chunks[i]),
            name=f"slide-{i}-{token}",
            meta=np.empty((0, 0, 0), reader.dtype),
            asarray=False,
            lock=False,
        )
        for i in range(len(reader.shapes))
    ]
    downsamples = [(h0 / h + w0 / w) / 2 for h, w in reader.shapes]
    return Slide(
        path,
        float(mpp),
        levels,
        downsamples,
        (h0, w0),
        "brightfield" if bf else "fluorescence",
        names,
        reader.format,
        reader.backend,
    )


def _to_rgb(a: np.ndarray) -> np.ndarray:
    """8-bit RGB from gray (replicated), gray+alpha, RGB or RGBA (alpha dropped)."""
    return np.repeat(a[..., :1], 3, axis=2) if a.shape[2] < 3 else a[..., :3]


def _chunks(tile: tuple[int, int]) -> tuple[int, int, int]:
    return (tile[0] * max(1, round(2048 / tile[0])), tile[1] * max(1, round(2048 / tile[1])), -1)


class _LevelArray:
    """Array-like view of one level for :func:`dask.array.from_array`; pickles as (path, backend, level)."""

    def __init__(self, reader, level: int):
        self.reader, self.level = reader, level
        self.shape = (*reader.shapes[level], reader.out_channels)
        self.dtype, self.ndim = reader.dtype, 3

    def __getitem__(self, key):
        ys, xs, cs = (key + (slice(None),) * 3)[:3]
        (y0, y1, _), (x0, x1, _) = ys.indices(self.shape[0]), xs.indices(self.shape[1])
        fill = 255 if self.reader.brightfield else 0
        return self.reader.region(self.level, y0, x0, y1 - y0, x1 - x0, fill)[:, :, cs]

    def __reduce__(self):
        return _level_array, (str(self.reader.path), self.reader.backend, self.level)


def _level_array(path: str, backend: str, level: int) -> _LevelArray:
    return _LevelArray(_reader(Path(path), backend), level)


def _resampled(reader, level, y, x, h, w, s, fill, dtype) -> np.ndarray:
    """Area-averaged output block: output px i covers level px [i·s, (i+1)·s) in absolute coordinates,
    so every output px gets the same weights, summed in the same order, whatever block it is read in."""
    my, y0 = _box_matrix(y, h, s)
    mx, x0 = _box_matrix(x, w, s)
    win = reader.region(level, y0, x0, my.shape[1], mx.shape[1], fill)
    H, W, C = win.shape
    rows = (my @ win.reshape(H, W * C).astype(np.float32)).reshape(h, W, C)
    out = (mx @ rows.transpose(1, 0, 2).reshape(W, h * C)).reshape(w, h, C).transpose(1, 0, 2)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(dtype)


def _box_matrix(start: int, n: int, s: float) -> tuple[sparse.csr_matrix, int]:
    """Weights (n × inputs) of output px start..start+n-1 at scale ``s``, and the first input px."""
    a = (start + np.arange(n, dtype=np.float64)) * s
    j = np.floor(a).astype(np.int64)[:, None] + np.arange(math.ceil(s) + 1)
    wgt = np.clip(np.minimum(a[:, None] + s, j + 1) - np.maximum(a[:, None], j), 0, None) / s
    keep = wgt > 0
    rows = np.broadcast_to(np.arange(n)[:, None], j.shape)[keep]
    j0 = int(j[0, 0])
    cols = j[keep] - j0
    return sparse.csr_matrix((wgt[keep].astype(np.float32), (rows, cols)), shape=(n, int(cols.max()) + 1)), j0


# ---- readers: one per (path, backend) per process -------------------------------------------------


class _Region:
    """Mixin: ``region`` = any rectangle of a level, outside parts filled, 8-bit made RGB.

    A reader has ``path, format, mpp, dtype, channels`` (raw), ``pages`` (channel pages), ``shapes``
    and ``chunks`` (tile sizes) per level, ``channel_names`` and ``read(level, y0, y1, x0, x1, fill)``.
    """

    pages = 1

    @property
    def brightfield(self) -> bool:
        """8-bit with 1-4 samples in one page: gray, gray+alpha, RGB, RGBA."""
        return self.dtype == np.uint8 and self.pages == 1 and self.channels <= 4

    @property
    def out_channels(self) -> int:
        return 3 if self.brightfield else self.channels

    def region(self, level: int, y: int, x: int, h: int, w: int, fill: float) -> np.ndarray:
        """Level px [y, y+h) × [x, x+w), (h, w, out_channels), ``fill`` outside the level and for
        non-finite values."""
        H, W = self.shapes[level]
        y0, y1, x0, x1 = max(y, 0), min(y + h, H), max(x, 0), min(x + w, W)
        if y0 >= y1 or x0 >= x1:
            out = np.full((h, w, self.channels), fill, self.dtype)
        elif (y0, y1, x0, x1) == (y, y + h, x, x + w):
            out = self.read(level, y0, y1, x0, x1, fill)
        else:
            out = np.full((h, w, self.channels), fill, self.dtype)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.read(level, y0, y1, x0, x1, fill)
        if out.dtype.kind == "f":  # NaN / inf in a float slide: no signal (an all-NaN slide is glass)
            np.nan_to_num(out, copy=False, nan=fill, posinf=fill, neginf=fill)
        return _to_rgb(out) if self.brightfield else out


class _Tiff(_Region, TiffReader):
    backend = "tifffile"

    def __init__(self, path: Path):
        super().__init__(path)
        self.shapes = [lv.shape for lv in self.levels]
        self.chunks = [lv.seg for lv in self.levels]


class _Image(_Region):
    """PNG / JPEG: decoded whole on open (one level)."""

    backend = "image"

    def __init__(self, path: Path):
        import imagecodecs

        data = path.read_bytes()
        format = "png" if data.startswith(b"\x89PNG") else "jpeg"
        h, w = _image_size(path, data, format)
        if h * w > MAX_DECODE_PX:
            raise SlideError(
                path,
                f"absurd dimensions {w}×{h} px for a {format} image (decoded whole: "
                f"at most {MAX_DECODE_PX:,} px; tile it as a pyramidal TIFF)",
            )
        try:
            a = imagecodecs.png_decode(data) if format == "png" else imagecodecs.jpeg_decode(data)
        except Exception as exc:
            raise SlideError(path, f"corrupt {format} image: {exc}") from None
        if a.ndim not in (2, 3) or a.dtype not in DTYPES or a.shape[:2] != (h, w):
            raise SlideError(path, f"unsupported image: {a.dtype} {a.shape}")
        self.path, self.format, self.mpp, self.channel_names = path, format, None, []
        self.data = a[:, :, None] if a.ndim == 2 else a
        self.dtype, self.channels = self.data.dtype, self.data.shape[2]
        self.shapes, self.chunks = [self.data.shape[:2]], [(512, 512)]

    def read(self, level, y0, y1, x0, x1, fill):
        return self.data[y0:y1, x0:x1].copy()


class _OpenSlide(_Region):
    """Everything else OpenSlide opens (8-bit RGBA composited on white)."""

    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        self.path, self.osr = path, openslide.OpenSlide(path)
        props = self.osr.properties
        self.format = f"openslide-{props.get('openslide.vendor', 'unknown')}"
        self.mpp = float(props["openslide.mpp-x"]) if props.get("openslide.mpp-x") else None
        self.dtype, self.channels, self.channel_names = np.dtype(np.uint8), 4, []
        self.shapes = [(h, w) for w, h in self.osr.level_dimensions]
        self.chunks = [
            (
                int(props.get(f"openslide.level[{i}].tile-height", 512)),
                int(props.get(f"openslide.level[{i}].tile-width", 512)),
            )
            for i in range(len(self.shapes))
        ]
        self.downsamples = self.osr.level_downsamples

    def read(self, level, y0, y1, x0, x1, fill):
        ds = self.downsamples[level]
        try:
            img = self.osr.read_region((round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0))
        except Exception as exc:
            error = TileError(self.path, level, x0, y0, x1 - x0, y1 - y0, str(exc))
            if skipped(error):
                return np.full((y1 - y0, x1 - x0, 4), fill, np.uint8)
            raise error from None
        a = np.asarray(img).copy()
        a[a[..., 3] == 0] = 255  # no data (transparent) is glass
        return a


def _image_size(path: Path, data: bytes, format: str) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR or a JPEG's frame header (as the decoder finds it), without
    decoding; SlideError without one, or for a JPEG that is not gray or RGB (CMYK: no colour profile
    here to make it RGB)."""
    if format == "png":
        if data[12:16] != b"IHDR" or len(data) < 24:
            raise SlideError(path, "corrupt png image: no IHDR header")
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    frame = jpeg_frame(data)
    if frame is None:
        raise SlideError(path, "corrupt jpeg image: no frame header before the image data")
    if frame[2] not in (1, 3):
        kind = "CMYK or YCCK" if frame[2] == 4 else "not gray or RGB"
        raise SlideError(
            path,
            f"unsupported jpeg colour space: {frame[2]} components ({kind}); convert it to RGB "
            "first (e.g. in QuPath or ImageMagick)",
        )
    return frame[0], frame[1]


def _open_any(path: Path):
    """tifffile first, then PNG/JPEG by magic bytes, then OpenSlide."""
    with open(path, "rb") as f:
        head = f.read(4)
    is_tiff = head[:2] in (b"II", b"MM")
    try:
        if is_tiff:
            return _Tiff(path)
        if head.startswith((b"\x89PNG", b"\xff\xd8\xff")):
            return _Image(path)
    except SlideError:
        raise
    except Exception as exc:
        tiff_problem = f"truncated or corrupt TIFF ({exc})"
    else:
        tiff_problem = None
    try:
        return _OpenSlide(path)
    except Exception:
        raise SlideError(path, tiff_problem or "not a slide or image tifffile/OpenSlide can read") from None


def _reader(path: Path, backend: str):
    """This process's reader for (path, backend), opened on first use (e.g. in a worker)."""
    key = (str(path), backend)
    with _LOCK:
        reader = _READERS.get(key)
        if reader is None or reader.pid != os.getpid():
            reader = {"tifffile": _Tiff, "image": _Image, "openslide": _OpenSlide}[backend](path)
            _remember(reader)
    return reader


def _remember(reader) -> None:
    reader.pid = os.getpid()
    _READERS[(str(reader.path), reader.backend)] = reader
