"""Bundle exports: regions.geojson for QuPath, annotation import, cells.h5ad, overview.png, report.html."""

from __future__ import annotations

import json
import re
import uuid

import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile
from helpers import histo
from PIL import Image
from shapely.geometry import box, shape

from histo.errors import HistoError
from histo.io.annotations import import_annotations
from histo.outputs.export import cells_geojson, regions_geojson, write_h5ad, write_regions_geojson
from histo.outputs.report import overview_figure, write_report
from histo.structures.metrics import region_metrics
from histo.structures.regions import assign_cells, find_regions

MPP = 0.5


def _strict(text: str):
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=no_constants)


@pytest.fixture(scope="module")
def synovium_truth_outputs(generated):
    slide = generated("synovium", 4096, 2)
    cells = pd.read_parquet(str(slide).replace(".ome.tif", ".truth.parquet")).rename(columns={"id": "cell_id"})
    feats = json.loads(open(str(slide).replace(".ome.tif", ".truth.geojson"), encoding="utf-8").read())["features"]
    pieces = [shape(f["geometry"]) for f in feats if f["properties"]["kind"] == "tissue"]
    regions = find_regions(cells, pieces, "synovium")
    cells = pd.concat([cells, assign_cells(cells, regions)], axis=1)
    with tifffile.TiffFile(slide) as tif:
        thumb = tif.series[0].levels[-1].asarray()
    return slide, cells, regions, region_metrics(cells, regions, "synovium"), thumb, 4096 * MPP / thumb.shape[1]


def test_regions_geojson_is_a_qupath_feature_collection(synovium_truth_outputs, tmp_path):
    _, _, regions, metrics, *_ = synovium_truth_outputs
    path = write_regions_geojson(regions, tmp_path / "regions.geojson", MPP, metrics)
    data = _strict(path.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(regions)
    for feat, rec in zip(data["features"], regions.itertuples()):
        props = feat["properties"]
        assert feat["type"] == "Feature" and props["objectType"] == "annotation"
        assert props["kind"] == rec.kind == props["classification"]["name"] and props["region_id"] == rec.region_id
        assert len(props["classification"]["color"]) == 3 and all(
            isinstance(v, int) for v in props["classification"]["color"]
        )
        assert all(isinstance(v, float) for v in props["measurements"].values())
        assert props["measurements"]["area_um2"] == pytest.approx(rec.area_um2)
        px = shape(feat["geometry"])
        assert px.is_valid and px.geom_type in ("Polygon", "MultiPolygon")
        assert px.area * MPP**2 == pytest.approx(rec.geometry.area, rel=1e-3)  # level-0 pixels
        um = shapely.from_wkt(props["geometry_um"])  # snapped to 0.01 µm, kept valid
        assert um.is_valid and shapely.hausdorff_distance(um, rec.geometry) < 0.02
        assert props["metadata"]["region_id"] == rec.region_id and props["metadata"]["kind"] == rec.kind
        assert all(isinstance(v, str) for v in props["metadata"].values())  # QuPath keeps string metadata
    ids = [uuid.UUID(f["id"]) for f in data["features"]]  # QuPath ≥ 0.4 takes the Feature's id as its UUID
    assert len(set(ids)) == len(ids)
    aggregate = next(f["properties"] for f in data["features"] if f["properties"]["kind"] == "aggregate")
    assert {"grade", "radial_layers", "n_cells", "density_lymphocyte_per_mm2"} <= set(aggregate["measurements"])
    lining = next(f["properties"] for f in data["features"] if f["properties"]["kind"] == "lining")
    assert {"layers_median", "thickness_median_um", "krenn_lining"} <= set(lining["measurements"])
    assert [f["id"] for f in regions_geojson(regions, MPP)["features"]] == [str(i) for i in ids]  # stable


def test_cells_as_qupath_detections(synovium_truth_outputs, tmp_path):
    from histo.outputs.report import type_colors

    cells = synovium_truth_outputs[1].head(500).copy()
    cells["polygon"] = [shapely.to_wkb(shapely.Point(x, y).buffer(3)) for x, y in zip(cells.x_um, cells.y_um)]
    cells["label"] = np.arange(1, len(cells) + 1)
    cells["area_um2"] = shapely.area(shapely.from_wkb(cells.polygon))
    colors = type_colors(cells)
    data = _strict(json.dumps(cells_geojson(cells, MPP, colors)))
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(cells)
    for feat, rec in zip(data["features"], cells.itertuples()):
        props = feat["properties"]
        assert feat["type"] == "Feature" and uuid.UUID(feat["id"]) and props["objectType"] == "detection"
        assert props["classification"]["name"] == rec.cell_type
        assert "#{:02x}{:02x}{:02x}".format(*props["classification"]["color"]) == colors[rec.cell_type].lower()
        assert props["metadata"] == {"cell_id": str(rec.cell_id), "label": str(rec.label)}
        assert props["measurements"]["area_um2"] == pytest.approx(rec.area_um2)
        assert "x_um" not in props["measurements"] and "label" not in props["measurements"]
        px = shape(feat["geometry"])  # level-0 pixels
        assert px.centroid.distance(shapely.Point(rec.x_um / MPP, rec.y_um / MPP)) < 0.05
    assert len({f["id"] for f in data["features"]}) == len(cells)


def test_annotations_round_trip(synovium_truth_outputs, tmp_path):
    _, _, regions, *_ = synovium_truth_outputs
    data = regions_geojson(regions[regions.kind == "aggregate"].head(2), MPP)
    data["features"][0]["properties"]["classification"] = {"name": "Synovium ROI", "color": [1, 2, 3]}
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(data["features"]))  # QuPath may also export a plain list of features
    ann = import_annotations(path, MPP)
    assert list(ann.region_id) == ["annotation-1", "annotation-2"] and set(ann.kind) == {"annotation"}
    assert ann.name.iloc[0] == "Synovium ROI"
    original = regions[regions.kind == "aggregate"].geometry.iloc[0]
    assert ann.geometry.iloc[0].symmetric_difference(original).area < 1e-3 * original.area
    both = pd.concat([regions, ann], ignore_index=True)
    ids = assign_cells(synovium_truth_outputs[1], both)
    assert (ids.annotation_id == "annotation-1").sum() == (ids.aggregate_id == "aggregate-1").sum() > 0


