"""Write a synthetic slide: pyramidal OME-TIFF (JPEG tiles) + truth parquet + truth GeoJSON.

Tiles of every level are rendered straight from the vector scene at that level's resolution and
handed to tifffile from generators, so no level is ever held in memory; the nucleus truth is
written block row by block row while level 0 is rendered (the blocks are then still cached).
"""

from __future__ import annotations

import json
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from shapely.geometry import Polygon, mapping

from . import scene as sc
from .render import render_tile

TRUTH_SCHEMA = pa.schema(
    [
        ("id", pa.int32()),
        ("x_um", pa.float64()),
        ("y_um", pa.float64()),
        ("cell_type", pa.string()),
        ("area_um2", pa.float32()),
        ("region", pa.string()),
    ]
)


def truth_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(image, truth parquet, truth geojson) for out = DIR/NAME.ome.tif."""
    out = Path(out)
    name = out.name
    for suf in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    return out, out.with_name(name + ".truth.parquet"), out.with_name(name + ".truth.geojson")


def level_sizes(size: int) -> list[int]:
    """Level sizes (px): halve until ≤ 1024 px, at least two levels."""
    sizes = [int(size)]
    while sizes[-1] > 1024 or len(sizes) < 2:
        if sizes[-1] <= 1:
            break
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def _table(nuc: dict) -> pa.Table:
    area = (np.pi * nuc["a"].astype(np.float64) * nuc["b"]).astype(np.float32)
    return pa.table(
        [
            pa.array(nuc["id"], pa.int32()),
            pa.array(nuc["x"], pa.float64()),
            pa.array(nuc["y"], pa.float64()),
            pa.array(sc.STYLE_TYPE[nuc["style"]], pa.string()),
            pa.array(area, pa.float32()),
            pa.array(sc.REGIONS[nuc["region"]], pa.string()),
        ],
        schema=TRUTH_SCHEMA,
    )


def _row_nuclei(scene, j: int) -> dict:
    parts = [sc.block_nuclei(scene, i, j) for i in range(scene.n_blocks)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _tiles(scene, size: int, ds: int, tile: int, after_row=None, pool=None):
    """Yield the tiles of one level, row by row; ``after_row(y1_um)`` after each tile row.

    With a thread ``pool`` a few tiles are rendered ahead (bounded), in the same order.
    """
    nty = math.ceil(size / tile)
    ntx = math.ceil(size / tile)
    coords = [(tx, ty) for ty in range(nty) for tx in range(ntx)]

    def one(c):
        return render_tile(scene, c[0] * tile, c[1] * tile, tile, tile, ds)

    ahead: deque = deque()
    nxt = 0
    for tx, ty in coords:
        if pool is None:
            yield one((tx, ty))
        else:
            while nxt < len(coords) and len(ahead) < 2 * pool._max_workers:
                ahead.append(pool.submit(one, coords[nxt]))
                nxt += 1
            yield ahead.popleft().result()
        if tx == ntx - 1 and after_row is not None:
            after_row((ty + 1) * tile * ds * scene.mpp)


def truth_geojson(scene) -> dict:
    """FeatureCollection of the scene's structures (polygons in µm): what NAME.truth.geojson holds."""
    feats = []
    tissue = []
    for pi, b in enumerate(scene.pieces):
        poly = b.polygon(720)
        tissue.append(poly)
        feats.append(_feature(poly, dict(kind="tissue", piece=pi)))
    union = shapely.union_all(tissue)
    for lin in scene.linings:
        poly = _lining_polygon(scene.pieces[lin.piece], lin).intersection(union)
        for part in getattr(poly, "geoms", [poly]):
            if part.geom_type == "Polygon" and part.area > 1:
                feats.append(
                    _feature(
                        part,
                        dict(kind="lining", piece=lin.piece, layers=lin.layers, thickness_um=round(lin.thickness, 1)),
                    )
                )
    for si, s in enumerate(scene.structures):
        full = s.blob.polygon(256)
        poly = full.intersection(union)
        if poly.is_empty:
            continue
        if poly.geom_type != "Polygon":
            parts = [g for g in getattr(poly, "geoms", []) if g.geom_type == "Polygon"]
            if not parts:
                continue
            poly = max(parts, key=lambda g: g.area)
        props = dict(kind=s.kind, id=si, edge_truncated=bool(poly.area < 0.995 * full.area))
        if s.kind == "follicle":
            props["has_gc"] = bool(s.has_gc)
        elif s.kind == "germinal_centre":
            props["follicle"] = s.parent
        else:
            props["grade"] = int(s.grade)
            props["layers"] = float(s.layers)
        feats.append(_feature(poly, props))
    return dict(
        type="FeatureCollection",
        properties=dict(
            kind=scene.kind,
            seed=scene.seed,
            size_px=scene.size,
            mpp=scene.mpp,
            units="µm",
            section=scene.params.get("section", 0),
            treatment=scene.params.get("treatment"),
        ),
        features=feats,
    )


