"""Layer data of a result bundle (no Qt): nucleus labels, cell types and regions, in µm.

World coordinates are µm from the slide's top-left corner, (y, x). A pixel of a raster of
``s`` µm/px covers [i·s, (i+1)·s), so its centre — where napari puts it — is translated by s/2.
A bundle made from a rectangle of a slide (the Analyze widget) is offset by the rectangle's origin,
read from the crop's ``NAME.origin.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
import zarr
from napari.utils.colormaps import DirectLabelColormap

from histo.io.bundle import slide_name
from histo.outputs.export import KIND_COLORS
from histo.outputs.report import cell_colors
from histo.outputs.review import read_regions

FACE_ALPHA = 0.15  # region fill opacity; aggregates add 0.15 per grade
REJECTED_RGBA = (0.5, 0.5, 0.5, 0.1)


def origin_file(crop: str | Path) -> Path:
    """``DIR/NAME.origin.json`` beside a crop ``DIR/NAME.ome.tif``: where the crop lies on its slide."""
    crop = Path(crop)
    return crop.with_name(f"{slide_name(crop)}.origin.json")


def slide_of(run: dict) -> tuple[dict, tuple[float, float]]:
    """The slide a bundle belongs to (``path``, ``size_bytes``, ``shape_px``, ``mpp``) and the
    bundle's offset on it, (y, x) µm: the crop's origin, else (0, 0)."""
    src = origin_file(run["input"]["path"])
    if src.exists():
        origin = json.loads(src.read_text())
        return origin["slide"], (origin["y_um"], origin["x_um"])
    return run["input"], (0.0, 0.0)


def same_slide(a: dict, b: dict) -> bool:
    """True when two slide descriptions (``size_bytes``, ``shape_px``, ``mpp``) agree."""
    return (
        a.get("size_bytes") == b.get("size_bytes")
        and list(a.get("shape_px", [])) == list(b.get("shape_px", []))
        and abs(a["mpp"] - b["mpp"]) <= 0.01 * b["mpp"]
    )


def label_levels(bundle: Path) -> tuple[list[da.Array], list[float]]:
    """The nucleus label pyramid (lazy, level 0 first) and level 0's (y, x) scale in µm/px."""
    root = zarr.open_group(str(bundle / "labels.ome.zarr"), mode="r")
    attrs = root.attrs.asdict()
    datasets = attrs.get("ome", attrs)["multiscales"][0]["datasets"]
    levels = [da.from_zarr(root[d["path"]]) for d in datasets]
    return levels, list(datasets[0]["coordinateTransformations"][0]["scale"])


def pyramid(levels: list) -> tuple:
    """(data, multiscale) of a labels layer: napari needs a single level as a plain array."""
    return (levels, True) if len(levels) > 1 else (levels[0], False)


def placement(scale: list[float], offset: tuple[float, float]) -> dict:
    """``scale`` and ``translate`` (µm) of a raster at ``scale`` µm/px whose corner is at ``offset``."""
    return {"scale": scale, "translate": [o + s / 2 for o, s in zip(offset, scale)]}


def nuclei_layer(bundle: Path, offset) -> tuple:
    """The nucleus labels as a multiscale labels layer."""
    levels, scale = label_levels(bundle)
    data, multiscale = pyramid(levels)
    meta = {
        "name": f"{bundle.name} nuclei",
        "multiscale": multiscale,
        "opacity": 0.5,
        "metadata": {"bundle": str(bundle)},
        **placement(scale, offset),
    }
    return data, meta, "labels"


def cell_type_layer(bundle: Path, offset) -> tuple:
    """Nuclei coloured by cell type: the label pyramid mapped lazily through a label → type table
    (1 byte per nucleus), each type in its ``overview.png`` colour (:func:`histo.outputs.report.cell_colors`);
    the bundle's types with their colours are in ``metadata["legend"]``, their nucleus counts in
    ``metadata["counts"]``."""
    levels, scale = label_levels(bundle)
    cells = pq.read_table(bundle / "cells.parquet", columns=["label", "cell_type"]).to_pandas()
    found = cells.cell_type.astype("category").cat  # 1M rows: work on the codes, not the strings
    names, codes = [str(c) for c in found.categories], found.codes.to_numpy()
    n_of = dict(zip(names, np.bincount(codes[codes >= 0], minlength=len(names)).tolist()))
    legend = cell_colors([t for t in names if n_of[t]])  # the types present, in category order
    value = {t: i + 1 for i, t in enumerate(legend)}  # 0: no nucleus, or an untyped one
    lut = np.zeros(int(cells.label.max()) + 1 if len(cells) else 1, np.uint8)
    lut[cells.label.to_numpy()] = np.array([value.get(t, 0) for t in names] + [0], np.uint8)[codes]  # code -1: untyped
    typed = [lvl.map_blocks(lambda block: lut[block], dtype=np.uint8) for lvl in levels]
    features = pd.DataFrame({"index": range(len(legend) + 1), "cell_type": ["none", *legend]})
    data, multiscale = pyramid(typed)
    meta = {
        "name": f"{bundle.name} cell types",
        "multiscale": multiscale,
        "opacity": 0.7,
        "features": features,
        "colormap": DirectLabelColormap(color_dict={None: (0, 0, 0, 0), **{value[t]: c for t, c in legend.items()}}),
        "metadata": {"bundle": str(bundle), "legend": legend, "counts": {t: n_of[t] for t in legend}},
        **placement(scale, offset),
    }
    return data, meta, "labels"


