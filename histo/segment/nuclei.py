"""Nuclei of one tile as a table: StarDist polygons → µm, ownership by core, stable ids.

Pure functions over arrays; the Dask task that reads pixels and runs the model is in
``histo.segment.task``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import shapely

from histo.segment.features import feature_columns
from histo.segment.tiling import Tile

# two nuclei centred closer than this are one nucleus seen by two tiles (µm; nuclei are ≥ 4 µm across, DOMAIN)
DUPLICATE_UM = 1.5

CELL_SCHEMA = pa.schema(
    [
        ("cell_id", pa.int64()),
        ("x_um", pa.float64()),
        ("y_um", pa.float64()),
        ("area_um2", pa.float32()),
        ("prob", pa.float32()),
        ("polygon", pa.binary()),  # WKB, µm
        ("tile", pa.string()),
    ]
)


def cell_schema(stain: str, channel_names=None, classes: bool = False) -> pa.Schema:
    """Columns of a tile's cells table: :data:`CELL_SCHEMA` plus the stain's nucleus features, and
    with ``classes`` the learned ``nucleus_class`` and its probability (histo.segment.nucleus_classes)."""
    schema = CELL_SCHEMA
    for name in feature_columns(stain, channel_names):
        schema = schema.append(pa.field(name, pa.float32()))
    if classes:
        schema = schema.append(pa.field("nucleus_class", pa.string())).append(
            pa.field("nucleus_class_prob", pa.float32())
        )
    return schema


def cell_ids(points: np.ndarray, grid_width: int) -> np.ndarray:
    """Stable id of each nucleus: the linear index of its centre pixel (y, x) in the grid.

    StarDist keeps at most one nucleus per centre pixel, so ids are unique, and they do not depend
    on the tile layout or on the order tasks finish in.
    """
    points = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    return points[:, 0] * np.int64(grid_width) + points[:, 1]


def id_centres_um(ids: np.ndarray, grid_width: int, mpp: float) -> np.ndarray:
    """The nucleus centres (n, 2) as (x, y) µm encoded by :func:`cell_ids` on a grid of ``mpp``."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % grid_width + 0.5, ids // grid_width + 0.5], axis=1) * mpp


def polygon_area(coord: np.ndarray) -> np.ndarray:
    """Shoelace area of polygons ``coord`` (n, 2, n_rays) given as (y, x) rows, in input units²."""
    y, x = coord[:, 0, :], coord[:, 1, :]
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y, axis=1))


def tile_cells(
    coord: np.ndarray,
    points: np.ndarray,
    prob: np.ndarray,
    tile: Tile,
    mpp: float,
    grid_width: int,
    features: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The cells table rows of one tile.

    ``coord`` (n, 2, n_rays) and ``points`` (n, 2) are (y, x) in px of the tile's read box, as
    StarDist returns them. Keeps the nuclei whose centre lies in the tile's core, moves them to slide
    µm, appends their row of ``features`` (one row per input nucleus) and sorts them by id. Grid px
    ``i`` covers µm ``[i·mpp, (i+1)·mpp)``, so its centre is at ``(i + 0.5)·mpp``.
    """
    keep = owned(points, tile)
    offset = read_origin(tile)
    points = np.asarray(points, dtype=np.int64).reshape(-1, 2) + offset
    if not keep.any():
        return empty_cells(None if features is None else features.columns)
    coord = (np.asarray(coord, dtype=np.float64)[keep] + offset[None, :, None] + 0.5) * mpp
    polygons = shapely.polygons(np.stack([coord[:, 1, :], coord[:, 0, :]], axis=-1))
    centroids = shapely.centroid(polygons)
    frame = pd.DataFrame(
        {
            "cell_id": cell_ids(points[keep], grid_width),
            "x_um": shapely.get_x(centroids),
            "y_um": shapely.get_y(centroids),
            "area_um2": polygon_area(coord).astype(np.float32),
            "prob": np.asarray(prob)[keep].astype(np.float32),
            "polygon": shapely.to_wkb(polygons),
            "tile": tile.name,
        }
    )
    if features is not None:
        frame = pd.concat([frame, features[keep].reset_index(drop=True)], axis=1)
    return frame.sort_values("cell_id", kind="stable").reset_index(drop=True)


def read_origin(tile: Tile) -> np.ndarray:
    """(y, x) grid px of the tile's read box origin."""
    x, y, _, _ = tile.read_box
    return np.array([y, x])


def owned(points: np.ndarray, tile: Tile) -> np.ndarray:
    """Which nucleus centres ``points`` (n, 2) as (y, x) read-box px lie in the tile's core."""
    grid = np.asarray(points, dtype=np.int64).reshape(-1, 2) + read_origin(tile)
    return tile.owns(grid[:, 1], grid[:, 0])


def border_duplicates(
    xy_um: np.ndarray, prob: np.ndarray, tile_index: np.ndarray, radius_um: float = DUPLICATE_UM
) -> np.ndarray:
    """Which nuclei are a second copy of a nucleus that a neighbouring tile also kept: centroids
    ``xy_um`` (n, 2) closer than ``radius_um`` from different tiles (``tile_index``); of each pair
    the lower ``prob`` goes. Ownership by centre (:func:`owned`) keeps each nucleus once when two
    tiles predict it alike; where they differ slightly at a border (bfloat16 arithmetic, a grid
    point's tie), the same nucleus can be centred in both cores."""
    drop = np.zeros(len(xy_um), bool)
    if len(xy_um) < 2:
        return drop
    from scipy.spatial import cKDTree

    pairs = cKDTree(xy_um).query_pairs(radius_um, output_type="ndarray")
    pairs = pairs[tile_index[pairs[:, 0]] != tile_index[pairs[:, 1]]]
    lower = np.where(prob[pairs[:, 0]] < prob[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    drop[lower] = True
    return drop


def empty_cells(feature_names=None) -> pd.DataFrame:
    """A cells table with no rows: the base columns plus float ``feature_names``."""
    frame = CELL_SCHEMA.empty_table().to_pandas()
    for name in feature_names if feature_names is not None else ():
        frame[name] = np.array([], np.float32)
    return frame
