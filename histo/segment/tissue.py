"""Find tissue on a low-resolution view of a slide: a mask and polygons (µm), pen marks excluded."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from skimage.color import rgb2hsv
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import find_contours

from histo.config import Section

if TYPE_CHECKING:
    from histo.io.slide import Slide

SAT_RANGE = (0.07, 0.20)  # Otsu's saturation threshold is clipped here: glass ≲ 0.05, pale eosin ≳ 0.1
PEN_HUES = (70.0, 250.0)  # degrees: green-blue marker inks; haematoxylin is ≳ 255°, eosin ≳ 300°
PEN_SAT, BLACK_V = 0.3, 0.2  # saturated ink in PEN_HUES; anything darker than BLACK_V is ink or debris
MIN_CONTRAST = 2.0  # fluorescence: tissue must be twice as bright as background on average
CROP_MAX_UM = 3000.0  # a one-level image no wider than this is a crop: all tissue except visible glass
CROP_MPP = 2.0  # µm/px of a crop's tissue mask (a 250 µm crop is 125 px, not 31 at 8 µm/px)
GLASS_SAT, GLASS_VAL = 0.07, 0.8  # glass: unsaturated and bright (HSV), whatever the tissue's stain
MIN_GLASS_UM2 = 2_500.0  # a crop's glass counts from 50 × 50 µm: smaller pale spots are lumens, fat, tears


@dataclass(frozen=True)
class TissueParams(Section):
    """The workflow's ``tissue:`` section: tissue detection on a low-resolution level (:func:`detect_tissue`)."""

    mpp: float = 8.0  # µm/px of the level tissue is detected on
    min_area_um2: float = 20_000.0  # µm², smaller tissue specks are dropped

    RANGES: ClassVar = {"mpp": (0.5, 100.0)}


@dataclass(eq=False)
class Tissue:
    """Tissue of a slide. ``mask`` (H, W) bool at ``mpp`` µm/px over the whole slide (pixel (r, c)
    covers level-0 µm [c·mpp, (c+1)·mpp) × [r·mpp, (r+1)·mpp)); ``pieces``: polygons in µm (x = column,
    level-0 origin, holes kept), largest first."""

    mask: np.ndarray
    mpp: float
    pieces: list[Polygon]
    _integral: np.ndarray | None = field(default=None, repr=False)


def detect_tissue(slide: Slide, mpp: float = 8.0, min_area_um2: float = 20_000, max_hole_um2: float = 20_000) -> Tissue:
    """Detect tissue on ``slide`` viewed at ``mpp`` µm/px (not finer than the slide itself).

    Brightfield: saturation above Otsu's threshold (clipped to SAT_RANGE, so pure glass gives no
    tissue), minus pen marks (saturated green/blue ink, black). Fluorescence: Otsu on the first (DNA)
    channel, none when the foreground is not MIN_CONTRAST × brighter. Pieces smaller than
    ``min_area_um2`` are dropped, holes smaller than ``max_hole_um2`` filled.

    A brightfield crop (one level, at most CROP_MAX_UM wide: an annotated tile, a figure) is tissue
    everywhere except glass patches of at least MIN_GLASS_UM2, viewed at CROP_MPP µm/px.
    """
    if slide.kind == "brightfield" and is_crop(slide):
        return _crop_tissue(slide, max(min(mpp, CROP_MPP), slide.mpp), min_area_um2)
    mpp = max(mpp, slide.mpp)
    img = slide.thumbnail(mpp)
    px = mpp * mpp
    if slide.kind == "brightfield":
        mask, pen = _brightfield(img, min_area_um2 / px)
    else:
        mask, pen = _fluorescence(img[..., 0].astype(np.float32)), None
    mask = ndi.binary_closing(mask, np.ones((3, 3), bool), border_value=0)
    mask = _fill_holes(mask, max_hole_um2 / px)
    if pen is not None:
        mask &= ~pen
    mask = _drop_small(mask, min_area_um2 / px)
    return Tissue(mask, mpp, _pieces(mask, mpp, min_area_um2))


def is_crop(slide: Slide) -> bool:
    """A single-level image no wider than CROP_MAX_UM µm (not a whole slide)."""
    return len(slide.levels) == 1 and max(slide.shape) * slide.mpp <= CROP_MAX_UM