def region_shapes(regions, offset) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Polygon vertices (y, x) µm on the slide, one shape per polygon part (holes are not drawn),
    and their features: ``region_id``, ``kind``, ``name``, ``grade``, ``review``."""
    data, rows = [], []
    for rec in regions.to_dict("records"):
        for part in shapely.get_parts(rec["geometry"]):
            if part.geom_type != "Polygon" or part.is_empty:
                continue
            data.append(np.asarray(part.exterior.coords)[:-1, ::-1] + offset)
            rows.append({k: rec.get(k) for k in ("region_id", "kind", "name", "grade", "review")})
    features = pd.DataFrame(rows, columns=["region_id", "kind", "name", "grade", "review"])
    return data, features.astype({"grade": float})


def region_colors(features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Face and edge RGBA per shape: the kind's QuPath colour, fill darker with the grade, grey when rejected."""
    rgb = np.array([KIND_COLORS.get(k, (0, 0, 0)) for k in features.kind], float).reshape(-1, 3) / 255
    grade = np.nan_to_num(features.grade.to_numpy(float))
    face = np.c_[rgb, FACE_ALPHA * (1 + grade) * (features.kind != "tissue")]
    edge = np.c_[rgb, np.ones(len(rgb))]
    rejected = (features.review == "rejected").to_numpy()
    face[rejected], edge[rejected] = REJECTED_RGBA, (0.5, 0.5, 0.5, 1)
    return face, edge


def regions_layer(bundle: Path, offset) -> tuple:
    """Regions (tissue, follicles, germinal centres, aggregates, lining, annotations) as polygons
    coloured by kind and grade, labelled with their ids."""
    data, features = region_shapes(read_regions(bundle), offset)
    face, edge = region_colors(features)
    meta = {
        "name": f"{bundle.name} regions",
        "shape_type": "polygon",
        "features": features,
        "face_color": face if len(face) else "transparent",
        "edge_color": edge if len(edge) else "black",
        "edge_width": 2.0,
        "text": {"string": "{region_id}", "size": 9, "color": "black"},
        "metadata": {"bundle": str(bundle), "offset_um": list(offset)},
    }
    return data, meta, "shapes"


def regions_from_shapes(data: list[np.ndarray], features: pd.DataFrame, offset, old):
    """The reviewed region table (µm, :mod:`histo.outputs.review`'s form) from the regions layer: shapes
    (y, x) on the slide with ``region_id`` / ``kind`` / ``name`` / ``review`` features, parts of one
    region joined; shapes without an id are new regions. Region properties (grade, layers, …) come
    from ``old`` (:func:`histo.outputs.review.read_regions`)."""
    import geopandas as gpd
    from shapely.geometry import Polygon

    f = features.reset_index(drop=True).copy()
    ids = f.region_id.where(f.region_id.notna() & (f.region_id.astype(str) != ""), None)
    f["key"] = [rid if rid is not None else f"new-{i}" for i, rid in enumerate(ids)]
    f["geometry"] = [Polygon(np.asarray(d)[:, -2:][:, ::-1] - offset[::-1]) for d in data]
    rows = []
    for key, group in f.groupby("key", sort=False):
        first = group.iloc[0]
        rows.append(
            dict(
                region_id=None if key.startswith("new-") else key,
                kind=first.kind,
                name=first["name"],
                review=first.review,
                geometry=shapely.union_all(list(group.geometry)),
            )
        )
    props = old.drop(columns=["kind", "name", "review", "geometry"]).set_index("region_id")
    table = pd.DataFrame(rows, columns=["region_id", "kind", "name", "review", "geometry"])
    table = table.join(props, on="region_id")
    return gpd.GeoDataFrame(table, geometry="geometry")
