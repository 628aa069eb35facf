"""The tile grid: cores that partition the slide, each read with a halo, kept only over tissue.

All coordinates are integer pixels of a virtual grid at the model's µm/px (``grid_mpp``) whose
origin is the slide's top-left corner. A core is half-open: ``[x0, x1) × [y0, y1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from histo.config import Section
from histo.errors import WorkflowError

ALIGN = 16  # px; read origins are multiples of this so the U-Net sees every tile on the same lattice
CONTEXT_PX = 64  # px at the model's µm/px: the least halo (bench/halo_context.py measures what it changes)
MIRRORS = {  # segmentation.flips -> the (up-down, left-right) mirrors averaged (histo.segment.task.network_maps)
    1: ((False, False),),
    2: ((False, False), (False, True)),
    4: ((False, False), (False, True), (True, False), (True, True)),
}


@dataclass(frozen=True)
class Segmentation(Section):
    """The workflow's ``segmentation:`` section: the tiles and StarDist's thresholds
    (histo.run.pipeline.plan_tiles, histo.segment.task)."""

    tile_um: float = 256.0  # µm, tile core edge (1024 px at 0.25 µm/px)
    halo_um: float | None = None  # µm; None = halo_px(): CONTEXT_PX or the model's largest nucleus radius
    prob_thresh: float | None = None  # None = the model's own threshold
    nms_thresh: float | None = None  # None = the model's own threshold
    nucleus_channel: str | int | None = None  # fluorescence: the channel the nucleus model reads (name or 0-based
    #   index); None = the first channel, the DNA stain as tissue detection assumes
    second_view_saturation: float | None = 0.3  # H&E: the network also sees each tile with its saturation × this
    #   and every pixel keeps the view with the higher nucleus probability (histo.segment.task.predict_tile);
    #   None = one view
    flips: int = 1  # 1, 2 or 4: each view's network maps averaged over this many mirror images (test-time
    #   augmentation, histo.segment.task.network_maps): 4 gives F1 0.831 → 0.836 on the model's validation images at
    #   4× the network's time

    RANGES: ClassVar = {
        "tile_um": (32.0, 2048.0),  # 128–8192 px at 0.25 µm/px
        "halo_um": (0.0, 256.0),
        "prob_thresh": (0.0, 1.0),
        "nms_thresh": (0.0, 1.0),
        "second_view_saturation": (0.0, 1.0),
        "flips": (1, 4),
    }

    def validated(self, path: str) -> Segmentation:
        """Itself; WorkflowError for ``flips`` not a key of :data:`MIRRORS` (1, 2 or 4)."""
        if self.flips not in MIRRORS:
            allowed = ", ".join(map(str, MIRRORS))
            raise WorkflowError(path, f"'segmentation.flips' must be one of {allowed}, not {self.flips!r}")
        return self


@dataclass(frozen=True)
class Tile:
    """One tile: its grid position, its core (half-open, px) and the halo read around it (px)."""

    row: int
    col: int
    x0: int
    y0: int
    x1: int
    y1: int
    halo: int
    grid_w: int | None = None  # grid extent (px) that the read box stays within; None: not clipped
    grid_h: int | None = None
    own: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) px: the part of the core the tile
    #   segments and keeps nuclei in (its tissue, grown by the halo: :func:`tile_grid`); None: all of it

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) px, half-open: the part of the core whose nuclei this tile keeps."""
        return self.own or (self.x0, self.y0, self.x1, self.y1)

    @property
    def read_box(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) in grid px of :attr:`box` + halo, within the grid: the pixels the tile reads.
        Not reading the halo past the slide's edge saved a sixth of a corner tile's work (the U-Net sees
        the slide's edge, as StarDist's whole-image prediction does)."""
        h = self.halo
        x0, y0, x1, y1 = self.box
        x, y = max(x0 - h, 0), max(y0 - h, 0)
        x1, y1 = x1 + h, y1 + h
        if self.grid_w is not None:
            x1, y1 = min(x1, self.grid_w), min(y1, self.grid_h)
        return x, y, x1 - x, y1 - y

    def owns(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which of the points (grid px) lie in the part of the core this tile keeps (:attr:`box`, half-open)."""
        x0, y0, x1, y1 = self.box
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)

    @property
    def name(self) -> str:
        return f"r{self.row:05d}_c{self.col:05d}"