def _crop_tissue(slide: Slide, mpp: float, min_area_um2: float) -> Tissue:
    """Everything but glass (GLASS_SAT, GLASS_VAL; patches of MIN_GLASS_UM2 or more) is tissue;
    pieces count from ``min_area_um2`` or a twentieth of the crop, whichever is smaller."""
    hsv = rgb2hsv(slide.thumbnail(mpp))
    px = mpp * mpp
    glass = gaussian(hsv[..., 1], sigma=1) < GLASS_SAT
    glass &= gaussian(hsv[..., 2], sigma=1) > GLASS_VAL
    mask = ~_drop_small(glass, MIN_GLASS_UM2 / px)
    min_piece_um2 = min(min_area_um2, mask.size * px / 20)
    mask = _drop_small(mask, min_piece_um2 / px)
    return Tissue(mask, mpp, _pieces(mask, mpp, min_piece_um2))


def tissue_fraction(tissue: Tissue, x_um, y_um, w_um, h_um) -> np.ndarray:
    """Fraction of each rectangle (µm, level-0 origin; scalars or arrays) covered by mask pixels that
    touch it (> 0: the rectangle touches tissue). Vectorised, O(1) per rectangle (summed-area table)."""
    if tissue._integral is None:
        tissue._integral = np.pad(tissue.mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    s, m = tissue._integral, tissue.mpp
    x, y, w, h = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (x_um, y_um, w_um, h_um)))
    c0, c1 = np.floor(x / m).astype(np.int64), np.ceil((x + w) / m).astype(np.int64)
    r0, r1 = np.floor(y / m).astype(np.int64), np.ceil((y + h) / m).astype(np.int64)
    H, W = tissue.mask.shape
    cc0, cc1, rr0, rr1 = (np.clip(c0, 0, W), np.clip(c1, 0, W), np.clip(r0, 0, H), np.clip(r1, 0, H))
    inside = s[rr1, cc1] - s[rr0, cc1] - s[rr1, cc0] + s[rr0, cc0]
    return inside / np.maximum((r1 - r0) * (c1 - c0), 1)


def _brightfield(rgb: np.ndarray, min_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Tissue candidates and pen marks (strokes of at least ``min_px``) of an 8-bit RGB image."""
    hsv = rgb2hsv(rgb)
    hue, sat, val = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
    pen = ((hue >= PEN_HUES[0]) & (hue <= PEN_HUES[1]) & (sat > PEN_SAT)) | (val < BLACK_V)
    pen = ndi.binary_dilation(_drop_small(pen, min_px), np.ones((5, 5), bool))  # + the pale rim
    smooth = gaussian(sat, sigma=1)
    rest = smooth[~pen]
    t = threshold_otsu(rest) if rest.size and np.ptp(rest) > 0 else SAT_RANGE[0]
    return (smooth > np.clip(t, *SAT_RANGE)) & ~pen, pen


def _fluorescence(dna: np.ndarray) -> np.ndarray:
    g = gaussian(dna - dna.min(), sigma=1)
    if np.ptp(g) <= 0:
        return np.zeros(g.shape, bool)
    fg = np.log1p(g) > threshold_otsu(np.log1p(g))
    return fg if g[fg].mean() >= MIN_CONTRAST * g[~fg].mean() + 1e-6 else np.zeros(g.shape, bool)


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    lab, _ = ndi.label(mask, np.ones((3, 3), bool))
    return (np.bincount(lab.ravel()) >= min_px)[lab] & mask


def _fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components that do not touch the border and are smaller than ``max_px``."""
    lab, _ = ndi.label(~mask)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    small = np.bincount(lab.ravel()) < max_px
    small[border] = False
    return mask | small[lab]


def _pieces(mask: np.ndarray, mpp: float, min_area_um2: float) -> list[Polygon]:
    """Polygons (µm) of the mask's 8-connected components, simplified to ~1 mask pixel."""
    lab, _ = ndi.label(mask, np.ones((3, 3), bool))
    out = []
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        sub = np.pad(lab[sl] == i, 1).astype(np.uint8)
        rings = [Polygon(c[:, ::-1]) for c in find_contours(sub, 0.5) if len(c) >= 4]
        geom = reduce(lambda a, b: a.symmetric_difference(b), rings)
        offset = np.array([sl[1].start - 0.5, sl[0].start - 0.5])  # padded index → pixel centre
        geom = shapely.transform(geom, lambda xy, offset=offset: (xy + offset) * mpp)
        geom = shapely.make_valid(geom).simplify(mpp, preserve_topology=True)
        out += [p for p in shapely.get_parts(geom) if isinstance(p, Polygon) and p.area >= min_area_um2]
    return sorted(out, key=lambda p: (-round(p.area, 3), p.bounds[1], p.bounds[0]))
