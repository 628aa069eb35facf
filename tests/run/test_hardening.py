"""Bad input, faults and safe defaults, tried on purpose (docs/HARDENING.md lists every case and the
test that proves it). Real TIFFs, real processes, a real Dask cluster; no mocks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import ROOT, assert_clean_error, histo, jpeg_claiming, lying_tiff, png_header
from scipy.spatial import cKDTree

from histo.errors import HistoError, SlideError, WorkflowError
from histo.io.annotations import import_annotations
from histo.io.bundle import OutputLock, check_same_input, file_fingerprint, is_complete, slide_name
from histo.io.slide import check_stain, open_slide, skip_unreadable_tiles
from histo.outputs.export import write_metrics
from histo.run.batch import read_input, run_batch, write_summary
from histo.run.pipeline import finish_slide, plan_slide, run_slide, submit_tiles
from histo.workflow import load_workflow

RNG = np.random.default_rng(7)


def tiled(path: Path, image: np.ndarray, **kw) -> Path:
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib", metadata=None, **kw)
    return path


def patch_tag(path: Path, tag: str, values: list[int]) -> None:
    """Overwrite the values of an offsets/counts tag of page 0 in place."""
    with tifffile.TiffFile(path) as tif:
        t = tif.pages[0].tags[tag]
        where, fmt = t.valueoffset, tif.byteorder + ("Q" if tif.is_bigtiff else "I")
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(b"".join(struct.pack(fmt, v) for v in values))


# ---- bad slide files ----------------------------------------------------------------------------


def test_wrong_tile_offsets(tmp_path):
    a = RNG.integers(0, 256, (256, 256, 3), np.uint8)
    past_end = tiled(tmp_path / "past.tif", a)
    size = past_end.stat().st_size
    with tifffile.TiffFile(past_end) as tif:
        offsets = list(tif.pages[0].dataoffsets)
    patch_tag(past_end, "TileOffsets", [offsets[0], size + 10, *offsets[2:]])
    with pytest.raises(SlideError, match=rf"past.tif: truncated: tile data runs to byte .* but the file has {size:,}"):
        open_slide(past_end, mpp=0.5)

    elsewhere = tiled(tmp_path / "moved.tif", a)  # tile 1 points at tile 2's bytes: decodes, wrong place
    patch_tag(elsewhere, "TileOffsets", [offsets[0], offsets[0] + 7, *offsets[2:]])
    s = open_slide(elsewhere, mpp=0.5)
    assert np.array_equal(s.read(0, 0, 128, 128, 0.5), a[:128, :128])
    with pytest.raises(SlideError, match=r"moved.tif: tile at level 0 128,0 unreadable"):
        s.read(0, 0, 256, 128, 0.5)


@pytest.mark.parametrize("fmt", ["svs", "ome.tif", "png", "jpg"])
def test_truncated_files_of_every_format(tmp_path, fmt):
    """Cut anywhere: the file opens and reads, or a SlideError names it (never another error)."""
    import imagecodecs

    a = RNG.integers(0, 256, (300, 260, 3), np.uint8)
    path = tmp_path / f"whole.{fmt}"
    if fmt == "svs":
        desc = "Aperio Image Library v12.0.0\r\n260x300 [0,0 260x300] (128x128) JPEG/RGB Q=70|MPP = 0.25"
        tifffile.imwrite(path, a, tile=(128, 128), compression="jpeg", description=desc, metadata=None)
    elif fmt == "ome.tif":
        tifffile.imwrite(path, a, tile=(128, 128), compression="zlib", metadata={"PhysicalSizeX": 0.25})
    else:
        imagecodecs.imwrite(path, a)
    data = path.read_bytes()
    outcomes = set()
    for cut in sorted({1, 8, 100, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 1}):
        part = tmp_path / f"cut{cut}.{fmt}"
        part.write_bytes(data[:cut])
        try:
            s = open_slide(part, mpp=0.25)
            s.read(0, 0, 260, 300, 0.25)
            outcomes.add("read")
        except SlideError as exc:
            assert exc.path == str(part)
            outcomes.add("error")
    assert "error" in outcomes


def test_sixteen_bit_and_float_slides_need_a_fluorescence_workflow(tmp_path):
    he, fluo = load_workflow("lymph-node-he"), load_workflow("lymph-node-if")
    for dtype in (np.uint16, np.float32):
        path = tmp_path / f"{np.dtype(dtype).name}.tif"
        tiled(path, RNG.integers(0, 255, (256, 256, 3)).astype(dtype), photometric="rgb")
        slide = open_slide(path, mpp=0.5)
        assert slide.kind == "fluorescence" and slide.levels[0].dtype == dtype
        with pytest.raises(
            SlideError,
            match=rf"{path.name}: {np.dtype(dtype).name} image with 3 channel\(s\) is not "
            r"8-bit RGB, which the workflow 'lymph-node-he' \(stain he\) needs",
        ):
            check_stain(slide, he.stain, he.name)
        check_stain(slide, fluo.stain, fluo.name)
    gray, rgba = tmp_path / "gray.tif", tmp_path / "rgba.tif"
    tiled(gray, RNG.integers(0, 256, (256, 256), np.uint8))
    tiled(rgba, RNG.integers(0, 256, (256, 256, 4), np.uint8), photometric="rgb", extrasamples=["unassalpha"])
    for path in (gray, rgba):  # 8-bit gray and RGBA are brightfield (RGB) slides
        check_stain(open_slide(path, mpp=0.5), he.stain, he.name)


@pytest.mark.parametrize(
    "kind, image, kw, message",
    [
        ("bilevel", np.zeros((64, 64), bool), {}, "unsupported pixel type bool"),
        (
            "palette",
            np.zeros((64, 64), np.uint8),
            {"photometric": "palette", "colormap": np.zeros((3, 256), np.uint16)},
            r"unsupported TIFF image kind \(photometric 3",
        ),
        (
            "cmyk",
            np.zeros((64, 64, 4), np.uint8),
            {"photometric": "separated"},
            r"unsupported TIFF image kind \(photometric 5",
        ),
    ],
)
def test_unsupported_pixel_kinds(tmp_path, kind, image, kw, message):
    path = tmp_path / f"{kind}.tif"
    tifffile.imwrite(path, image, **kw)
    with pytest.raises(SlideError, match=f"{kind}.tif: {message}"):
        open_slide(path, mpp=0.5)


def test_absurd_sizes_in_metadata(tmp_path):
    small = np.zeros((64, 64, 3), np.uint8)
    for value in ("inf", "1e-9", "1e9"):
        path = tmp_path / f"mpp{value}.ome.tif"
        tifffile.imwrite(path, small, metadata={"PhysicalSizeX": value})
        with pytest.raises(
            SlideError, match=rf"{path.name}: implausible pixel size in the file .*give the right one with --mpp"
        ):
            open_slide(path)
        assert open_slide(path, mpp=0.5).mpp == 0.5  # --mpp overrides the file's
    svs = tmp_path / "huge.svs"
    tifffile.imwrite(svs, small, description="Aperio Image Library v12.0.0\r\n64x64|MPP = 1e12", metadata=None)
    with pytest.raises(SlideError, match="huge.svs: implausible pixel size in the file"):
        open_slide(svs)
    for mpp in (0, -1, 1e-6, 1e6, float("nan"), float("inf")):
        with pytest.raises(SlideError, match="pixel size must be 0.01–20.0 µm/px"):
            open_slide(svs, mpp=mpp)
    bomb = tmp_path / "bomb.png"  # 200,000² px declared in 100 bytes: refused before decoding
    bomb.write_bytes(png_header(200_000, 200_000))
    with pytest.raises(SlideError, match=r"bomb.png: absurd dimensions 200000×200000 px for a png image"):
        open_slide(bomb, mpp=0.5)


def test_headers_that_lie_about_the_size_are_refused_before_decoding(tmp_path):
    """Issue 21: a 1 KB TIFF claiming 100,000² px ran 269 s; 39 M tiny tiles 417 s; one junk byte before a JPEG's
    frame header hid its size and 2.9 GB were decoded."""
    cases = [
        (lying_tiff(tmp_path / "strip.tif", 100_000, 100_000), r"absurd strip of 100,000×100,000 px at level 0"),
        (
            lying_tiff(tmp_path / "sparse.tif", 100_000, 100_000, seg=(4096, 4096)),
            r"declares 100,000×100,000 px in a file of [0-9,]+ bytes",
        ),
        (
            lying_tiff(tmp_path / "tiny-tiles.tif", 24_000, 24_000, seg=(16, 16)),
            r"absurd number of tiles or strips at level 0: 2,250,000 \(at most 2,097,152\)",
        ),
    ]
    jpeg = tmp_path / "junk.jpg"
    jpeg.write_bytes(jpeg_claiming(30_000, 30_000))
    cases.append((jpeg, r"absurd dimensions 30000×30000 px for a jpeg image"))
    for path, message in cases:
        t = time.perf_counter()
        with pytest.raises(SlideError, match=re.escape(f"{path}: ") + message):
            open_slide(path, mpp=0.5)
        assert time.perf_counter() - t < 5, path
    small = tmp_path / "small-junk.jpg"  # junk before a true header: still read
    small.write_bytes(jpeg_claiming(16, 16, b"\x00\x17"))
    assert open_slide(small, mpp=0.5).shape == (16, 16)


def test_a_jpeg_tile_whose_header_claims_more_than_the_tile_is_not_decoded(tmp_path):
    path = tmp_path / "tiles.tif"
    tifffile.imwrite(
        path, RNG.integers(0, 255, (64, 64, 3), np.uint8), tile=(32, 32), compression="jpeg", metadata=None
    )
    with tifffile.TiffFile(path) as tif:
        off, n = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0", off, off + n)
    data[sof + 5 : sof + 9] = struct.pack(">HH", 40_000, 40_000)
    path.write_bytes(bytes(data))
    with pytest.raises(
        SlideError, match="tile at level 0 32,0 unreadable: JPEG frame header of 40000×40000 px in a 32×32 px tile"
    ):
        open_slide(path, mpp=0.5).read(0, 0, 64, 64, 0.5)


def test_cmyk_jpeg_is_refused_with_a_message(tmp_path):
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(
        imagecodecs.jpeg8_encode(np.full((16, 16, 4), 100, np.uint8), colorspace="cmyk", outcolorspace="cmyk")
    )
    with pytest.raises(
        SlideError,
        match=re.escape(f"{path}: unsupported jpeg colour space: 4 components (CMYK or YCCK); convert it to RGB"),
    ):
        open_slide(path, mpp=0.5)


def test_non_finite_pixels_of_a_float_slide_read_as_background(tmp_path):
    """Issue 21: an all-NaN float image with lymph-node-if ended in a traceback (Otsu on NaN)."""
    from histo.segment.tissue import detect_tissue

    a = np.full((3, 512, 512), np.nan, np.float32)
    a[1, :10, :10] = np.inf
    path = tmp_path / "nan.ome.tif"
    tifffile.imwrite(path, a, tile=(256, 256), metadata={"axes": "CYX", "PhysicalSizeX": 0.5})
    slide = open_slide(path)
    assert slide.kind == "fluorescence" and not slide.read(0, 0, 512, 512, 0.5).any()
    assert detect_tissue(slide, mpp=4.0).pieces == []  # glass: an empty bundle with "no tissue found"


def test_a_gate_on_a_channel_the_slide_lacks_is_refused_when_the_run_is_planned(tmp_path):
    """Issue 21's leftover: lymph-node-if gates CD3; a panel without it was refused only after every tile
    was segmented. Now ``histo run`` refuses it at once, naming the slide, the workflow and its channels,
    and writes no bundle."""
    a = RNG.integers(0, 4000, (3, 256, 256)).astype(np.uint16)
    path = tmp_path / "panel-b.ome.tif"
    tifffile.imwrite(
        path, a, metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "Channel": {"Name": ["DAPI", "CD20", "CD68"]}}
    )
    assert open_slide(path).channel_names == ["DAPI", "CD20", "CD68"]
    result = histo("run", path, "--workflow", "lymph-node-if", "--out", tmp_path / "out", timeout=120)
    assert_clean_error(result, path, "lymph-node-if", "'mean_CD3'", "DAPI, CD20, CD68")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".panel-b.lock"]  # no bundle, no partial bundle


def test_unreadable_tile_reads_as_glass_inside_the_skip_block(tmp_path):
    a = RNG.integers(0, 200, (256, 384, 3), np.uint8)
    path = tiled(tmp_path / "bad.tif", a)
    with tifffile.TiffFile(path) as tif:
        off = tif.pages[0].dataoffsets[4]  # tile row 1, column 1
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * 64)
    s = open_slide(path, mpp=0.5)
    with pytest.raises(SlideError, match="tile at level 0 128,128 unreadable"):
        s.read(0, 0, 384, 256, 0.5)
    with skip_unreadable_tiles() as skipped:
        region = s.read(0, 0, 384, 256, 0.5)
    assert (region[128:, 128:256] == 255).all()
    good = np.ones(region.shape[:2], bool)
    good[128:, 128:256] = False
    assert np.array_equal(region[good], a[good])
    assert [{k: v for k, v in t.items() if k != "problem"} for t in skipped] == [
        {"level": 0, "x_px": 128, "y_px": 128, "width_px": 128, "height_px": 128}
    ]
    with pytest.raises(SlideError):  # outside the block, errors raise again
        s.read(128, 128, 10, 10, 0.5)


# ---- bad workflow, sample sheet, annotations ----------------------------------------------------


def test_workflow_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(WorkflowError, match="evil.yaml: not valid YAML"):
        load_workflow(evil)
    assert not marker.exists()
    listing = tmp_path / "list.yaml"
    listing.write_text("- name\n- stain\n")
    with pytest.raises(WorkflowError, match="list.yaml: 'top level' must be a mapping"):
        load_workflow(listing)
    typed = tmp_path / "typed.yaml"
    typed.write_text("segmentation: {tile_um: big}\n")
    with pytest.raises(WorkflowError, match=r"typed.yaml: 'segmentation.tile_um' has the wrong type"):
        load_workflow(typed)


@pytest.mark.parametrize(
    "text, message",
    [
        ("segmentation: {halo_um: -100}", "'segmentation.halo_um' must be 0–256, not -100"),
        ("segmentation: {tile_um: .nan}", "'segmentation.tile_um' must be a finite number, not nan"),
        ("segmentation: {tile_um: 1.0e+6}", "'segmentation.tile_um' must be 32–2048, not 1000000.0"),
        ("segmentation: {prob_thresh: 1.5}", "'segmentation.prob_thresh' must be 0–1, not 1.5"),
        ("tissue: {min_area_um2: -.inf}", "'tissue.min_area_um2' must be a finite number, not -inf"),
        ("regions: {grid_um: 0}", "'regions.grid_um' must be 0.5–100, not 0"),
        (
            "regions: {aggregate: {grade_min_layers: [2, -6, 11]}}",
            "'regions.aggregate.grade_min_layers' must be ≥ 0, not -6",
        ),
        ("regions: {lining: {deep_um: [60, x]}}", "'regions.lining.deep_um' must hold numbers, not 'x'"),
        ("neighbourhood: {ripley: {n_steps: 0}}", "'neighbourhood.ripley.n_steps' must be 2–1000, not 0"),
        ("cell_types: {dense_fraction: 2}", "'cell_types.dense_fraction' must be 0.0001–1, not 2"),
    ],
)
def test_workflow_numbers_out_of_range_are_named(tmp_path, text, message):
    path = tmp_path / "wf.yaml"
    path.write_text(f"name: x\n{text}\n")
    with pytest.raises(WorkflowError, match=re.escape(f"{path}: {message}")):
        load_workflow(path)


def test_every_range_names_a_workflow_key():
    from histo.workflow import RANGES, SCHEMA

    for name in RANGES:
        spec = SCHEMA
        for part in name.split("."):
            spec = spec[part]
        assert isinstance(spec, tuple), name


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """395 bytes of nested aliases would expand to 9⁹ strings (issue 21: a MemoryError after segmenting)."""
    refs = ["&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"] + [
        f"&{b} [{','.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")
    ]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"name: bomb\nneighbourhood:\n  run: false\n  kinds: [{', '.join(refs)}]\n")
    assert len(bomb.read_bytes()) < 400
    t = time.perf_counter()
    with pytest.raises(
        WorkflowError, match=r"bomb.yaml: not valid YAML: YAML aliases \(\*a\) are not allowed \(line 4\)"
    ):
        load_workflow(bomb)
    assert time.perf_counter() - t < 1


def test_model_folder_with_a_config_value_of_the_wrong_type_is_named(tmp_path):
    from histo.errors import ModelError
    from histo.segment.models import resolve_model

    folder = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "histo-he", folder, ignore=shutil.ignore_patterns("*.h5"))
    (folder / "weights_best.h5").write_bytes(b"")  # never loaded: the spec is refused first
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_rays": "many"}))
    with pytest.raises(
        ModelError,
        match=re.escape(
            f"{folder}: a value in config.json, card.json or thresholds.json "
            "is not a number (invalid literal for int() with base 10: 'many')"
        ),
    ):
        resolve_model(folder)


def test_sample_sheet_missing_paths_and_clashing_columns(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("slide,patient\na.svs,P1\nmissing.svs,P2\ngone.svs,P3\n")
    with pytest.raises(
        HistoError,
        match=rf"sheet.csv: slide file not found: {re.escape(str(tmp_path / 'missing.svs'))} "
        "and 1 more",
    ):
        read_input(sheet)
    sheet.write_text("slide,patient\na.svs,P1\n ,P2\n")
    with pytest.raises(HistoError, match="sheet.csv: line 3: no slide path"):
        read_input(sheet)
    for column in ("name", "status"):
        sheet.write_text(f"slide,{column}\na.svs,x\n")
        with pytest.raises(HistoError, match=f"sheet.csv: the sample sheet's column '{column}' is one histo writes"):
            read_input(sheet)
    sheet.write_text("")
    with pytest.raises(HistoError, match="sheet.csv: not a readable CSV sample sheet"):
        read_input(sheet)


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '[{"type": "Feature", "geometry": null, "properties": [1, 2]}]',
            "feature 1 of 1: 'properties' is not an object",
        ),
        (
            '{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": {}}}',
            "feature 1 of 1: invalid Polygon coordinates",
        ),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", '
            '"coordinates": [[[0, 0], [1e999, 0], [1, 1], [0, 0]]]}}',
            "feature 1 of 1: Polygon coordinates that are not numbers within ±1e+09 px",
        ),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", '
            '"coordinates": [[[0, 0], [1e308, 0], [1e308, 1e308], [0, 0]]]}}',
            "feature 1 of 1: Polygon coordinates that are not numbers within ±1e+09 px",
        ),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_geojson_names_the_file_and_feature(tmp_path, content, message):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(HistoError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        import_annotations(path, 0.5)


def test_geojson_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.geojson"
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    path.write_text("\ufeff" + json.dumps({"type": "Feature", "geometry": square, "properties": {}}), encoding="utf-8")
    assert import_annotations(path, 0.5).area_um2.tolist() == [25.0]


def test_csv_text_cells_cannot_become_spreadsheet_formulas(tmp_path):
    """Issue 21: sheet cells beginning with = went verbatim into summary.csv (CSV injection for Excel users)."""
    rows = [
        {
            "slide": "a.svs",
            "patient": "=cmd|' /C calc'!A0",
            "timepoint": "-1",
            "site": "@SUM(A1)",
            "status": "ok",
            "n_cells": -3,
            "density": -0.5,
        }
    ]
    write_summary(rows, ["slide", "patient", "timepoint", "site", "+x"], tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv", dtype=str, keep_default_na=False).iloc[0].to_dict()
    assert summary == {
        "slide": "a.svs",
        "patient": "'=cmd|' /C calc'!A0",
        "timepoint": "-1",
        "site": "'@SUM(A1)",
        "status": "ok",
        "n_cells": "-3",
        "density": "-0.5",
    }
    write_metrics(
        pd.DataFrame(
            {
                "region_id": ["slide", "annotation-1"],
                "name": [None, "-tumour"],
                "=region": ["x", "y"],
                "area_mm2": [1.5, -0.0],
            }
        ),
        tmp_path,
    )
    metrics = pd.read_csv(tmp_path / "metrics.csv", dtype=str, keep_default_na=False)
    assert list(metrics.columns) == ["region_id", "name", "'=region", "area_mm2"]
    assert metrics["name"].tolist() == ["", "'-tumour"] and metrics["area_mm2"].tolist() == ["1.5", "-0.0"]


# ---- the command line: one line, exit 2, --debug for the traceback ------------------------------


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, generated):
    folder = tmp_path_factory.mktemp("cli")
    rgb16 = tiled(folder / "rgb16.tif", np.full((256, 256, 3), 40000, np.uint16), photometric="rgb")
    bomb = folder / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))
    bowtie = folder / "bowtie.geojson"
    bowtie.write_text(
        json.dumps(
            {
                "type": "Feature",
                "properties": {},
                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]},
            }
        )
    )
    sheet = folder / "sheet.csv"
    sheet.write_text("slide,patient\nnowhere.svs,P1\n")
    far = folder / "far.geojson"  # a valid square, 10,000 px beyond a 1024² px slide
    far.write_text(
        json.dumps(
            {
                "type": "Feature",
                "properties": {},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[1e4, 1e4], [1e4 + 50, 1e4], [1e4 + 50, 1e4 + 50], [1e4, 1e4]]],
                },
            }
        )
    )
    nan = folder / "nan.yaml"
    nan.write_text("segmentation: {tile_um: .nan}\n")
    return {
        "rgb16": rgb16,
        "bomb": bomb,
        "bowtie": bowtie,
        "sheet": sheet,
        "far": far,
        "nan": nan,
        "lying": lying_tiff(folder / "lying.tif", 100_000, 100_000),
        "slide": generated("lymph-node", 1024, 2),
    }


@pytest.mark.parametrize("case", ["rgb16", "bomb", "mpp", "annotations", "sheet", "outside", "nan", "lying"])
def test_cli_bad_input_is_one_line(cli_inputs, tmp_path, case):
    c, out = cli_inputs, tmp_path / "out"
    args, path, words = {
        "rgb16": (["run", c["rgb16"], "--mpp", 0.5], c["rgb16"], ["uint16 image", "8-bit RGB"]),
        "bomb": (["run", c["bomb"], "--mpp", 0.5], c["bomb"], ["absurd dimensions"]),
        "mpp": (["run", c["slide"], "--mpp", 1e9], c["slide"], ["pixel size must be"]),
        "annotations": (["run", c["slide"], "--annotations", c["bowtie"]], c["bowtie"], ["self-intersecting polygon"]),
        "sheet": (["batch", c["sheet"]], c["sheet"], ["slide file not found"]),
        "outside": (
            ["run", c["slide"], "--annotations", c["far"]],
            c["far"],
            ["annotation-1 lies wholly outside the slide (512 × 512 µm)"],
        ),
        "nan": (
            ["run", c["slide"], "--workflow", c["nan"]],
            c["nan"],
            ["'segmentation.tile_um' must be a finite number"],
        ),
        "lying": (["run", c["lying"], "--mpp", 0.5], c["lying"], ["absurd strip of 100,000×100,000 px"]),
    }[case]
    assert_clean_error(histo(*args, "--out", out), path, *words)
    assert not out.exists()  # refused before anything is written


def test_debug_shows_the_traceback(cli_inputs, tmp_path):
    done = histo("--debug", "run", cli_inputs["rgb16"], "--mpp", 0.5, "--out", tmp_path)
    assert done.returncode != 0 and "Traceback" in done.stderr and "SlideError" in done.stderr


def test_special_files_and_symlink_loops_fail_at_once(tmp_path):
    fifo = tmp_path / "x.svs"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    loop = tmp_path / "loop.svs"
    loop.symlink_to(tmp_path / "loop.svs")
    (tmp_path / "folder.tif").mkdir()
    for path, problem in [
        (fifo, "not a slide: a FIFO, not a regular file"),
        (loop, "cannot open: symbolic link loop"),
        (tmp_path / "folder.tif", "not a slide: a folder, not a regular file"),
    ]:
        with pytest.raises(SlideError, match=re.escape(f"{path}: {problem}")):
            open_slide(path, mpp=0.5)
    result = histo("run", fifo, "--out", tmp_path / "out", timeout=120)
    assert_clean_error(result, fifo, "a FIFO")


def test_run_refuses_to_replace_the_bundle_of_another_input(generated, tmp_path):
    """Issue 21: a/A.ome.tif then b/A.ome.tif into one folder silently replaced A's bundle."""
    slide = generated("lymph-node", 1024, 2)
    bundle = tmp_path / "out" / slide_name(slide)
    bundle.mkdir(parents=True)
    other = {"path": "/elsewhere/A.ome.tif", "size_bytes": 1, "mtime": 0.0, "sha256": "0" * 64}
    (bundle / "run.json").write_text(json.dumps({"status": "complete", "input": other}))
    assert_clean_error(
        histo("run", slide, "--out", tmp_path / "out"),
        bundle,
        "this bundle holds the results of another input (/elsewhere/A.ome.tif); give --overwrite",
    )
    assert json.loads((bundle / "run.json").read_text())["input"] == other  # untouched
    (bundle / "run.json").write_text(json.dumps({"status": "complete", "input": file_fingerprint(slide)}))
    check_same_input(bundle, slide)  # the same input: replaced as before


