"""Opening a bundle of N nuclei in napari: layer creation, first draw and panning times, and how much
of the label pyramid panning reads. Run under a display (``xvfb-run -a python bench/napari_bundle_open.py``).

The bundle is synthetic and cheap (no StarDist): nuclei are 3 µm discs on a jittered 10 µm grid,
written straight into ``labels.ome.zarr`` chunk by chunk (``histo.segment.labels``), with a cells table,
a tissue square with graded aggregates (``histo.structures.metrics`` measures them) and a ``run.json``.
The peer, measured in the same run, is the same bundle with N/10 nuclei: the last line prints
``creation_ratio`` (≈ 1 means layer creation does not grow with the number of nuclei).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import zarr

from histo.io.bundle import is_complete
from histo.outputs.export import write_metrics, write_regions_geojson
from histo.segment.labels import create_pyramid, downsample_level
from histo.structures.metrics import CELL_TYPES, region_metrics

SPACING_UM, RADIUS_UM, CHUNK = 10.0, 3.0, 1024


def make_bundle(folder: Path, n: int, mpp: float, seed: int = 0) -> Path:
    """A complete synthetic bundle of about ``n`` nuclei on a grid of ``mpp`` µm/px."""
    side = int(np.ceil(np.sqrt(n)))
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(-2, 2, (side, side, 2))
    size_um = side * SPACING_UM
    shape = (int(np.ceil(size_um / mpp)),) * 2
    folder.mkdir(parents=True, exist_ok=True)
    arrays = create_pyramid(folder / "labels.ome.zarr", shape, CHUNK, mpp)
    for r0 in range(0, shape[0], CHUNK):
        for c0 in range(0, shape[1], CHUNK):
            y = (np.arange(r0, min(r0 + CHUNK, shape[0])) + 0.5) * mpp
            x = (np.arange(c0, min(c0 + CHUNK, shape[1])) + 0.5) * mpp
            i = np.clip(np.floor(y / SPACING_UM).astype(int), 0, side - 1)[:, None]
            j = np.clip(np.floor(x / SPACING_UM).astype(int), 0, side - 1)[None, :]
            cy, cx = (i + 0.5) * SPACING_UM + jitter[i, j, 0], (j + 0.5) * SPACING_UM + jitter[i, j, 1]
            inside = (y[:, None] - cy) ** 2 + (x[None, :] - cx) ** 2 <= RADIUS_UM**2
            arrays[0][r0 : r0 + len(y), c0 : c0 + len(x)] = np.where(inside, i * side + j + 1, 0).astype(np.int32)
    for level in range(1, len(arrays)):
        h, w = arrays[level].shape
        for r in range(0, h, CHUNK):
            for c in range(0, w, CHUNK):
                downsample_level(
                    str(folder / "labels.ome.zarr"), level, slice(r, min(r + CHUNK, h)), slice(c, min(c + CHUNK, w))
                )
    ii, jj = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    cells = pd.DataFrame(
        {
            "label": (ii * side + jj + 1).ravel().astype(np.int32),
            "x_um": ((jj + 0.5) * SPACING_UM + jitter[..., 1]).ravel(),
            "y_um": ((ii + 0.5) * SPACING_UM + jitter[..., 0]).ravel(),
            "cell_type": pd.Categorical(rng.choice(CELL_TYPES, side * side)),
        }
    )
    cells.to_parquet(folder / "cells.parquet", index=False)
    tissue = shapely.box(0, 0, size_um, size_um)
    centres = rng.uniform(0.1 * size_um, 0.9 * size_um, (max(1, side // 30), 2))
    rows = [
        dict(
            region_id="tissue-1",
            kind="tissue",
            name="tissue",
            parent_id=None,
            tissue_id="tissue-1",
            area_um2=tissue.area,
            edge_truncated=False,
            geometry=tissue,
        )
    ]
    for k, (x, y) in enumerate(centres, 1):
        g = shapely.Point(x, y).buffer(60)
        rows.append(
            dict(
                region_id=f"aggregate-{k}",
                kind="aggregate",
                name="aggregate",
                parent_id="tissue-1",
                tissue_id="tissue-1",
                area_um2=g.area,
                edge_truncated=False,
                grade=1 + k % 3,
                geometry=g,
            )
        )
    regions = gpd.GeoDataFrame(rows, geometry="geometry")
    metrics = region_metrics(cells, regions, "synovium")
    write_regions_geojson(regions, folder / "regions.geojson", mpp, metrics)
    write_metrics(metrics, folder)
    run = {
        "status": "complete",
        "n_cells": len(cells),
        "input": {"path": str(folder / "absent-slide.ome.tif"), "size_bytes": 0, "shape_px": list(shape), "mpp": mpp},
        "parameters": {"grid_mpp": mpp, "grid_shape_px": list(shape)},
        "workflow": {"tissue_type": "synovium"},
    }
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_and_pan(viewer, bundle: Path, pans: int = 8) -> dict:
    """Seconds to create the layers, to draw the first frame and per pan at full resolution."""
    viewer.layers.clear()
    t = time.perf_counter()
    layers = viewer.open(str(bundle), plugin="napari-histo")
    created = time.perf_counter() - t
    t = time.perf_counter()
    viewer.screenshot(canvas_only=True, flash=False)
    first = time.perf_counter() - t
    size = np.asarray(layers[0].data[0].shape) * layers[0].scale
    rng = np.random.default_rng(1)
    times = []
    for _ in range(pans):
        viewer.camera.center, viewer.camera.zoom = tuple(rng.uniform(0.1, 0.9, 2) * size), 4.0  # 4 screen px per µm
        t = time.perf_counter()
        viewer.screenshot(canvas_only=True, flash=False)
        times.append(time.perf_counter() - t)
    return {
        "layers": [lyr.name for lyr in layers],
        "create_s": created,
        "first_draw_s": first,
        "pan_median_s": float(np.median(times)),
        "pan_max_s": float(np.max(times)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nuclei", type=int, default=1_000_000)
    ap.add_argument("--mpp", type=float, default=0.25, help="µm/px of the label grid (the model's)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the bundles (default: a new temporary one); bundles already there are reused",
    )
    args = ap.parse_args()
    import napari

    out = args.out or Path(tempfile.mkdtemp(prefix="napari-bench-"))
    results = {}
    for n in (args.nuclei // 10, args.nuclei):
        if is_complete(out / f"bundle-{n}"):
            print(f"reusing {out / f'bundle-{n}'}", flush=True)
            continue
        t = time.perf_counter()
        bundle = make_bundle(out / f"bundle-{n}", n, args.mpp)
        print(f"built {n:,} nuclei in {time.perf_counter() - t:.1f} s: {bundle}", flush=True)
    viewer = napari.Viewer(show=True)
    open_and_pan(viewer, out / f"bundle-{args.nuclei // 10}", pans=1)  # warm-up: imports, OpenGL
    for n in (args.nuclei // 10, args.nuclei):
        before = rss_mb()
        results[n] = r = open_and_pan(viewer, out / f"bundle-{n}")
        level0_mb = np.prod(zarr.open_array(str(out / f"bundle-{n}/labels.ome.zarr/0"), mode="r").shape) * 4 / 2**20
        print(
            f"{n:,} nuclei: layers {r['create_s']:.2f} s, first draw {r['first_draw_s']:.2f} s, "
            f"pan median {r['pan_median_s']:.2f} s (max {r['pan_max_s']:.2f}); peak RSS +{rss_mb() - before:.0f} MB "
            f"vs level 0 {level0_mb:.0f} MB in full",
            flush=True,
        )
    viewer.close()
    small, big = results[args.nuclei // 10], results[args.nuclei]
    print(
        f"creation_ratio={big['create_s'] / small['create_s']:.2f} "
        f"pan_ratio={big['pan_median_s'] / small['pan_median_s']:.2f}"
    )


if __name__ == "__main__":
    main()
