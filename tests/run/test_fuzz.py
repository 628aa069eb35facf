"""Fuzzing (hypothesis) of what histo reads from users: slide files and headers that lie about their
size, workflow numbers, QuPath GeoJSON, slide names.

Every input must be handled or refused with histo's own error (HistoError, one line naming the
file); any other exception is a bug. Runs are derandomised (the same inputs every run) and bounded;
``HISTO_FUZZ_EXAMPLES`` scales them (docs/HARDENING.md gives the counts of a run).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from helpers import jpeg_claiming, lying_tiff, png_header
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histo.errors import HistoError, WorkflowError
from histo.io.annotations import import_annotations
from histo.io.bundle import slide_name
from histo.io.slide import open_slide
from histo.io.tiff_tiles import MAX_DECODE_PX, MAX_PX_PER_BYTE
from histo.workflow import RANGES, SCHEMA, validate

EXAMPLES = int(os.environ.get("HISTO_FUZZ_EXAMPLES", "500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _seeds(folder: Path) -> dict[str, tuple[bytes, np.ndarray]]:
    """Small valid inputs of each kind the opener reads, and the positions of their non-pixel bytes
    (headers, IFDs, tag values: where a mutation changes the structure, not a pixel)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (200, 300, 3), np.uint8)
    paths = {
        "ome": folder / "s.ome.tif",
        "svs": folder / "s.svs",
        "strips": folder / "s.tif",
        "png": folder / "s.png",
        "jpeg": folder / "s.jpg",
    }
    with tifffile.TiffWriter(paths["ome"]) as w:
        w.write(a, tile=(64, 64), compression="zlib", subifds=1, metadata={"PhysicalSizeX": 0.5})
        w.write(a[::2, ::2], tile=(64, 64), compression="zlib", subfiletype=1)
    tifffile.imwrite(
        paths["svs"],
        a,
        tile=(128, 128),
        compression="jpeg",
        metadata=None,
        description="Aperio Image Library v12.0.0\r\n300x200 [0,0 300x200] (128x128) JPEG/RGB|MPP = 0.25",
    )
    tifffile.imwrite(paths["strips"], a[..., 0], rowsperstrip=32, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    imagecodecs.imwrite(paths["png"], a)
    imagecodecs.imwrite(paths["jpeg"], a)
    seeds = {}
    for kind, path in paths.items():
        data = path.read_bytes()
        pixels = np.zeros(len(data), bool)
        if kind not in ("png", "jpeg"):
            with tifffile.TiffFile(path) as tif:
                for page in [*tif.pages, *(p for pg in tif.pages for p in (pg.pages or []))]:
                    for off, n in zip(page.dataoffsets, page.databytecounts):
                        pixels[off : off + n] = True
        seeds[kind] = (data, np.flatnonzero(~pixels))
    return seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return _seeds(tmp_path_factory.mktemp("seeds"))


@st.composite
def damaged(draw, seeds):
    """A seed file with some bytes overwritten (mostly structure bytes), bytes inserted or cut off."""
    kind = draw(st.sampled_from(sorted(seeds)))
    data, structure = seeds[kind]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        where = (
            int(structure[draw(st.integers(0, len(structure) - 1))])
            if draw(st.integers(0, 2)) == 0
            else draw(st.integers(0, len(out) - 1))
        )
        out[where : where + 1] = draw(
            st.sampled_from([b"\x00", b"\xff", b"\x7f", b"\x80"]) | st.binary(min_size=1, max_size=4)
        )
    if draw(st.integers(0, 4)) == 0:
        out = out[: draw(st.integers(0, len(out)))]
    return kind, bytes(out)


SUFFIX = {"png": "png", "jpeg": "jpg", "svs": "svs"}


def test_slide_opener_fuzz(seeds, tmp_path):
    tried = {"opened": 0, "refused": 0}

    @FUZZ
    @given(damaged(seeds), st.sampled_from([None, 0.5]))
    def opener(case, mpp):
        kind, data = case
        path = tmp_path / f"fuzz.{SUFFIX.get(kind, 'tif')}"
        path.write_bytes(data)
        try:
            slide = open_slide(path, mpp=mpp)
            h, w = slide.shape
            assert slide.read(0, 0, min(w, 300), min(h, 200), slide.mpp).shape[:2] == (min(h, 200), min(w, 300))
            slide.thumbnail(slide.mpp * 4)
        except HistoError as exc:
            assert exc.path == str(path) and "\n" not in str(exc)
            tried["refused"] += 1
        else:
            tried["opened"] += 1

    opener()
    print(f"slide opener: {sum(tried.values())} inputs, {tried['opened']} opened and read, {tried['refused']} refused")
    assert tried["refused"] > 0 and sum(tried.values()) >= EXAMPLES // 2


NUMBER = st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, st.text(max_size=4))
KEYS = st.sampled_from(
    ["type", "coordinates", "geometry", "properties", "features", "objectType", "classification", "name"]
) | st.text(max_size=3)
JSON = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=16
)
POINT = st.lists(NUMBER, min_size=0, max_size=3)
RING = st.lists(POINT, max_size=8)
GEOMETRY = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["Polygon", "MultiPolygon", "Point", "LineString", 3, None]),
        "coordinates": st.lists(RING, max_size=3) | st.lists(st.lists(RING, max_size=2), max_size=2) | JSON,
    }
)
PROPERTIES = (
    st.none()
    | JSON
    | st.fixed_dictionaries(
        {
            "objectType": st.sampled_from(["annotation", "detection", 1, None]),
            "classification": JSON | st.fixed_dictionaries({"name": JSON}),
        }
    )
)
FEATURE = JSON | st.fixed_dictionaries(
    {"type": st.just("Feature"), "geometry": GEOMETRY | JSON, "properties": PROPERTIES}
)
DOCUMENT = (
    JSON
    | st.lists(FEATURE, max_size=4)
    | st.fixed_dictionaries({"type": st.just("FeatureCollection"), "features": st.lists(FEATURE, max_size=4)})
)