def align_up(n: float, step: int = ALIGN) -> int:
    """Smallest multiple of ``step`` that is ≥ n."""
    return int(math.ceil(n / step) * step)


def halo_px(max_nucleus_um: float, grid_mpp: float, halo_um: float | None = None) -> int:
    """The halo (px, aligned) each tile reads around its box: ``halo_um`` where the workflow sets it,
    else ``CONTEXT_PX`` of context for the U-Net or the radius of the model's largest nucleus (µm),
    whichever is wider. A kept nucleus is centred in its tile's box, so it reaches at most its radius
    past it. The U-Net's receptive field is wider (94 px for ``histo-he`` by StarDist's estimate), but
    at 64 px its nuclei still agree with ``predict_instances_big``'s at F1 0.9998 on the 6,144²
    generated slide, with 20 % fewer pixels read than at 112 px (``bench/halo_context.py``)."""
    um = max(CONTEXT_PX * grid_mpp, max_nucleus_um / 2) if halo_um is None else halo_um
    return align_up(um / grid_mpp)


def tile_grid(
    shape: tuple[int, int],
    tile_px: int,
    halo_px: int,
    tissue_mask: np.ndarray | None = None,
    mask_scale: float = 1.0,
) -> list[Tile]:
    """Tiles of ``tile_px`` cores over an image of ``shape`` (H, W) grid px, row-major order.

    ``tile_px`` and ``halo_px`` are rounded up to multiples of ``ALIGN``. With a ``tissue_mask``
    (bool, one mask pixel = ``mask_scale`` grid px), only tiles whose core plus halo touches tissue
    are kept, and each segments only the part of its core within ``halo_px`` of that tissue
    (:attr:`Tile.own`): a nucleus centred there may reach tissue, one farther away cannot. On the
    throughput bench's slide this reads 31 Mpx instead of 46 (``bench/throughput.py``).
    """
    tile_px, halo_px = align_up(tile_px), align_up(halo_px)
    height, width = shape
    tiles = []
    for row in range(math.ceil(height / tile_px)):
        for col in range(math.ceil(width / tile_px)):
            x0, y0 = col * tile_px, row * tile_px
            tile = Tile(row, col, x0, y0, min(x0 + tile_px, width), min(y0 + tile_px, height), halo_px, width, height)
            if tissue_mask is not None:
                tile = _fit_to_tissue(tissue_mask, mask_scale, tile)
            if tile is not None:
                tiles.append(tile)
    return tiles


def pixels_read(tiles) -> tuple[int, int]:
    """(read px, kept px) summed over ``tiles``, in grid px: each tile's :attr:`Tile.read_box` (what it
    reads, halo included) and its :attr:`Tile.box` (the part whose nuclei it keeps). Their ratio is
    the halo's overhead."""
    read = sum(t.read_box[2] * t.read_box[3] for t in tiles)
    return read, sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in (t.box for t in tiles))


def _fit_to_tissue(mask: np.ndarray, scale: float, tile: Tile) -> Tile | None:
    """``tile`` with :attr:`Tile.own` set to the tissue's bounding box within its read box, grown by
    the halo, aligned outwards to ``ALIGN`` and clipped to the core; None where it reads no tissue."""
    x, y, w, h = tile.read_box
    r0, c0 = max(int(y // scale), 0), max(int(x // scale), 0)
    r1, c1 = int(math.ceil((y + h) / scale)), int(math.ceil((x + w) / scale))
    window = mask[r0:r1, c0:c1]
    rows, cols = np.flatnonzero(window.any(axis=1)), np.flatnonzero(window.any(axis=0))
    if not len(rows):
        return None
    grow = tile.halo
    box = (
        max(tile.x0, (math.floor((c0 + cols[0]) * scale) - grow) // ALIGN * ALIGN),
        max(tile.y0, (math.floor((r0 + rows[0]) * scale) - grow) // ALIGN * ALIGN),
        min(tile.x1, align_up(math.ceil((c0 + cols[-1] + 1) * scale) + grow)),
        min(tile.y1, align_up(math.ceil((r0 + rows[-1] + 1) * scale) + grow)),
    )
    if box[0] >= box[2] or box[1] >= box[3]:
        return None
    return replace(tile, own=None if box == (tile.x0, tile.y0, tile.x1, tile.y1) else box)