def test_names_that_clean_to_the_same_string_get_different_bundles():
    names = ["a b.svs", "a_b.svs", "a?b.svs", "é.svs", "ü.svs", ".a_b.svs"]
    bundles = [slide_name(n) for n in names]
    assert len(set(bundles)) == len(names), bundles
    assert bundles[1] == "a_b" and re.fullmatch(r"a_b-[0-9a-f]{8}", bundles[0]) and bundles[3].startswith("slide-")
    assert slide_name("lymph-node-1024-2-0p5.ome.tif") == "lymph-node-1024-2-0p5"  # clean names unchanged


# ---- two writers on one output folder -----------------------------------------------------------

HOLD = (
    "import sys, time; from pathlib import Path; from histo.io.bundle import OutputLock; "
    "lock = OutputLock(Path(sys.argv[1]), 'it').acquire(); print('held', flush=True); time.sleep(600)"
)


def _holder(lock: Path) -> subprocess.Popen:
    """Another process holding ``lock`` until it is killed."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_batch_on_one_folder_is_refused_and_a_killed_holder_blocks_nothing(generated, tmp_path):
    out = tmp_path / "out"
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"slide\n{generated('lymph-node', 1024, 2)}\n")
    proc = _holder(out / ".histo-batch.lock")
    try:  # refused before it touches the cluster (client=None)
        with pytest.raises(
            HistoError,
            match=rf"{re.escape(str(out))}: this output folder is being written by another "
            rf"histo process \(pid {proc.pid} on .*\); wait for it",
        ):
            run_batch(read_input(sheet), out, client=None, show_progress=False)
    finally:
        proc.kill()
        proc.wait()
    with OutputLock(out / ".histo-batch.lock", "it"):  # SIGKILLed holder: the kernel dropped its lock
        pass
    assert not (out / "summary.csv").exists()


def test_second_batch_command_is_refused_before_its_cluster_starts(generated, tmp_path):
    """Issue 21: the refusal came after 28 s, once the second batch had started its cluster."""
    out = tmp_path / "out"
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"slide\n{generated('lymph-node', 1024, 2)}\n")
    proc = _holder(out / ".histo-batch.lock")
    try:
        t = time.perf_counter()
        result = histo("batch", sheet, "--out", out)
        took = time.perf_counter() - t
    finally:
        proc.kill()
        proc.wait()
    assert_clean_error(result, out, "this output folder is being written by another histo process")
    print(f"second batch refused in {took:.1f} s (the whole command, imports included)")


def test_second_writer_of_one_bundle_is_refused(generated, tmp_path):
    slide = generated("lymph-node", 1024, 2)
    name = slide_name(slide)
    proc = _holder(tmp_path / f".{name}.lock")
    try:
        with pytest.raises(
            HistoError,
            match=rf"the bundle '{name}' is being written by another histo process "
            rf"\(pid {proc.pid} ",
        ):
            run_slide(slide, tmp_path, client=None, show_progress=False)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / name).exists() and not (tmp_path / f".{name}.partial").exists()


# ---- safe defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "..",
        "/abs/path/x.svs",
        ".hidden.svs",
        "a/../../b.tif",
        "C:\\evil\\..\\x.svs",
        "\x00nul.tif",
        "é" * 300 + ".svs",
        "a" * 400 + ".tif",
    ],
)
def test_bundle_names_stay_inside_the_output_folder(tmp_path, name):
    safe = slide_name(name)
    assert (tmp_path / safe).resolve().parent == tmp_path.resolve()
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,119}", safe), safe


def test_no_unsafe_deserialisation_in_the_code():
    """No pickle / marshal / yaml.load / eval / exec / allow_pickle on anything histo reads."""
    unsafe = re.compile(
        r"pickle\.loads?\(|marshal\.loads?\(|yaml\.load\(|yaml\.unsafe_load|\beval\(|\bexec\(|"
        r"allow_pickle\s*=\s*True|read_pickle|torch\.load|dill\.|joblib\.load"
    )
    files = [
        *ROOT.joinpath("histo").rglob("*.py"),
        *ROOT.joinpath("sample_data").glob("*.py"),
        *ROOT.joinpath("plugins").rglob("*.py"),
    ]
    hits = [
        f"{f.relative_to(ROOT)}:{i}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if unsafe.search(line)
    ]
    assert len(files) > 30 and not hits, hits


def test_dask_binds_to_localhost(client):
    """Scheduler, workers, nannies and every HTTP server on 127.0.0.1; the Dask comms over TLS
    (test_cluster_security: what that keeps out)."""
    info = client.scheduler_info()
    assert client.scheduler.address.startswith("tls://127.0.0.1:")
    assert client.dashboard_link.startswith("http://127.0.0.1:")
    assert info["workers"] and all(a.startswith("tls://127.0.0.1:") for a in info["workers"])
    assert all(w["nanny"].startswith("tls://127.0.0.1:") for w in info["workers"].values())
    http = client.run(lambda dask_worker: [s.getsockname()[0] for s in dask_worker.http_server._sockets.values()])
    assert set(http) == set(info["workers"]) and all(hosts == ["127.0.0.1"] for hosts in http.values())


def test_an_error_raised_in_a_worker_reaches_the_client_as_itself(client, tmp_path):
    """E.g. a slide deleted between planning and its tile tasks: the batch records histo's one line."""
    gone = tmp_path / "gone.svs"
    with pytest.raises(SlideError) as err:
        client.submit(open_slide, gone, pure=False).result()
    assert (err.value.path, err.value.problem, str(err.value)) == (
        str(gone),
        "file not found",
        f"{gone}: file not found",
    )