def _feature(poly: Polygon, props: dict) -> dict:
    poly = shapely.set_precision(shapely.make_valid(poly), 0.01)
    if poly.geom_type != "Polygon":
        parts = [g for g in getattr(poly, "geoms", []) if g.geom_type == "Polygon"]
        poly = max(parts, key=lambda g: g.area)
    poly = shapely.geometry.polygon.orient(poly)
    return dict(type="Feature", geometry=mapping(poly), properties=props)


def _lining_polygon(b, lin) -> Polygon:
    """The lining band: outline to ``thickness`` µm deep along the lining's arc."""
    th = lin.a0 + np.linspace(0, lin.span, max(16, int(lin.span / (2 * np.pi) * 720)))
    rn = b.radius_n(th)
    scale = np.hypot(b.ax * np.cos(th), b.ay * np.sin(th))
    c, s = np.cos(b.rot), np.sin(b.rot)

    def pts(r):
        u, v = r * np.cos(th) * b.ax, r * np.sin(th) * b.ay
        return np.stack([b.cx + u * c - v * s, b.cy + u * s + v * c], 1)

    outer = pts(rn)
    inner = pts(np.maximum(rn - lin.thickness / scale, 0.05))
    return shapely.make_valid(Polygon(np.concatenate([outer, inner[::-1]])))


def write_sample(
    kind: str,
    out,
    size: int = 4096,
    seed: int = 0,
    mpp: float = 0.5,
    tile: int = 512,
    workers: int | None = None,
    section: int = 0,
    treatment: str | None = None,
) -> dict:
    """Write a synthetic ``kind`` slide to ``out`` (DIR/NAME.ome.tif) with its truth files.

    Writes the pyramidal OME-TIFF (RGB, JPEG q90 tiles of ``tile`` px, level 0 ``size``² px at
    ``mpp`` µm/px, levels halved down to ≤ 1024 px as SubIFDs), NAME.truth.parquet (one row per
    nucleus: id, x_um, y_um, cell_type, area_um2, region) and NAME.truth.geojson (structures, µm).
    Returns dict(image, truth, geojson, n_nuclei, levels=[(w, h), ...], mpp, kind, seed).
    ``workers`` > 1 renders tiles in threads (same output; on a busy 2-core machine 1 was faster).
    ``section`` and ``treatment`` (``"belimumab"``): another section of the same tissue, a built-in
    treatment effect (:func:`histo_sample.scene.make_scene`).
    """
    import tifffile

    scene = sc.make_scene(kind, size, seed, mpp, section, treatment)
    img, truth, gj = truth_paths(out)
    img.parent.mkdir(parents=True, exist_ok=True)
    sizes = level_sizes(size)
    n_done = [0, 0]  # block rows written, nuclei written
    writer = pq.ParquetWriter(truth, TRUTH_SCHEMA, compression="zstd")

    def flush(y1_um):
        nb = scene.n_blocks
        while n_done[0] < nb and ((n_done[0] + 1) * sc.BLOCK_UM <= y1_um + 1e-9 or y1_um >= scene.height_um):
            nuc = _row_nuclei(scene, n_done[0])
            if nuc["x"].size:
                writer.write_table(_table(nuc))
            n_done[1] += int(nuc["x"].size)
            n_done[0] += 1

    opts = dict(
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs=dict(level=90),
        resolutionunit="CENTIMETER",
    )
    est = size * size * 3 * 0.15 * 1.34
    n_workers = 1 if workers is None else max(1, int(workers))
    pool = ThreadPoolExecutor(n_workers) if n_workers > 1 else None
    try:
        with tifffile.TiffWriter(img, bigtiff=est > 3.5e9, ome=True) as tif:
            tif.write(
                _tiles(scene, size, 1, tile, flush, pool),
                shape=(size, size, 3),
                subifds=len(sizes) - 1,
                resolution=(1e4 / mpp, 1e4 / mpp),
                metadata={
                    "axes": "YXS",
                    "PhysicalSizeX": mpp,
                    "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeY": mpp,
                    "PhysicalSizeYUnit": "µm",
                    "Name": img.name,
                },
                **opts,
            )
            flush(scene.height_um)
            for k, s in enumerate(sizes[1:], 1):
                ds = 2**k
                tif.write(
                    _tiles(scene, s, ds, tile, None, pool),
                    shape=(s, s, 3),
                    subfiletype=1,
                    resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                    **opts,
                )
    finally:
        writer.close()
        if pool is not None:
            pool.shutdown()
    gj.write_text(json.dumps(truth_geojson(scene), ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    return dict(
        image=str(img),
        truth=str(truth),
        geojson=str(gj),
        n_nuclei=n_done[1],
        levels=[(s, s) for s in sizes],
        mpp=mpp,
        kind=kind,
        seed=int(seed),
    )
