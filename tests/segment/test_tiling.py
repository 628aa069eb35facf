import numpy as np

from histo.segment.nuclei import border_duplicates, cell_ids, polygon_area, tile_cells
from histo.segment.tiling import ALIGN, CONTEXT_PX, Tile, halo_px, pixels_read, tile_grid


def test_cores_partition_the_image():
    tiles = tile_grid((1000, 2500), 512, 40)
    owner = np.zeros((1000, 2500), int)
    for t in tiles:
        owner[t.y0 : t.y1, t.x0 : t.x1] += 1
        x, y, w, h = t.read_box
        assert x % ALIGN == 0 and y % ALIGN == 0 and t.halo == 48
        # core + halo, clipped to the image: nothing read past its edge
        assert (x, y) == (max(t.x0 - 48, 0), max(t.y0 - 48, 0))
        assert (x + w, y + h) == (min(t.x1 + 48, 2500), min(t.y1 + 48, 1000))
    assert (owner == 1).all()


def test_only_tissue_tiles_are_kept():
    mask = np.zeros((10, 10), bool)
    mask[2, 2] = True  # one mask px = 100 grid px: covers grid px 200..300
    tiles = tile_grid((1000, 1000), 256, 32, mask, mask_scale=100)
    assert {(t.row, t.col) for t in tiles} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert tile_grid((1000, 1000), 256, 32, np.zeros((10, 10), bool), 100) == []


def test_tiles_segment_only_near_their_tissue():
    """A speck of tissue in one corner of a tile: that tile reads and keeps only the speck grown by the
    halo (aligned), not its whole core; the cores still partition the image for the label image."""
    mask = np.zeros((10, 10), bool)
    mask[1, 1] = True  # grid px 100..200 (one mask px = 100 grid px)
    (tile,) = tile_grid((1000, 1000), 512, 32, mask, mask_scale=100)
    assert (tile.x0, tile.y0, tile.x1, tile.y1) == (0, 0, 512, 512)
    assert tile.box == (64, 64, 240, 240)  # 100 - 32 → 64 (aligned down), 200 + 32 → 240 (aligned up)
    assert tile.read_box == (32, 32, 240, 240)
    assert tile.owns(np.array([70, 60, 239, 240]), np.full(4, 100)).tolist() == [True, False, True, False]
    full = tile_grid((1000, 1000), 512, 32, np.ones((10, 10), bool), mask_scale=100)
    assert all(t.own is None for t in full) and len(full) == 4
    # what run.json reports: the speck's read box (halo included) and the part it keeps
    assert pixels_read([tile]) == (240 * 240, 176 * 176)
    read, kept = pixels_read(full)
    assert kept == 1000 * 1000 and read == sum(w * h for _, _, w, h in (t.read_box for t in full)) > kept


def test_ownership_is_half_open():
    t = Tile(1, 1, 256, 256, 512, 512, 32)
    x = np.array([256, 511, 512, 255])
    assert t.owns(x, np.full(4, 300)).tolist() == [True, True, False, False]


def _discs(points, r=5.0, n_rays=32):
    ang = np.linspace(0, 2 * np.pi, n_rays, endpoint=False)
    pts = np.asarray(points, float)
    return np.stack([pts[:, :1] + r * np.sin(ang), pts[:, 1:] + r * np.cos(ang)], axis=1)


def test_tile_cells_keeps_core_nuclei_in_um():
    tile = Tile(0, 1, 1024, 0, 2048, 1024, 64, 4096, 4096)  # read box starts at x = 960, y = 0 (the top edge)
    points = np.array([[164, 164], [164, 1100], [1100, 500]])  # (y, x) in read-box px
    table = tile_cells(_discs(points), points, np.array([0.9, 0.8, 0.7]), tile, mpp=0.5, grid_width=4096)
    # read-box (164, 164) -> grid (164, 1124) is in the core; x = 2060 and y = 1100 are not
    assert len(table) == 1
    row = table.iloc[0]
    assert row.cell_id == 164 * 4096 + 1124 and row.prob == np.float32(0.9)
    assert abs(row.x_um - (1124 + 0.5) * 0.5) < 1e-6 and abs(row.y_um - (164 + 0.5) * 0.5) < 1e-6
    assert abs(row.area_um2 - polygon_area(_discs(points[:1]))[0] * 0.25) < 1e-3
    assert abs(row.area_um2 - np.pi * 2.5**2) < 0.5


def test_empty_tile_has_the_columns():
    table = tile_cells(np.zeros((0, 2, 32)), np.zeros((0, 2)), np.zeros(0), Tile(0, 0, 0, 0, 64, 64, 16), 0.5, 64)
    assert len(table) == 0 and {"cell_id", "x_um", "y_um", "polygon", "area_um2", "prob"} <= set(table.columns)


def test_cell_ids_are_unique_per_centre():
    pts = np.array([[0, 0], [0, 1], [1, 0]])
    assert len(set(cell_ids(pts, 10))) == 3


def test_id_centres_invert_cell_ids():
    from histo.segment.nuclei import id_centres_um

    pts = np.array([[3, 7], [0, 0], [9, 1]])  # (y, x) grid px
    xy = id_centres_um(cell_ids(pts, 10), 10, 0.5)
    assert np.allclose(xy, (pts[:, ::-1] + 0.5) * 0.5)


def test_border_duplicates_drop_the_weaker_copy_from_another_tile():
    xy = np.array([[10.0, 10.0], [10.8, 10.3], [50.0, 50.0], [50.5, 50.0], [90.0, 90.0]])
    prob = np.array([0.9, 0.95, 0.8, 0.7, 0.99])
    tile = np.array([0, 1, 2, 2, 3])  # the pair at 50 µm lies in one tile: two nuclei, both kept
    assert border_duplicates(xy, prob, tile).tolist() == [True, False, False, False, False]
    assert not border_duplicates(xy[:1], prob[:1], tile[:1]).any()


def test_halo_is_the_context_or_the_largest_nucleus_radius():
    # 25 µm nuclei at 0.25 µm/px reach 50 px past a tile's box: the 64 px of context is wider
    assert halo_px(25.0, 0.25) == CONTEXT_PX == 64
    # 60 µm nuclei reach 30 µm = 120 px, aligned up to 128; at 0.5 µm/px 60 px → 64
    assert halo_px(60.0, 0.25) == 128 and halo_px(60.0, 0.5) == 64
    # the workflow's halo_um wins, aligned up
    assert halo_px(25.0, 0.25, halo_um=28.0) == 112 and halo_px(60.0, 0.25, halo_um=0.0) == 0