def _features(*geometries):
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": g,
                "properties": {"objectType": "annotation", "classification": {"name": "ROI"}},
            }
            for g in geometries
        ],
    }


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]}
BOWTIE = {"type": "Polygon", "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]}


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a GeoJSON file: invalid JSON at line 1"),
        (json.dumps({"rois": []}), "not GeoJSON annotations"),
        (json.dumps(_features(SQUARE, SQUARE, BOWTIE)), "feature 3 of 3: self-intersecting polygon"),
        (
            json.dumps(_features(SQUARE, {"type": "Point", "coordinates": [1, 2]})),
            "feature 2 of 2: a Point is not an area",
        ),
        (
            json.dumps(_features({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})),
            "feature 1 of 1: invalid Polygon coordinates",
        ),
        (json.dumps(_features(None)), "feature 1 of 1: no geometry"),
    ],
)
def test_bad_annotations_name_the_file_and_feature(tmp_path, content, message):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(HistoError, match=message) as err:
        import_annotations(path, MPP)
    assert err.value.path == str(path) and str(path) in str(err.value)
    with pytest.raises(HistoError, match="cannot read"):
        import_annotations(tmp_path / "missing.geojson", MPP)


def test_detections_are_not_imported(tmp_path):
    data = _features(SQUARE, SQUARE)
    data["features"][1]["properties"]["objectType"] = "detection"
    (tmp_path / "a.geojson").write_text(json.dumps(data))
    ann = import_annotations(tmp_path / "a.geojson", MPP)
    assert len(ann) == 1 and ann.geometry.iloc[0].equals(box(0, 0, 50, 50)) and ann.area_um2.iloc[0] == 2500


