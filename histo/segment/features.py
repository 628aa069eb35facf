"""Nucleus features from StarDist polygons and the tile's pixels, vectorised over nuclei.

``coord`` is StarDist's ``details['coord']``: (n, 2, n_rays) polygon vertices as (y, x) rows in
px of the tile's read box, where pixel (r, c) has its centre at (r, c). Shape features come from
the polygon itself (exact moments, no rasterising); stain features average the pixels whose
centre lies inside the polygon (the ``skimage.draw.polygon`` rule), each nucleus over its own
polygon (a pixel where two polygons overlap counts for both). Lengths are µm; optical densities
(OD) are decadic, OD = −log10(I / 255), unmixed with the Ruifrok & Johnston 2001 stain vectors.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import shapely
from skimage.color import hed_from_rgb

STAINS = ("he", "ihc", "if")
# OD of each uint8 level: I = 0 is taken as 1 (OD 2.41) to stay finite
_OD_LUT = -np.log10(np.maximum(np.arange(256), 1) / 255.0)
# OD (R, G, B) @ this = concentrations (H, E, DAB) in OD units (skimage.color.rgb2hed's matrix;
# rgb2hed itself rescales by 1/ln(1e-6) and clips, so it is not used for the numbers)
_UNMIX = np.asarray(hed_from_rgb, dtype=np.float64)


def feature_columns(stain: str, channel_names=None) -> list[str]:
    """Names of the columns :func:`nucleus_features` returns for ``stain``, in order."""
    shape = ["perimeter_um", "eccentricity", "solidity", "major_axis_um", "minor_axis_um", "circularity"]
    if stain == "he":
        return shape + ["hematoxylin_od", "eosin_od", "od_total", "hematoxylin_od_std"]
    if stain == "ihc":
        return shape + ["hematoxylin_od", "dab_od"]
    if stain == "if":
        if channel_names is None:
            raise ValueError("stain 'if' needs channel_names (one name per image channel)")
        return shape + [f"mean_{c}" for c in channel_names]
    raise ValueError(f"unknown stain {stain!r}: expected one of {', '.join(STAINS)}")


def shape_features(coord: np.ndarray, mpp: float) -> pd.DataFrame:
    """Perimeter, eccentricity, solidity, axes and circularity of each polygon.

    Axes follow ``skimage.measure.regionprops``: 4·sqrt(eigenvalue) of the region's covariance,
    here computed exactly from the polygon's second moments (Green's theorem). ``solidity`` =
    area / convex-hull area; ``circularity`` = 4πA/P² (1 for a disc). Lengths in µm; degenerate
    polygons (zero area) give NaN.
    """
    coord = np.asarray(coord, dtype=np.float64)
    y = coord[:, 0] - coord[:, 0].mean(axis=1, keepdims=True)  # centred: moments stay accurate
    x = coord[:, 1] - coord[:, 1].mean(axis=1, keepdims=True)
    x1, y1 = np.roll(x, -1, axis=1), np.roll(y, -1, axis=1)
    cross = x * y1 - x1 * y
    with np.errstate(invalid="ignore", divide="ignore"):
        a2 = cross.sum(axis=1)  # 2 × signed area
        cx = ((x + x1) * cross).sum(axis=1) / (3 * a2)
        cy = ((y + y1) * cross).sum(axis=1) / (3 * a2)
        mxx = ((x * x + x * x1 + x1 * x1) * cross).sum(axis=1) / (6 * a2) - cx * cx
        myy = ((y * y + y * y1 + y1 * y1) * cross).sum(axis=1) / (6 * a2) - cy * cy
        mxy = ((2 * x * y + x * y1 + x1 * y + 2 * x1 * y1) * cross).sum(axis=1) / (12 * a2) - cx * cy
        half = np.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
        l1 = np.maximum((mxx + myy) / 2 + half, 0)
        l2 = np.maximum((mxx + myy) / 2 - half, 0)
        area = np.abs(a2) / 2
        perimeter = np.hypot(x1 - x, y1 - y).sum(axis=1)
        hull = shapely.area(shapely.convex_hull(shapely.polygons(np.stack([coord[:, 1], coord[:, 0]], axis=-1))))
        columns = {
            "perimeter_um": perimeter * mpp,
            "eccentricity": np.sqrt(1 - l2 / l1),
            "solidity": area / hull,
            "major_axis_um": 4 * np.sqrt(l1) * mpp,
            "minor_axis_um": 4 * np.sqrt(l2) * mpp,
            "circularity": 4 * np.pi * area / perimeter**2,
        }
    bad = ~(area > 0)
    return pd.DataFrame({k: np.where(bad, np.nan, v).astype(np.float32) for k, v in columns.items()})


def polygon_pixels(coord: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels inside each polygon, clipped to ``shape`` (H, W): (nucleus index, flat index).

    Scanline fill at pixel centres with the even-odd rule, all polygons at once: every edge is cut
    with the pixel rows it crosses (half-open in y), the cuts are sorted by (polygon, row, x) and
    paired into runs of pixels. Same pixels as ``skimage.draw.polygon`` (the StarDist label rule).
    """
    h, w = shape
    coord = np.asarray(coord, dtype=np.float64)
    y0, x0 = coord[:, 0].ravel(), coord[:, 1].ravel()
    y1, x1 = np.roll(coord[:, 0], -1, axis=1).ravel(), np.roll(coord[:, 1], -1, axis=1).ravel()
    nuc = np.repeat(np.arange(len(coord)), coord.shape[2])
    r0 = np.ceil(np.minimum(y0, y1)).astype(np.int64)  # rows r with min ≤ r < max
    n_rows = np.ceil(np.maximum(y0, y1)).astype(np.int64) - r0
    edge = np.repeat(np.arange(y0.size), n_rows)
    row = r0[edge] + np.arange(edge.size) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    if edge.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    xc = x0[edge] + (row - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    nuc = nuc[edge]
    # one float key orders by (polygon, row, x), to ~1e-5 px with 1e4 polygons on a 2048² tile
    dr, dx = row - row.min(), xc - xc.min()
    order = np.argsort((nuc * (dr.max() + 1) + dr) * np.ceil(dx.max() + 1) + dx)
    xc, row, nuc = xc[order], row[order], nuc[order]
    c0 = np.clip(np.ceil(xc[0::2]).astype(np.int64), 0, w)  # columns c with x_in ≤ c < x_out
    c1 = np.clip(np.ceil(xc[1::2]).astype(np.int64), 0, w)
    row, nuc = row[0::2], nuc[0::2]
    n_px = np.where((row >= 0) & (row < h), np.maximum(c1 - c0, 0), 0)
    run = np.repeat(np.arange(n_px.size), n_px)
    col = c0[run] + np.arange(run.size) - np.repeat(np.cumsum(n_px) - n_px, n_px)
    return nuc[run], row[run] * w + col


def stain_features(img: np.ndarray, coord: np.ndarray, stain: str, channel_names=None) -> pd.DataFrame:
    """Per-nucleus stain measures over the pixels inside each polygon.

    ``img`` is the tile's read box: (H, W, 3) uint8 RGB for "he" / "ihc", (H, W, C) or (H, W) for
    "if". "he": mean ``hematoxylin_od``, ``eosin_od``, ``od_total`` (OD_R + OD_G + OD_B) and
    ``hematoxylin_od_std`` (chromatin texture); "ihc": ``hematoxylin_od``, ``dab_od``; "if":
    ``mean_<channel>`` in the image's intensity units. A nucleus with no pixel centre inside gets NaN.
    """
    columns = feature_columns(stain, channel_names)[6:]
    img = np.asarray(img)
    img = img[..., None] if img.ndim == 2 else img
    nuc, flat = polygon_pixels(coord, img.shape[:2])
    n = len(coord)
    with np.errstate(invalid="ignore", divide="ignore"):
        count = np.bincount(nuc, minlength=n).astype(np.float64)
        if stain == "if":
            if img.shape[2] != len(columns):
                raise ValueError(f"image has {img.shape[2]} channels but {len(columns)} channel names were given")
            px = img.reshape(-1, img.shape[2])[flat].astype(np.float64)
            means = [np.bincount(nuc, px[:, k], n) / count for k in range(px.shape[1])]
            return pd.DataFrame(dict(zip(columns, means)), dtype=np.float32)
        if img.dtype != np.uint8 or img.shape[2] != 3:
            raise ValueError(f"stain {stain!r} needs an (H, W, 3) uint8 RGB image, got {img.shape} {img.dtype}")
        od = _OD_LUT[img.reshape(-1, 3)[flat].T]  # (3, m): OD of R, G, B at each pixel
        od_mean = np.stack([np.bincount(nuc, od[k], n) for k in range(3)], axis=1) / count[:, None]
        conc = od_mean @ _UNMIX  # means are linear: unmix the (n, 3) mean ODs, not every pixel
        if stain == "ihc":
            return pd.DataFrame({"hematoxylin_od": conc[:, 0], "dab_od": conc[:, 2]}, dtype=np.float32)
        h = _UNMIX[:, 0] @ od
        std = np.sqrt(np.maximum(np.bincount(nuc, h * h, n) / count - conc[:, 0] ** 2, 0))
        return pd.DataFrame(
            {
                "hematoxylin_od": conc[:, 0],
                "eosin_od": conc[:, 1],
                "od_total": od_mean.sum(axis=1),
                "hematoxylin_od_std": std,
            },
            dtype=np.float32,
        )


def nucleus_features(img: np.ndarray, coord: np.ndarray, mpp: float, stain: str, channel_names=None) -> pd.DataFrame:
    """Shape and stain features, one row per polygon in ``coord`` order (columns: :func:`feature_columns`)."""
    return pd.concat([shape_features(coord, mpp), stain_features(img, coord, stain, channel_names)], axis=1)
