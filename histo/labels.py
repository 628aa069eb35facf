"""Nucleus label pyramid (OME-Zarr), rasterised from ``cells.parquet`` chunk by chunk.

Level 0 is on the model's grid (``mpp`` µm/px, origin at the slide's top-left); each further level
halves it by nearest-neighbour sampling. The value of a pixel is the nucleus's ``label`` column.
Memory per task is one chunk plus the nuclei of the 3×3 tiles around it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely
import zarr
from skimage.draw import polygon as fill_polygon

from histo.tiling import Tile

MIN_LEVEL_PX = 512  # stop adding levels once the longer side is this small


def rasterise(polygons_um: np.ndarray, labels: np.ndarray, mpp: float, origin_px: tuple[int, int], shape) -> np.ndarray:
    """Label image of ``shape`` whose top-left is grid px ``origin_px`` (x, y).

    ``polygons_um`` are shapely polygons (µm); they are drawn in order, later ones on top. A pixel
    belongs to a polygon when its centre (``(i + 0.5)·mpp`` µm) lies inside.
    """
    out = np.zeros(shape, dtype=np.int32)
    x0, y0 = origin_px
    for poly, label in zip(polygons_um, labels):
        xy = shapely.get_coordinates(shapely.get_exterior_ring(poly))
        rr, cc = fill_polygon(xy[:, 1] / mpp - 0.5 - y0, xy[:, 0] / mpp - 0.5 - x0, shape=shape)
        out[rr, cc] = label
    return out


def create_pyramid(path: Path, shape: tuple[int, int], chunk: int, mpp: float) -> list[zarr.Array]:
    """Create the empty OME-Zarr label pyramid (zeros are implicit: empty chunks are not stored)."""
    from ome_zarr.writer import write_multiscales_metadata

    root = zarr.open_group(str(path), mode="w")
    arrays, datasets = [], []
    level, (h, w) = 0, shape
    while True:
        arrays.append(root.create_array(str(level), shape=(h, w), chunks=(chunk, chunk), dtype="int32", fill_value=0))
        scale = mpp * 2**level
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [scale, scale]}]})
        if max(h, w) <= MIN_LEVEL_PX:
            break
        level, h, w = level + 1, math.ceil(h / 2), math.ceil(w / 2)
    axes = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    write_multiscales_metadata(root, datasets, axes=axes, name="nuclei")
    return arrays


def write_chunk(cells_path: str, row_groups: list[int], zarr_path: str, tile: Tile, mpp: float) -> int:
    """Rasterise the nuclei of ``row_groups`` (the tile and its neighbours) into the tile's chunk of
    level 0. Returns the number of labelled pixels."""
    region = (tile.y1 - tile.y0, tile.x1 - tile.x0)
    if row_groups:
        table = pq.ParquetFile(cells_path).read_row_groups(row_groups, columns=["label", "polygon"])
        order = np.argsort(table.column("label").to_numpy())
        polygons = shapely.from_wkb(table.column("polygon").to_numpy(zero_copy_only=False)[order])
        chunk = rasterise(polygons, table.column("label").to_numpy()[order], mpp, (tile.x0, tile.y0), region)
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
