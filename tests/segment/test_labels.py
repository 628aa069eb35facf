"""The label rasteriser: pixel centres inside a polygon get its label, later polygons on top."""

from __future__ import annotations

import numpy as np
import shapely
from skimage.draw import polygon as skimage_polygon

from histo.segment.labels import rasterise


def test_pixel_centres_inside_and_later_on_top():
    square = shapely.box(0.0, 0.0, 4.0, 4.0)  # µm; at 1 µm/px the centres 0.5 … 3.5 are inside
    shifted = shapely.box(2.0, 2.0, 6.0, 6.0)
    out = rasterise(np.array([square, shifted]), np.array([7, 9]), 1.0, (0, 0), (8, 8))
    expected = np.zeros((8, 8), np.int32)
    expected[:4, :4] = 7
    expected[2:6, 2:6] = 9
    assert np.array_equal(out, expected)
    # a chunk whose top-left is grid px (x=3, y=1) sees the same pixels
    assert np.array_equal(
        rasterise(np.array([square, shifted]), np.array([7, 9]), 1.0, (3, 1), (5, 5)), expected[1:6, 3:8]
    )
    # half the pixel size: the square covers 8 × 8 px
    assert (rasterise(np.array([square]), np.array([1]), 0.5, (0, 0), (10, 10)) == 1).sum() == 64


def test_matches_skimage_away_from_ties():
    """Random star-shaped polygons with non-integer vertices: the same pixels as skimage.draw.polygon."""
    rng = np.random.default_rng(0)
    polys = []
    for _ in range(50):
        angles = np.sort(rng.uniform(0, 2 * np.pi, 24))
        radii = rng.uniform(3, 12, 24)
        cx, cy = rng.uniform(10, 90, 2)
        polys.append(shapely.Polygon(np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)] + 0.123))
    out = rasterise(np.array(polys), np.arange(1, 51), 1.0, (0, 0), (100, 100))
    expected = np.zeros((100, 100), np.int32)
    for label, poly in enumerate(polys, 1):
        xy = shapely.get_coordinates(poly.exterior) - 0.5
        rr, cc = skimage_polygon(xy[:, 1], xy[:, 0], shape=expected.shape)
        expected[rr, cc] = label
    assert np.array_equal(out, expected)


def test_empty():
    assert not rasterise(np.array([]), np.array([]), 1.0, (0, 0), (3, 4)).any()


def test_pyramid_is_valid_ngff_labels(tmp_path):
    """OME-NGFF 0.5 label image: ome-zarr-models accepts it, ome-zarr-py reads it as labels; pixel centres
    at ((2ᵏi + ½)·mpp) µm on every level (nearest-neighbour levels)."""
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from ome_zarr_models.v05.image_label import ImageLabel

    from histo.segment.labels import create_pyramid, downsample_level

    path = tmp_path / "labels.ome.zarr"
    arrays = create_pyramid(path, (1500, 1100), 512, 0.5)
    arrays[0][3:5, 7:9] = 4
    for level in range(1, len(arrays)):
        downsample_level(str(path), level, slice(0, arrays[level].shape[0]), slice(0, arrays[level].shape[1]))
    group = zarr.open_group(str(path), mode="r")
    model = ImageLabel.from_zarr(group)  # raises on invalid metadata or arrays without dimension_names
    assert model.attributes.ome.image_label is not None
    assert all(group[str(k)].metadata.dimension_names == ("y", "x") for k in range(len(arrays)))
    datasets = model.attributes.ome.multiscales[0].datasets
    assert len(datasets) == len(arrays) == 3
    for k, ds in enumerate(datasets):
        scale, translation = ds.coordinateTransformations
        assert list(scale.scale) == [0.5 * 2**k] * 2 and list(translation.translation) == [0.25, 0.25]
    # level 1 pixel (2, 4) is level 0 pixel (4, 8): its centre 4 · 1.0 + 0.25 = 4.25 µm = (8 + ½) · 0.5
    assert group["1"][2, 4] == 4
    node = next(iter(Reader(parse_url(str(path)))()))
    assert any(isinstance(spec, Label) for spec in node.specs)
