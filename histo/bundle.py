"""The result bundle: one folder per slide, written under a temporary name and renamed when done.

A bundle is complete only when its ``run.json`` says ``"status": "complete"``; ``run.json`` is the
last file written, and the folder only takes its final name after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import pandas as pd
from histo.tiling import Tile

SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".svs", ".ndpi", ".mrxs", ".png", ".jpg", ".jpeg")


def slide_name(path: str | Path) -> str:
    """Bundle name of a slide: its file name without extensions (``a.ome.tif`` → ``a``), made
    safe as a single folder name (it can never escape the output folder)."""
    name = Path(path).name
    for suffix in SLIDE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slide"
    return name


def partial_dir(out: Path, name: str) -> Path:
    """Where a bundle is built before it is renamed to ``out/name``."""
    return out / f".{name}.partial"


def finish(partial: Path, final: Path, run: dict) -> Path:
    """Write ``run.json`` last, then move the bundle to its final name (replacing an older one)."""
    tmp = partial / "run.json.tmp"
    tmp.write_text(json.dumps(run, indent=2, default=str))
    os.replace(tmp, partial / "run.json")
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    return final


def is_complete(bundle: Path) -> bool:
    """True when ``bundle/run.json`` exists and says the run completed."""
    try:
        return json.loads((bundle / "run.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def concat_cells(parts_dir: Path, tiles: list[Tile], out: Path, schema: pa.Schema,
                 extra: pd.DataFrame | None = None) -> tuple[int, dict[str, int]]:
    """Stream the per-tile parts (columns ``schema``), in tile order, into ``cells.parquet`` (one row
    group per non-empty tile), numbering the nuclei ``label`` = 1, 2, … in that order and appending
    the columns of ``extra`` (one row per nucleus in the same order: cell types, region ids).

    Returns the number of cells and a map tile name → row group index. Holds one tile at a time.
    """
    extra_table = None if extra is None else pa.Table.from_pandas(extra, preserve_index=False)
    out_schema = schema.append(pa.field("label", pa.int32()))
    for field in extra_table.schema if extra_table is not None else ():
        out_schema = out_schema.append(field)
    n, groups = 0, {}
    with pq.ParquetWriter(out, out_schema) as writer:
        for tile in tiles:
            part = pq.read_table(parts_dir / f"{tile.name}.parquet", schema=schema)
            if part.num_rows == 0:
                continue
            part = part.append_column("label", pa.array(range(n + 1, n + 1 + part.num_rows), pa.int32()))
            for name in extra_table.column_names if extra_table is not None else ():
                part = part.append_column(name, extra_table.column(name).slice(n, part.num_rows).combine_chunks())
            writer.write_table(part)
            groups[tile.name] = len(groups)
            n += part.num_rows
    return n, groups


def read_parts(parts_dir: Path, tiles: list[Tile], columns: list[str]) -> pd.DataFrame:
    """``columns`` of all tiles' parts, concatenated in tile order (the order of ``concat_cells``)."""
    tables = [pq.read_table(parts_dir / f"{t.name}.parquet", columns=columns) for t in tiles]
    return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=columns)


def file_fingerprint(path: Path, chunk: int = 1 << 22) -> dict:
    """Size, modification time and SHA-256 of a file (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    stat = path.stat()
    return {"path": str(path.resolve()), "size_bytes": stat.st_size, "mtime": stat.st_mtime, "sha256": digest.hexdigest()}
