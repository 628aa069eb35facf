"""The finish's work begun while the tiles run (histo.run.pipeline.EarlyFinish, read_cells): the same
cells table as reading every part at the end, and the nucleus-free work done in its thread."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histo.io.bundle import file_fingerprint, read_parts
from histo.run.pipeline import EarlyFinish, part_columns, read_cells
from histo.segment.tiling import tile_grid

SCHEMA = pa.schema([("cell_id", pa.int64()), ("x_um", pa.float64()), ("polygon", pa.binary()), ("tile", pa.string())])


class FakeSlide:
    shape, mpp = (400, 600), 0.5

    def thumbnail(self, mpp):
        return np.full((40, 60, 3), 200, np.uint8)


def _plan(tmp_path, n_tiles=4):
    tiles = tile_grid((200, 200 * n_tiles), 200, 16)
    parts = tmp_path / "parts"
    parts.mkdir()
    for k, tile in enumerate(tiles):  # one tile without nuclei
        n = 0 if k == 1 else k + 2
        table = {"cell_id": list(range(10 * k, 10 * k + n)), "x_um": [float(k)] * n, "polygon": [b"p"] * n}
        pq.write_table(pa.table({**table, "tile": [tile.name] * n}, schema=SCHEMA), parts / f"{tile.name}.parquet")
    slide_file = tmp_path / "slide.tif"
    slide_file.write_bytes(b"not really a slide")
    job = SimpleNamespace(parts_dir=str(parts), schema=SCHEMA)
    return SimpleNamespace(job=job, tiles=tiles, early=None, slide_path=slide_file, slide=FakeSlide())


def test_cells_read_as_tiles_finish_equal_the_parts_read_at_the_end(tmp_path):
    plan = _plan(tmp_path)
    columns = part_columns(plan.job)
    assert columns == ["cell_id", "x_um"]
    at_end, index_at_end = read_parts(tmp_path / "parts", plan.tiles, columns)
    plan.early = EarlyFinish(plan)
    for tile in (plan.tiles[2], plan.tiles[1], plan.tiles[0]):  # out of order, one left to read at the end
        plan.early.tile_done(tile.name)
    cells, tile_index = read_cells(plan)
    pd.testing.assert_frame_equal(cells, at_end)
    assert (tile_index == index_at_end).all() and not plan.early.parts  # handed over, not kept twice
    input_info, (thumb, thumb_mpp), unreadable = plan.early.nucleus_free()
    assert input_info["sha256"] == file_fingerprint(plan.slide_path)["sha256"]
    assert thumb.shape == (40, 60, 3) and thumb_mpp == 600 * 0.5 / 60 and unreadable == []


def test_without_early_finish_every_part_is_read_from_disk(tmp_path):
    plan = _plan(tmp_path)
    cells, tile_index = read_cells(plan)
    at_end, index_at_end = read_parts(tmp_path / "parts", plan.tiles, part_columns(plan.job))
    pd.testing.assert_frame_equal(cells, at_end)
    assert (tile_index == index_at_end).all()


def test_an_error_in_the_early_thread_is_raised_by_the_finish(tmp_path):
    plan = _plan(tmp_path)
    plan.slide_path = tmp_path / "gone.tif"
    with pytest.raises(FileNotFoundError):
        EarlyFinish(plan).nucleus_free()
