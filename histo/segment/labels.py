"""Nucleus label pyramid (OME-Zarr), rasterised from ``cells.parquet`` chunk by chunk.

Level 0 is on the model's grid (``mpp`` µm/px, origin at the slide's top-left); each further level
halves it by nearest-neighbour sampling. The value of a pixel is the nucleus's ``label`` column.
Memory per task is one chunk plus the nuclei of the 3×3 tiles around it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numba
import numpy as np
import pyarrow.parquet as pq
import shapely
import zarr

from histo.segment.tiling import Tile

MIN_LEVEL_PX = 512  # stop adding levels once the longer side is this small


def rasterise(polygons_um: np.ndarray, labels: np.ndarray, mpp: float, origin_px: tuple[int, int], shape) -> np.ndarray:
    """Label image of ``shape`` whose top-left is grid px ``origin_px`` (x, y).

    ``polygons_um`` are shapely polygons (µm; their exterior rings are drawn); they are drawn in
    order, later ones on top. A pixel belongs to a polygon when its centre (``(i + 0.5)·mpp`` µm)
    lies inside (even-odd rule; a centre on a left or top edge is inside, on a right or bottom one not).
    """
    out = np.zeros(shape, dtype=np.int32)
    if len(polygons_um):
        rings = shapely.get_exterior_ring(np.asarray(polygons_um))
        xy, ring = shapely.get_coordinates(rings, return_index=True)
        offsets = np.searchsorted(ring, np.arange(len(rings) + 1))
        _fill(
            out,
            xy[:, 0] / mpp - 0.5 - origin_px[0],
            xy[:, 1] / mpp - 0.5 - origin_px[1],
            offsets,
            np.asarray(labels, dtype=np.int32),
        )
    return out


@numba.njit(cache=True, nogil=True)
def _fill(out, xs, ys, offsets, labels):  # pragma: no cover - compiled
    """Scanline fill of polygon k (vertices ``xs, ys[offsets[k]:offsets[k + 1]]``, px with pixel
    centres on integers) with ``labels[k]``, in order. A row's edge crossings come in pairs (a closed
    ring); pixel c of the row is inside between a pair when crossing_0 ≤ c < crossing_1.
    skimage.draw.polygon (a point-in-polygon test per pixel of the bounding box, 0.36 ms per
    nucleus) took 0.13 s for a 1,024² chunk's 360 nuclei; this takes a tenth of that."""
    h, w = out.shape
    for k in range(len(offsets) - 1):
        a, b = offsets[k], offsets[k + 1]
        if b - a < 3:
            continue
        cross = np.empty(b - a, np.float64)
        r0, r1 = max(int(np.ceil(ys[a:b].min())), 0), min(int(np.floor(ys[a:b].max())), h - 1)
        for r in range(r0, r1 + 1):
            n = 0
            for i in range(a, b):
                j = i + 1 if i + 1 < b else a
                if (ys[i] <= r) != (ys[j] <= r):
                    cross[n] = xs[i] + (r - ys[i]) * (xs[j] - xs[i]) / (ys[j] - ys[i])
                    n += 1
            row = np.sort(cross[:n])
            for p in range(0, n - 1, 2):
                for c in range(max(int(np.ceil(row[p])), 0), min(int(np.ceil(row[p + 1])), w)):
                    out[r, c] = labels[k]


def create_pyramid(path: Path, shape: tuple[int, int], chunk: int, mpp: float) -> list[zarr.Array]:
    """Create the empty label pyramid (zeros are implicit: empty chunks are not stored): an OME-NGFF 0.5
    label image (``multiscales`` and ``image-label``; arrays with ``dimension_names``), written through
    ome-zarr-py's metadata writers. Its arrays are filled chunk by chunk on the cluster
    (:func:`write_chunk`), which ome-zarr-py's whole-array writers do not do.

    Pixel (i, j) of every level is the level-0 pixel (2ᵏi, 2ᵏj) (nearest-neighbour), whose centre lies
    at ((2ᵏi + ½)·mpp) µm: each level's scale is 2ᵏ·mpp and its translation ½·mpp (pixel centres, as
    NGFF places them), so other viewers overlay the labels on the slide without a half-pixel shift."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import add_metadata, write_multiscales_metadata

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    arrays, datasets = [], []
    level, (h, w) = 0, shape
    while True:
        arrays.append(
            root.create_array(
                str(level), shape=(h, w), chunks=(chunk, chunk), dtype="int32", fill_value=0, dimension_names=("y", "x")
            )
        )
        scale = mpp * 2**level
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [scale, scale]},
                    {"type": "translation", "translation": [mpp / 2, mpp / 2]},
                ],
            }
        )
        if max(h, w) <= MIN_LEVEL_PX:
            break
        level, h, w = level + 1, math.ceil(h / 2), math.ceil(w / 2)
    axes = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    write_multiscales_metadata(root, datasets, fmt=FormatV05(), axes=axes, name="nuclei")
    add_metadata(root, {"image-label": {"version": "0.5"}}, fmt=FormatV05())
    return arrays


def write_chunk(cells_path: str, row_groups: list[int], zarr_path: str, tile: Tile, mpp: float) -> int:
    """Rasterise the nuclei of ``row_groups`` (the tile and its neighbours) into the tile's chunk of
    level 0. Returns the number of labelled pixels."""
    region = (tile.y1 - tile.y0, tile.x1 - tile.x0)
    if row_groups:
        table = pq.ParquetFile(cells_path).read_row_groups(row_groups, columns=["label", "polygon"])
        polygons = shapely.from_wkb(table.column("polygon").to_numpy(zero_copy_only=False))
        # only the nuclei that reach the chunk (the neighbours' tiles hold 8 chunks' worth more)
        x0, y0, x1, y1 = shapely.bounds(polygons).T / mpp
        labels = table.column("label").to_numpy()
        near = (x1 >= tile.x0) & (x0 < tile.x1) & (y1 >= tile.y0) & (y0 < tile.y1)
        order = np.argsort(labels[near])
        chunk = rasterise(polygons[near][order], labels[near][order], mpp, (tile.x0, tile.y0), region)
    else:
        chunk = np.zeros(region, dtype=np.int32)
    if chunk.any():
        zarr.open_array(f"{zarr_path}/0", mode="r+")[tile.y0 : tile.y1, tile.x0 : tile.x1] = chunk
    return int(np.count_nonzero(chunk))


def downsample_level(zarr_path: str, level: int, rows: slice, cols: slice) -> None:
    """Fill ``rows``/``cols`` (px of ``level``) from level − 1 by taking every other pixel."""
    src = zarr.open_array(f"{zarr_path}/{level - 1}", mode="r")
    block = src[rows.start * 2 : rows.stop * 2 : 2, cols.start * 2 : cols.stop * 2 : 2]
    if block.any():
        zarr.open_array(f"{zarr_path}/{level}", mode="r+")[rows, cols] = block