def test_evaluate_images_sees_jpeg_images(client, tmp_path):
    """Issue 21: histo evaluate --images did not list JPEG images ("no image with the truth file")."""
    from histo.train.evaluate import run_images

    (tmp_path / "truth").mkdir()
    (tmp_path / "images").mkdir()
    imagecodecs.imwrite(tmp_path / "truth" / "a.png", np.zeros((32, 32), np.uint16))
    imagecodecs.imwrite(tmp_path / "images" / "a.jpg", np.zeros((32, 32, 3), np.uint8))
    sizes = tmp_path / "mpp.csv"
    sizes.write_text("image,mpp\nb,0.25\n")  # a.jpg found, then refused for its missing size: nothing runs
    errors = run_images(tmp_path / "truth", tmp_path / "images", tmp_path / "bundles", str(sizes), client=client)
    assert errors == {"a": f"{tmp_path / 'images' / 'a.jpg'}: no pixel size for this image in {sizes}"}


# ---- faults during a run: a bad tile, a killed worker, a full disk -------------------------------


@pytest.fixture(scope="module")
def tile_fault_reference(generated, client, tmp_path_factory):
    """A 1024² px lymph node at 0.5 µm/px (4 tiles of 512 px, JPEG) and its bundle, undisturbed."""
    slide = generated("lymph-node", 1024, 2)
    return slide, run_slide(slide, tmp_path_factory.mktemp("ref"), "lymph-node-he", client=client, show_progress=False)


