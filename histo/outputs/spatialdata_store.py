"""A bundle as a SpatialData store (``spatialdata.zarr``), for scverse tools and napari-spatialdata.

Elements, all built and validated by spatialdata's own models and written by ``SpatialData.write``:
``nuclei_labels`` (the label pyramid of ``labels.ome.zarr``, its levels made again by spatialdata from
level 0),
``nuclei`` (polygons of ``cells.parquet``, index = the nucleus's ``label``) and ``regions`` (of
``regions.geojson``, in its order, index 1…n, ``region_id`` a column: napari-spatialdata 0.7.2 takes a
shape's index as an int) as shapes, and ``cells`` (``cells.h5ad``) as the table that
annotates ``nuclei_labels`` (``region`` column, ``instance_key`` ``label``). Coordinate system
``global`` is in µm, origin at the slide's top-left: the labels map to it by their pixel size; shapes
are in µm already. The slide image is referenced, not copied: ``attrs["histo"]["slide"]`` (path and µm/px).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import dask.array as da
import geopandas as gpd
import pandas as pd
import shapely
import zarr

NAME = "spatialdata.zarr"
LABELS, NUCLEI, REGIONS, TABLE = "nuclei_labels", "nuclei", "regions", "cells"


def write_spatialdata(bundle: str | Path, out: str | Path | None = None) -> Path:
    """Write the SpatialData store of a finished ``bundle`` to ``out`` (default ``bundle/spatialdata.zarr``),
    replacing an earlier one; returns its path."""
    import spatialdata as sd
    from spatialdata.models import Labels2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    bundle = Path(bundle)
    out = Path(out) if out else bundle / NAME
    run = json.loads((bundle / "run.json").read_text(encoding="utf-8"))
    mpp = float(run["parameters"]["grid_mpp"])
    root = zarr.open_group(str(bundle / "labels.ome.zarr"), mode="r")
    level0 = da.from_zarr(root["0"])
    n_levels = len(list(root.array_keys()))
    to_um = {"global": Scale([mpp, mpp], axes=("y", "x"))}
    labels = Labels2DModel.parse(
        level0,
        dims=("y", "x"),
        scale_factors=[2] * (n_levels - 1) or None,
        chunks=root["0"].chunks,
        transformations=to_um,
    )

    cells = pd.read_parquet(bundle / "cells.parquet", columns=["label", "polygon", "cell_type"])
    nuclei = gpd.GeoDataFrame(
        {"cell_type": cells["cell_type"].astype(str).to_numpy()},
        geometry=shapely.from_wkb(cells["polygon"].to_numpy()),
        index=pd.Index(cells["label"].to_numpy(), name="label"),
    )
    features = json.loads((bundle / "regions.geojson").read_text(encoding="utf-8"))["features"]
    props = [f["properties"] for f in features]
    regions = gpd.GeoDataFrame(
        {key: [p[key] for p in props] for key in ("region_id", "kind", "name")},
        geometry=[shapely.from_wkt(p["geometry_um"]) for p in props],
        index=pd.RangeIndex(1, len(props) + 1, name="region_number"),  # napari-spatialdata needs int ids
    )

    table = ad.read_h5ad(bundle / "cells.h5ad")
    table.obs["region"] = pd.Categorical([LABELS] * table.n_obs)
    table.obs["label"] = table.obs["label"].astype("int64")
    if table.n_obs:
        table = TableModel.parse(table, region=LABELS, region_key="region", instance_key="label")

    identity = {"global": Identity()}
    shapes = {
        key: ShapesModel.parse(frame, transformations=identity)
        for key, frame in ((NUCLEI, nuclei), (REGIONS, regions))
        if len(frame)
    }  # a slide of glass has neither
    attrs = {"histo": {"slide": run["input"]["path"], "slide_mpp": run["input"]["mpp"], "units": "µm"}}
    sdata = sd.SpatialData(
        labels={LABELS: labels}, shapes=shapes, tables={TABLE: table} if table.n_obs else {}, attrs=attrs
    )
    if out.exists():
        shutil.rmtree(out)
    with warnings.catch_warnings():  # zarr warns of a coming default once per chunk written
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        sdata.write(out)
    return out
