"""Star-shaped blobs: the outline of every structure (tissue piece, follicle, aggregate), in µm.

A blob is an ellipse (centre, semi-axes, rotation) whose normalised radius is modulated by a few
Fourier harmonics, optionally cut by a straight line (the knife / needle edge of a biopsy). Depth
tests are vectorised and approximate the distance to the outline along the ray from the centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import Polygon


@dataclass(frozen=True)
class Blob:
    """Outline in µm: centre (cx, cy), semi-axes (ax, ay), rotation ``rot`` (rad), harmonics.

    ``harm`` rows are (k, amplitude, phase): r(θ) = 1 + Σ a·cos(kθ + φ) in the ellipse frame.
    ``cut`` = (nx, ny, c): the piece keeps points with nx·x + ny·y ≤ c (a straight cut edge).
    """

    cx: float
    cy: float
    ax: float
    ay: float
    rot: float = 0.0
    harm: tuple = ()
    cut: tuple | None = None
    _h: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        h = np.asarray(self.harm, np.float64).reshape(-1, 3)
        object.__setattr__(self, "_h", h)

    @property
    def rmax(self) -> float:
        """Radius (µm) of a circle around the centre holding the whole blob."""
        return max(self.ax, self.ay) * (1.0 + float(np.abs(self._h[:, 1]).sum()))

    def bbox(self) -> tuple[float, float, float, float]:
        r = self.rmax
        return self.cx - r, self.cy - r, self.cx + r, self.cy + r

    def _local(self, x, y):
        dx = np.asarray(x, np.float64) - self.cx
        dy = np.asarray(y, np.float64) - self.cy
        c, s = np.cos(self.rot), np.sin(self.rot)
        u = (dx * c + dy * s) / self.ax
        v = (-dx * s + dy * c) / self.ay
        return u, v

    def radius_n(self, theta):
        """Normalised outline radius at ellipse-frame angle θ."""
        theta = np.asarray(theta, np.float64)
        return self._radius_cs(np.cos(theta), np.sin(theta))

    def _radius_cs(self, c1, s1):
        """Normalised outline radius from cos θ and sin θ (harmonics by recurrence)."""
        r = np.ones_like(c1)
        if len(self._h) == 0:
            return r
        kmax = int(self._h[:, 0].max())
        amp = {int(k): (a * np.cos(p), a * np.sin(p)) for k, a, p in self._h}
        ck, sk = c1, s1
        for k in range(2, kmax + 1):
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
            if k in amp:
                ca, sa = amp[k]
                r = r + ca * ck - sa * sk  # a·cos(kθ + φ)
        return r

    def angle(self, x, y):
        """Ellipse-frame polar angle (rad) of points."""
        u, v = self._local(x, y)
        return np.arctan2(v, u)

    def surface_depth(self, x, y):
        """Approximate depth (µm) below the curved outline: > 0 inside, < 0 outside."""
        u, v = self._local(x, y)
        rho = np.hypot(u, v)
        inv = 1.0 / np.maximum(rho, 1e-12)
        c, s = np.where(rho > 0, u * inv, 1.0), v * inv
        scale = np.hypot(self.ax * c, self.ay * s)
        return (self._radius_cs(c, s) - rho) * scale

    def cut_depth(self, x, y):
        """Distance (µm) inside the straight cut edge (+inf without a cut)."""
        if self.cut is None:
            return np.full(np.broadcast(np.asarray(x), np.asarray(y)).shape, np.inf)
        nx, ny, c = self.cut
        return c - (nx * np.asarray(x, np.float64) + ny * np.asarray(y, np.float64))

    def depth(self, x, y):
        """Depth (µm) inside the piece: min of the outline and cut-edge depths."""
        d = self.surface_depth(x, y)
        if self.cut is not None:
            d = np.minimum(d, self.cut_depth(x, y))
        return d

    def outline(self, n: int = 256) -> np.ndarray:
        """(n, 2) µm points of the curved outline (before the cut)."""
        th = np.linspace(0, 2 * np.pi, n, endpoint=False)
        r = self.radius_n(th)
        u, v = r * np.cos(th) * self.ax, r * np.sin(th) * self.ay
        c, s = np.cos(self.rot), np.sin(self.rot)
        return np.stack([self.cx + u * c - v * s, self.cy + u * s + v * c], 1)

    def polygon(self, n: int = 256) -> Polygon:
        """Shapely polygon in µm (cut applied)."""
        p = shapely.make_valid(Polygon(self.outline(n)))
        if self.cut is not None:
            nx, ny, c = self.cut
            r = 4 * self.rmax
            # half-plane nx*x+ny*y <= c as a big rectangle
            px, py = nx * c, ny * c  # foot of the cut line (cut normal is unit length)
            tx, ty = -ny, nx
            half = Polygon(
                [
                    (px + tx * r, py + ty * r),
                    (px - tx * r, py - ty * r),
                    (px - tx * r - nx * r, py - ty * r - ny * r),
                    (px + tx * r - nx * r, py + ty * r - ny * r),
                ]
            )
            p = p.intersection(half)
        if p.geom_type != "Polygon":  # keep the largest part
            parts = [g for g in getattr(p, "geoms", [p]) if g.geom_type == "Polygon"]
            p = max(parts, key=lambda g: g.area)
        return shapely.set_precision(p, 0.01)


def random_blob(rng: np.random.Generator, cx, cy, r, aspect=1.0, rot=None, rough=0.05, kmax=6) -> Blob:
    """A blob of mean radius ``r`` µm with axis ratio ``aspect`` and harmonic roughness ``rough``."""
    ax = r * np.sqrt(aspect)
    ay = r / np.sqrt(aspect)
    if rot is None:
        rot = rng.uniform(0, np.pi)
    harm = []
    for k in range(2, kmax + 1):
        harm.append((k, rng.normal(0, rough / k**0.8), rng.uniform(0, 2 * np.pi)))
    return Blob(float(cx), float(cy), float(ax), float(ay), float(rot), tuple(map(tuple, harm)))