def test_h5ad_opens_in_anndata_and_squidpy(synovium_truth_outputs, tmp_path):
    import anndata as ad
    import squidpy as sq

    cells = synovium_truth_outputs[1].head(3000).copy()
    cells["polygon"] = [shapely.to_wkb(shapely.Point(x, y).buffer(3)) for x, y in zip(cells.x_um, cells.y_um)]
    path = write_h5ad(cells, tmp_path / "cells.h5ad", uns={"slide": "synovium-2", "histo": {"workflow": "synovium-he"}})
    adata = ad.read_h5ad(path)
    assert adata.n_obs == len(cells) and "polygon" not in adata.obs
    assert np.allclose(adata.obsm["spatial"], cells[["x_um", "y_um"]].to_numpy())
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert "area_um2" in adata.var_names and "x_um" not in adata.var_names
    assert adata.uns["slide"] == "synovium-2" and adata.uns["histo"]["spatial_units"] == "um"
    assert adata.uns["histo"]["workflow"] == "synovium-he"  # the caller's histo entries are kept
    assert list(adata.obs_names[:3]) == [str(v) for v in cells.cell_id[:3]]
    sq.gr.spatial_neighbors_delaunay(adata)
    assert adata.obsp["spatial_connectivities"].shape == (len(cells), len(cells))
    assert adata.obsp["spatial_connectivities"].nnz > 4 * len(cells)


def test_h5ad_statistics_plot_with_squidpy(synovium_truth_outputs, tmp_path):
    """The slide's statistics under squidpy's keys: sq.pl plots them; colours as the report draws them."""
    import anndata as ad
    import matplotlib
    import squidpy as sq

    from histo.outputs.report import type_colors
    from histo.stats.neighbourhood import neighbourhood_stats
    from histo.workflow import load_workflow

    matplotlib.use("Agg")
    cells = synovium_truth_outputs[1].head(3000).copy()
    nhood = neighbourhood_stats(cells, load_workflow("synovium-he").neighbourhood)
    adata = ad.read_h5ad(write_h5ad(cells, tmp_path / "cells.h5ad", uns={"neighbourhood": nhood}))
    types = list(adata.obs["cell_type"].cat.categories)
    assert types == list(nhood["cell_types"]) and len(types) >= 2
    colors = type_colors(cells)
    assert list(adata.uns["cell_type_colors"]) == [colors[t] for t in types]
    assert adata.uns["units"]["spatial"] == "µm" and adata.uns["units"]["area_um2"] == "µm²"
    slide = nhood["regions"]["slide"]
    assert np.allclose(adata.uns["cell_type_nhood_enrichment"]["zscore"], slide["nhood_zscore"], equal_nan=True)
    assert list(adata.uns["moranI"].index) == list(slide["moran_features"])
    sq.pl.nhood_enrichment(adata, cluster_key="cell_type")
    sq.pl.interaction_matrix(adata, cluster_key="cell_type")
    sq.pl.centrality_scores(adata, cluster_key="cell_type")
    sq.pl.co_occurrence(adata, cluster_key="cell_type", clusters=types[0])
    sq.pl.ripley(adata, cluster_key="cell_type", mode="L")
    matplotlib.pyplot.close("all")


def test_overview_and_report(synovium_truth_outputs, tmp_path):
    slide, cells, regions, metrics, thumb, thumb_mpp = synovium_truth_outputs
    png = tmp_path / "overview.png"
    png.write_bytes(overview_figure(thumb, thumb_mpp, regions, cells))
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 800
        assert np.asarray(img.convert("RGB")).std() > 10
    report = write_report(tmp_path / "report.html", slide.name, thumb, thumb_mpp, regions, cells, metrics, "synovium")
    text = report.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 2
    assert "http" not in re.sub(r"base64,[A-Za-z0-9+/=]+", "", text)  # self-contained: nothing fetched
    assert "aggregate-1" in text and "krenn_sum" in text and "Lining" in text


