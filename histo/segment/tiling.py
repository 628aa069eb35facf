"""The tile grid: cores that partition the slide, each read with a halo, kept only over tissue.

All coordinates are integer pixels of a virtual grid at the model's µm/px (``grid_mpp``) whose
origin is the slide's top-left corner. A core is half-open: ``[x0, x1) × [y0, y1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from histo.config import Section

ALIGN = 16  # px; read origins are multiples of this so the U-Net sees every tile on the same lattice


@dataclass(frozen=True)
class Segmentation(Section):
    """The workflow's ``segmentation:`` section: the tiles and StarDist's thresholds
    (histo.run.pipeline.plan_tiles, histo.segment.task)."""

    tile_um: float = 256.0  # µm, tile core edge (1024 px at 0.25 µm/px)
    halo_um: float | None = None  # µm; None = from the model's largest nucleus
    prob_thresh: float | None = None  # None = the model's own threshold
    nms_thresh: float | None = None  # None = the model's own threshold
    nucleus_channel: str | int | None = None  # fluorescence: the channel the nucleus model reads (name or 0-based
    #   index); None = the first channel, the DNA stain as tissue detection assumes

    RANGES: ClassVar = {
        "tile_um": (32.0, 2048.0),  # 128–8192 px at 0.25 µm/px
        "halo_um": (0.0, 256.0),
        "prob_thresh": (0.0, 1.0),
        "nms_thresh": (0.0, 1.0),
    }


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

    @property
    def read_box(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) in grid px of core + halo, within the grid: the pixels the tile reads. Not
        reading the halo past the slide's edge saved a sixth of a corner tile's work (the U-Net sees
        the slide's edge, as StarDist's whole-image prediction does)."""
        h = self.halo
        x, y = max(self.x0 - h, 0), max(self.y0 - h, 0)
        x1, y1 = self.x1 + h, self.y1 + h
        if self.grid_w is not None:
            x1, y1 = min(x1, self.grid_w), min(y1, self.grid_h)
        return x, y, x1 - x, y1 - y

    def owns(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which of the points (grid px) lie in this tile's core (half-open)."""
        return (x >= self.x0) & (x < self.x1) & (y >= self.y0) & (y < self.y1)

    @property
    def name(self) -> str:
        return f"r{self.row:05d}_c{self.col:05d}"


def align_up(n: float, step: int = ALIGN) -> int:
    """Smallest multiple of ``step`` that is ≥ n."""
    return int(math.ceil(n / step) * step)


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
    are kept, so no nucleus on tissue is missed at a tile edge.
    """
    tile_px, halo_px = align_up(tile_px), align_up(halo_px)
    height, width = shape
    tiles = []
    for row in range(math.ceil(height / tile_px)):
        for col in range(math.ceil(width / tile_px)):
            x0, y0 = col * tile_px, row * tile_px
            tile = Tile(row, col, x0, y0, min(x0 + tile_px, width), min(y0 + tile_px, height), halo_px, width, height)
            if tissue_mask is None or _touches(tissue_mask, mask_scale, tile):
                tiles.append(tile)
    return tiles


def _touches(mask: np.ndarray, scale: float, tile: Tile) -> bool:
    x, y, w, h = tile.read_box
    r0, c0 = max(int(y // scale), 0), max(int(x // scale), 0)
    r1, c1 = int(math.ceil((y + h) / scale)), int(math.ceil((x + w) / scale))
    return bool(mask[r0:r1, c0:c1].any())