def _cells(bundle: Path) -> pd.DataFrame:
    return pd.read_parquet(bundle / "cells.parquet")


@pytest.mark.slow
def test_one_unreadable_tile_is_reported_and_the_rest_analysed(tile_fault_reference, client, tmp_path):
    slide, ref = tile_fault_reference
    bad = tmp_path / "bad-tile.ome.tif"
    shutil.copy(slide, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        assert (page.tilewidth, len(page.dataoffsets)) == (512, 4)
        off = page.dataoffsets[2]  # tile row 1, column 0: level-0 px x 0–512, y 512–1024
    with open(bad, "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * 64)  # no JPEG header: the tile cannot be decoded
    bundle = run_slide(bad, tmp_path / "out", "lymph-node-he", client=client, show_progress=False)
    assert is_complete(bundle)
    run = json.loads((bundle / "run.json").read_text())
    [error] = run["tile_errors"]
    assert {k: error[k] for k in ("level", "x_px", "y_px", "width_px", "height_px", "x_um", "y_um")} == {
        "level": 0,
        "x_px": 0,
        "y_px": 512,
        "width_px": 512,
        "height_px": 512,
        "x_um": 0.0,
        "y_um": 256.0,
    }
    assert error["problem"] and any("unreadable slide tile" in w for w in run["warnings"])
    cells, before = _cells(bundle), _cells(ref)
    inside = (cells.x_um < 256) & (cells.y_um >= 256)
    assert not inside.any() and len(cells) > 0.5 * len(before)
    far = before[(before.x_um > 256 + 60) | (before.y_um < 256 - 60)]  # beyond the bad tile and a halo
    distance, _ = cKDTree(cells[["x_um", "y_um"]]).query(far[["x_um", "y_um"]])
    assert np.mean(distance < 1) > 0.97


@pytest.mark.slow
def test_worker_killed_mid_slide_gives_the_same_cells(tile_fault_reference, client, tmp_path):
    slide, ref = tile_fault_reference
    plan = plan_slide(slide, tmp_path, "lymph-node-he")
    futures = submit_tiles(client, plan)
    keys = {f.key for f in futures}
    deadline = time.monotonic() + 300
    while not (busy := [w for w, ks in client.processing().items() if keys & set(ks)]):
        assert time.monotonic() < deadline, "no tile task started"
        time.sleep(0.02)
    pids = client.run(os.getpid, workers=busy[:1])
    os.kill(pids[busy[0]], signal.SIGKILL)  # as the out-of-memory killer would
    client.gather(futures)
    bundle = finish_slide(client, plan, {}, show_progress=False)
    client.wait_for_workers(2, timeout=300)
    assert busy[0] not in client.nthreads()  # the worker really died and was replaced
    pd.testing.assert_frame_equal(_cells(bundle), _cells(ref))


@pytest.mark.slow
def test_disk_full_while_finishing_keeps_the_earlier_bundle(tile_fault_reference, client, tmp_path):
    slide, ref = tile_fault_reference
    out = tmp_path / "out"
    shutil.copytree(ref, out / ref.name)  # the earlier, complete bundle
    before = {p.relative_to(out): p.read_bytes() for p in (out / ref.name).rglob("*") if p.is_file()}
    plan = plan_slide(slide, out, "lymph-node-he")
    client.gather(submit_tiles(client, plan))
    (plan.partial / "run.json.tmp").symlink_to("/dev/full")  # its write fails with ENOSPC, for real
    with pytest.raises(
        HistoError, match="cannot write the bundle: No space left on device; the bundles already complete are kept"
    ):
        finish_slide(client, plan, {}, show_progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in (out / ref.name).rglob("*") if p.is_file()}
    assert after == before and is_complete(out / ref.name)
    assert sorted(p.name for p in out.iterdir()) == [ref.name]  # no partial or .old folder left