@pytest.fixture(scope="module")
def small_bundle(synovium_truth_outputs, tmp_path_factory):
    """A bundle folder made from the generated truth (nuclei as 3 µm discs): what ``histo export`` reads."""
    from histo.segment.labels import create_pyramid, downsample_level, rasterise

    slide, cells, regions, metrics, *_ = synovium_truth_outputs
    folder = tmp_path_factory.mktemp("bundle") / "synovium-2"
    folder.mkdir()
    x0, y0 = cells.x_um.median() - 300, cells.y_um.median() - 300  # a 600 µm square of tissue, moved to 0, 0
    cells = cells[cells.x_um.between(x0 + 5, x0 + 595) & cells.y_um.between(y0 + 5, y0 + 595)].copy()
    cells["x_um"] -= x0
    cells["y_um"] -= y0
    assert len(cells) > 100
    cells["polygon"] = [shapely.to_wkb(shapely.Point(x, y).buffer(3)) for x, y in zip(cells.x_um, cells.y_um)]
    cells["label"] = np.arange(1, len(cells) + 1)
    cells.to_parquet(folder / "cells.parquet")
    path = folder / "labels.ome.zarr"
    arrays = create_pyramid(path, (1200, 1200), 512, MPP)
    arrays[0][:] = rasterise(shapely.from_wkb(cells.polygon), cells.label.to_numpy(), MPP, (0, 0), (1200, 1200))
    for level in range(1, len(arrays)):
        downsample_level(str(path), level, slice(0, arrays[level].shape[0]), slice(0, arrays[level].shape[1]))
    write_regions_geojson(regions, folder / "regions.geojson", MPP, metrics)
    write_h5ad(cells, folder / "cells.h5ad")
    run = {"status": "complete", "input": {"path": str(slide), "mpp": MPP}, "parameters": {"grid_mpp": MPP}}
    (folder / "run.json").write_text(json.dumps(run))
    return folder, cells, regions


def test_spatialdata_store(small_bundle):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    from histo.outputs.spatialdata_store import write_spatialdata

    folder, cells, regions = small_bundle
    sdata = sd.read_zarr(write_spatialdata(folder))
    assert set(sdata.labels) == {"nuclei_labels"} and set(sdata.shapes) == {"nuclei", "regions"}
    labels = sdata.labels["nuclei_labels"]
    assert labels["scale0"]["image"].shape == (1200, 1200) and len(labels.children) == 3  # as labels.ome.zarr
    assert get_transformation(labels, "global").scale.tolist() == [MPP, MPP]
    nuclei = sdata.shapes["nuclei"]
    assert list(nuclei.index) == list(cells.label) and (nuclei.cell_type.to_numpy() == cells.cell_type.to_numpy()).all()
    assert shapely.equals_exact(nuclei.geometry.to_numpy(), shapely.from_wkb(cells.polygon.to_numpy()), 1e-9).all()
    shown = sdata.shapes["regions"]  # in regions.geojson's order, int ids (napari-spatialdata takes them as ints)
    assert list(shown.region_id) == list(regions.region_id) and list(shown.index) == list(range(1, len(regions) + 1))
    table = sdata.tables["cells"]
    attrs = {"region": "nuclei_labels", "region_key": "region", "instance_key": "label"}
    assert table.uns["spatialdata_attrs"] == attrs
    assert (table.obs["label"].to_numpy() == cells.label.to_numpy()).all()
    # a nucleus's label sits at its centre in the labels, read through the store's µm transform
    level0 = labels["scale0"]["image"].to_numpy()
    rows, cols = (cells.y_um / MPP).astype(int), (cells.x_um / MPP).astype(int)
    assert (level0[rows, cols] == cells.label.to_numpy()).mean() > 0.99
    assert sdata.attrs["histo"]["slide_mpp"] == MPP and sdata.attrs["histo"]["slide"].endswith(".ome.tif")


def test_export_command_writes_qupath_cells(small_bundle):
    folder, cells, _ = small_bundle
    done = histo("export", folder, "--qupath-cells")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {folder / 'cells.geojson'}" and done.stderr == ""
    data = _strict((folder / "cells.geojson").read_text(encoding="utf-8"))
    assert [f["properties"]["metadata"]["label"] for f in data["features"]] == [str(v) for v in cells.label]
