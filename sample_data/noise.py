"""Deterministic procedural noise on a global lattice (positions in µm).

Every value is a pure function of the global position and a seed, so two overlapping regions
render the same pixels wherever they are cut. Grid functions take the pixel-centre coordinates of
one axis each (1-D arrays, µm) and interpolate separably, which is cheap.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint32(0x27D4EB2D)
_M2 = np.uint32(0x165667B1)
_M3 = np.uint32(0x2C1B3C6D)
_M4 = np.uint32(0x297A2D39)


def hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Uniform float32 in [0, 1) from integer lattice coordinates and a seed (integer hash)."""
    s = np.uint32((int(seed) * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        h = (np.asarray(ix).astype(np.uint32) * _M1) ^ (np.asarray(iy).astype(np.uint32) * _M2) ^ s
        h ^= h >> np.uint32(15)
        h *= _M3
        h ^= h >> np.uint32(12)
        h *= _M4
        h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def hash_id(ids: np.ndarray, k: int) -> np.ndarray:
    """Uniform float32 in [0, 1): the k-th random attribute of the objects with these ids."""
    return hash01(ids, np.full_like(ids, k), 0x5EED + k)


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _axis(c: np.ndarray, cell: float):
    g = c / cell
    i = np.floor(g)
    f = _smooth((g - i).astype(np.float32))
    i = i.astype(np.int64)
    return i, f


def grid_noise(x: np.ndarray, y: np.ndarray, cell: float, seed: int, cell_y: float | None = None):
    """Value noise in [0, 1) on the grid y × x (1-D µm coordinates), lattice spacing ``cell`` µm.

    ``cell_y`` makes it anisotropic (stretched along y when larger than ``cell``).
    """
    ix, fx = _axis(np.asarray(x, np.float64), cell)
    iy, fy = _axis(np.asarray(y, np.float64), cell if cell_y is None else cell_y)
    x0, y0 = ix.min(), iy.min()
    lx = np.arange(x0, ix.max() + 2)
    ly = np.arange(y0, iy.max() + 2)
    v = hash01(lx[None, :], ly[:, None], seed)  # (ny, nx)
    jx = ix - x0
    rows = v[:, jx] * (1 - fx) + v[:, jx + 1] * fx  # (ny, w)
    jy = iy - y0
    return rows[jy] * (1 - fy)[:, None] + rows[jy + 1] * fy[:, None]


def fbm(x, y, cell: float, seed: int, octaves: int = 3, gain: float = 0.5):
    """Fractal sum of ``grid_noise`` octaves, normalised to about [0, 1)."""
    out = 0.0
    amp, tot = 1.0, 0.0
    for o in range(octaves):
        out = out + amp * grid_noise(x, y, cell / (2**o), seed + 101 * o)
        tot += amp
        amp *= gain
    return out / tot


def point_noise(px: np.ndarray, py: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Value noise in [0, 1) at scattered points (arrays of any equal shape, µm)."""
    gx = np.asarray(px, np.float64) / cell
    gy = np.asarray(py, np.float64) / cell
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = _smooth((gx - ix).astype(np.float32)), _smooth((gy - iy).astype(np.float32))
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    a = hash01(ix, iy, seed)
    b = hash01(ix + 1, iy, seed)
    c = hash01(ix, iy + 1, seed)
    d = hash01(ix + 1, iy + 1, seed)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def pixel_noise(x0: int, y0: int, h: int, w: int, seed: int) -> np.ndarray:
    """White noise in [0, 1) keyed to global pixel indices (x0, y0 = top-left pixel)."""
    return hash01(np.arange(x0, x0 + w)[None, :], np.arange(y0, y0 + h)[:, None], seed)


def upsample_grid(f: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of lattice values ``f`` (ny, nx) at fractional lattice coords.

    ``gx`` (w,) and ``gy`` (h,) are positions in lattice units relative to f[0, 0].
    """
    ix = np.clip(np.floor(gx).astype(np.int64), 0, f.shape[1] - 2)
    fx = (gx - ix).astype(np.float32)
    iy = np.clip(np.floor(gy).astype(np.int64), 0, f.shape[0] - 2)
    fy = (gy - iy).astype(np.float32)
    rows = f[:, ix] * (1 - fx) + f[:, ix + 1] * fx
    return rows[iy] * (1 - fy)[:, None] + rows[iy + 1] * fy[:, None]
