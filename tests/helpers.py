"""What several test modules share, in one place: paths, the ``histo`` command, truth of generated
slides and scoring against it, units of metric columns, hand-made files that lie. Test modules import
from here (``from helpers import ...``; pytest puts tests/ on ``sys.path`` for conftest.py), never from
one another; fixtures are in conftest.py."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import shape

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the test with a reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is provided to developers and CI, not shipped)")
    return path


# ---- the histo command, as a user runs it ----------------------------------------------------------


def histo(*args, cwd=None, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m histo.cli ARGS`` in a new process (text output captured, ``timeout`` s at most)."""
    return subprocess.run(
        [sys.executable, "-m", "histo.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def assert_clean_error(result, path, *words):
    """Exit 2, one line on stderr naming ``path`` and holding each of ``words`` (as written, or in
    lower case in the lower-cased line), no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr
    for word in words:
        assert word in lines[0] or word in lines[0].lower(), lines[0]


# ---- truth of generated slides, and regions scored against it -------------------------------------


def load_truth(slide):
    """(cells, truth features, tissue pieces) of a generated slide."""
    cells = pd.read_parquet(str(slide).replace(".ome.tif", ".truth.parquet")).rename(columns={"id": "cell_id"})
    feats = json.loads(open(str(slide).replace(".ome.tif", ".truth.geojson"), encoding="utf-8").read())["features"]
    pieces = [shape(f["geometry"]) for f in feats if f["properties"]["kind"] == "tissue"]
    return cells, feats, pieces


def truth_regions(feats, kind):
    return [(shape(f["geometry"]), f["properties"]) for f in feats if f["properties"]["kind"] == kind]


def iou(a, b) -> float:
    return a.intersection(b).area / a.union(b).area


def best_match(geom, found) -> tuple[int, float]:
    scores = [iou(geom, g) for g in found]
    return (int(np.argmax(scores)), max(scores)) if scores else (-1, 0.0)


def follicle_scores(feats, regions) -> tuple[int, int, list[float], float]:
    """(follicles found, true follicles, IoU of each true follicle with its best match, fraction of the
    matched (IoU > 0.5) true follicles whose has_gc is right)."""
    truth = truth_regions(feats, "follicle")
    found = regions[regions.kind == "follicle"]
    matches = [best_match(g, list(found.geometry)) for g, _ in truth]
    has_gc = [bool(found.iloc[k].has_gc) == p["has_gc"] for (k, s), (_, p) in zip(matches, truth) if s > 0.5]
    return len(found), len(truth), [m[1] for m in matches], float(np.mean(has_gc)) if has_gc else 0.0


def check_aggregate_grades(feats, regions) -> list[tuple]:
    """Every true aggregate of grade ≥ 2 is found (IoU ≥ 0.3), ≥ 70 % of all are; the matched have the
    true grade and radial layers within 1.5. Returns (true grade, grade, true layers, layers) per match."""
    found = regions[regions.kind == "aggregate"]
    truth = truth_regions(feats, "aggregate")
    matched = []
    for geom, props in truth:
        k, score = best_match(geom, list(found.geometry))
        if score >= 0.3:
            matched.append(
                (props["grade"], int(found.iloc[k].grade), props["layers"], float(found.iloc[k].radial_layers))
            )
        else:
            assert props["grade"] == 1, f"a grade-{props['grade']} aggregate was missed"
    assert len(matched) >= 0.7 * len(truth), matched
    assert all(t == g for t, g, *_ in matched), matched
    assert all(abs(tl - fl) <= 1.5 for *_, tl, fl in matched), matched
    return matched


def check_lining_layers(feats, regions) -> list[tuple]:
    """Each true lining has lining found on its piece (the tissue region overlapping the true piece
    most), every run within ±1 layer of the truth, over > 50 % of the true band. Returns (piece,
    true layers, layers found) per true lining."""
    lining = regions[regions.kind == "lining"]
    tissue = regions[regions.kind == "tissue"]
    pieces = {props["piece"]: geom for geom, props in truth_regions(feats, "tissue")}
    out = []
    for geom, props in truth_regions(feats, "lining"):
        k, _ = best_match(pieces[props["piece"]], list(tissue.geometry))
        mine = lining[lining.tissue_id == tissue.iloc[k].region_id]
        assert len(mine), f"no lining found on piece {props['piece']}"
        assert all(abs(v - props["layers"]) <= 1 for v in mine.layers_median), (
            props["layers"],
            list(mine.layers_median),
        )
        covered = shapely.union_all(list(mine.geometry)).intersection(geom).area / geom.area
        assert covered > 0.5, covered
        out.append((props["piece"], props["layers"], [round(v, 2) for v in mine.layers_median]))
    return out


# ---- metric columns: a unit in the name, or one of these unitless ones ----------------------------

UNITLESS = {
    "grade",
    "radial_layers",
    "layers_median",
    "layers_p90",
    "lining_layers_median",
    "circularity",
    "krenn_lining",
    "krenn_stroma",
    "krenn_infiltrate",
    "krenn_sum",
    "max_aggregate_grade",
    "edge_truncated",
    "has_gc",
    "tls_size",
    "sampling_flag",
}
UNITS = re.compile(r"^(n_.+|fraction_.+|.+_(um|um2|mm|mm2|per_mm2|per_100um))$")


# ---- files whose headers lie about their size ------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def lying_tiff(path: Path, width: int, height: int, seg: tuple[int, int] | None = None) -> Path:
    """A BigTIFF (zlib, 8-bit RGB) declaring ``width``×``height`` px whose segments (``seg`` tiles, else one
    strip of the whole image) all point at one small blob of zeros: a few bytes that claim a slide."""
    sh, sw = seg or (height, width)
    n = -(-height // sh) * -(-width // sw)
    blob = zlib.compress(bytes(sh * sw * 3 if seg else 3))
    layout = [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [8, 8, 8]),
        (259, 3, [8]),
        (262, 3, [2]),
        (277, 3, [3]),
        (284, 3, [1]),
    ]
    layout += [(322, 4, [sw]), (323, 4, [sh])] if seg else [(278, 4, [sh])]
    base = 16 + 8 + 20 * (len(layout) + 2) + 8
    blob_at = base + 8 + 16 * n + 8  # after bits-per-sample and both offset arrays
    layout += [(324 if seg else 273, 16, [blob_at] * n), (325 if seg else 279, 16, [len(blob)] * n)]
    entries, extra = [], bytearray()
    for code, kind, values in sorted(layout):
        raw = np.array(values, {3: "<u2", 4: "<u4", 16: "<u8"}[kind]).tobytes()
        value = raw.ljust(8, b"\0") if len(raw) <= 8 else struct.pack("<Q", base + len(extra))
        extra += b"" if len(raw) <= 8 else raw
        entries.append(struct.pack("<HHQ", code, kind, len(values)) + value)
    head = b"II" + struct.pack("<HHHQQ", 43, 8, 0, 16, len(entries)) + b"".join(entries) + bytes(8)
    path.write_bytes((head + extra).ljust(blob_at, b"\0") + blob)
    return path


def jpeg_claiming(width: int, height: int, junk: bytes = b"\x00") -> bytes:
    """A 16² px JPEG whose frame header says ``width``×``height``, with ``junk`` before that header
    (libjpeg skips it: 'extraneous bytes before marker')."""
    data = imagecodecs.jpeg_encode(np.zeros((16, 16, 3), np.uint8))
    sof = data.index(b"\xff\xc0")
    return data[:sof] + junk + data[sof : sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]