def test_geojson_importer_fuzz(tmp_path):
    tried = {"imported": 0, "refused": 0}
    path = tmp_path / "fuzz.geojson"

    @FUZZ
    @given(DOCUMENT | st.binary(max_size=64), st.booleans())
    def importer(doc, repair):
        path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        try:
            regions = import_annotations(path, 0.5, repair=repair)
        except HistoError as exc:
            assert exc.path == str(path) and "\n" not in str(exc)
            tried["refused"] += 1
        else:
            assert regions.geometry.is_valid.all() and np.isfinite(regions.area_um2.astype(float)).all()
            tried["imported"] += 1

    importer()
    print(f"GeoJSON importer: {sum(tried.values())} inputs, {tried['imported']} imported, {tried['refused']} refused")
    assert tried["imported"] > 0 and tried["refused"] > 0


@FUZZ
@given(st.text(min_size=0, max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_slide_names_never_escape_the_output_folder(name):
    safe = slide_name(name)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,119}", safe), safe
    out = Path("/out")
    assert (out / safe).parent == out and os.path.normpath(out / safe) == str(out / safe)


def _numeric_keys(schema: dict, where: str = "") -> list[str]:
    """Dotted names of the workflow keys that take numbers (alone or in lists)."""
    out = []
    for key, spec in schema.items():
        name = f"{where}.{key}" if where else key
        if isinstance(spec, dict):
            out += _numeric_keys(spec, name)
        elif {int, float} & set(spec[0] if isinstance(spec[0], tuple) else (spec[0],)) or (
            isinstance(spec[1], list) and spec[1] and isinstance(spec[1][0], (int, float))
        ):
            out.append(name)
    return out


NUMERIC_KEYS = _numeric_keys(SCHEMA)


@FUZZ
@given(st.sampled_from(NUMERIC_KEYS), NUMBER | st.lists(NUMBER, max_size=3) | st.floats(-1e3, 1e4))
def test_workflow_numbers_fuzz(key, value):
    """Any number in any numeric key: a workflow whose numbers are finite and in range, or histo's
    error naming that key."""
    data: dict = {}
    *sections, last = key.split(".")
    node = data
    for part in sections:
        node = node.setdefault(part, {})
    node[last] = value
    try:
        wf = validate(data, "wf.yaml")
    except WorkflowError as exc:
        assert f"'{key}'" in str(exc) and "\n" not in str(exc)
        return
    got = wf
    for part in key.split("."):
        got = getattr(got, part)
    lo, hi = RANGES.get(key, (0, math.inf))
    assert all(math.isfinite(x) and lo <= x <= hi for x in (got if isinstance(got, list) else [got]))


@st.composite
def lying_header(draw):
    """A TIFF, JPEG or PNG whose header declares up to 2,000² px or over 2²⁸ px (up to 500,000²) in a few
    bytes (sizes in between are decoded, within the budget, and only slow the fuzzing down)."""
    kind = draw(st.sampled_from(["strip", "tiles", "jpeg", "png"]))
    side = st.integers(16_385, 500_000) if draw(st.booleans()) else st.integers(1, 2_000)
    width, height = draw(side), draw(side)
    if kind == "jpeg":
        width, height = min(width, 65_535), min(height, 65_535)
        return kind, width, height, jpeg_claiming(width, height, draw(st.binary(max_size=3)))
    if kind == "png":
        return kind, width, height, png_header(width, height)
    tile = 16 * draw(st.integers(1, 64))
    if -(-width // tile) * -(-height // tile) > 100_000:  # the file would hold >1.6 MB of offsets
        kind = "strip"
    return kind, width, height, (tile, tile) if kind == "tiles" else None


def test_lying_headers_fuzz(tmp_path):
    """Headers that lie about the image size: refused within a second, or small enough to read."""
    tried = {"opened": 0, "refused": 0}

    @FUZZ
    @given(lying_header())
    def opener(case):
        kind, width, height, extra = case
        path = tmp_path / f"lie.{ {'jpeg': 'jpg', 'png': 'png'}.get(kind, 'tif') }"
        if kind in ("jpeg", "png"):
            path.write_bytes(extra)
        else:
            lying_tiff(path, width, height, seg=extra)
        t = time.perf_counter()
        try:
            slide = open_slide(path, mpp=0.5)
            assert width * height <= max(MAX_DECODE_PX, MAX_PX_PER_BYTE * path.stat().st_size)
            slide.read(0, 0, min(width, 64), min(height, 64), 0.5)
        except HistoError as exc:  # refused on open, or its tile on reading
            assert exc.path == str(path) and "\n" not in str(exc)
            tried["refused"] += 1
        else:
            tried["opened"] += 1
        assert time.perf_counter() - t < 5

    opener()
    print(f"lying headers: {sum(tried.values())} inputs, {tried['opened']} opened, {tried['refused']} refused")
    assert tried["refused"] > 0
