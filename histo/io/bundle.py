"""The result bundle: one folder per slide, written under a temporary name and renamed when done.

A bundle is complete only when its ``run.json`` says ``"status": "complete"``; ``run.json`` is the
last file written, and the folder only takes its final name after that.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import socket
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from histo.errors import HistoError
from histo.io.files import read_json, write_json

if TYPE_CHECKING:
    from histo.segment.tiling import Tile

SLIDE_SUFFIXES = (
    ".ome.tiff",
    ".ome.tif",
    ".ome.zarr",
    ".tiff",
    ".tif",
    ".svs",
    ".ndpi",
    ".mrxs",
    ".png",
    ".jpg",
    ".jpeg",
)
ID_COLUMNS = ("region_id", "kind", "name", "parent_id", "tissue_id")  # the id columns of a region table
MAX_NAME = 120  # characters of a bundle name (file systems allow 255 bytes; room for prefixes and suffixes)


def slide_name(path: str | Path) -> str:
    """Bundle name of a slide: its file name without extensions (``a.ome.tif`` → ``a``), made
    safe as a single folder name: ASCII letters, digits, ``._-`` only, no leading dot, at most
    MAX_NAME characters, so it can never escape the output folder or hide there. A name that had to
    be changed ends in a short hash of the original, so ``a b`` and ``a_b`` get different bundles."""
    name = Path(path).name
    for suffix in SLIDE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slide"
    if safe != name or len(safe) > MAX_NAME:
        safe = f"{safe[: MAX_NAME - 9]}-{hashlib.sha256(name.encode(errors='surrogateescape')).hexdigest()[:8]}"
    return safe


def partial_dir(out: Path, name: str) -> Path:
    """Where a bundle is built before it is renamed to ``out/name``."""
    return out / f".{name}.partial"


def publish(partial: Path, final: Path, run: dict) -> Path:
    """Write ``run.json`` last, then move the bundle to its final name (replacing an older one,
    which is put back if the move fails)."""
    write_json(partial / "run.json", run, default=str)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        try:
            os.replace(partial, final)
        except OSError:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    return final


@contextmanager
def write_errors(partial: Path):
    """An OSError while a bundle is built (disk full, no permission, read-only folder) becomes a
    HistoError naming the file; the half-built ``partial`` folder is removed. Complete bundles,
    renamed into place only when whole, are untouched."""
    try:
        yield
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        problem = exc.strerror or str(exc).removeprefix(f"[Errno {exc.errno}] ")
        raise HistoError(
            exc.filename or partial.parent, f"cannot write the bundle: {problem}; the bundles already complete are kept"
        ) from None


def bundle_lock(out: Path, name: str) -> OutputLock:
    """The lock of bundle ``name`` in ``out`` (created if missing): one writer per bundle."""
    with write_errors(partial_dir(out, name)):
        out.mkdir(parents=True, exist_ok=True)
    return OutputLock(out / f".{name}.lock", f"the bundle '{name}'")


class OutputLock:
    """An exclusive lock on the file ``path`` (``flock``) while this process writes what it guards.

    The kernel drops the lock when the process exits or is killed, so a lock left by a killed run
    never blocks the next one. The file holds the holder's pid, host and start time, quoted to the
    process that is refused. ``what`` names what is guarded, for that message."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def acquire(self) -> OutputLock:
        """Take the lock, or raise HistoError naming the folder and the holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise HistoError(self.path.parent, f"cannot write into this folder: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "starting"
            os.close(fd)
            raise HistoError(
                self.path.parent,
                f"{self.what} is being written by another histo process "
                f"({holder}); wait for it to end or use another output folder",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now():%Y-%m-%d %H:%M:%S}".encode(), 0
        )
        self.fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file drops it); a no-op when not held."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def is_complete(bundle: Path) -> bool:
    """True when ``bundle/run.json`` exists and says the run completed."""
    try:
        return read_json(bundle / "run.json").get("status") == "complete"
    except (OSError, ValueError):
        return False


def concat_cells(
    parts_dir: Path,
    tiles: list[Tile],
    out: Path,
    schema: pa.Schema,
    extra: pd.DataFrame | None = None,
    drop: np.ndarray | None = None,
) -> tuple[int, dict[str, int]]:
    """Stream the per-tile parts (columns ``schema``), in tile order, into ``cells.parquet`` (one row
    group per non-empty tile), leaving out the rows ``drop`` marks (a mask over the parts' rows in
    that order), numbering the nuclei ``label`` = 1, 2, … and appending the columns of ``extra``
    (one row per kept nucleus in the same order: cell types, region ids).

    Returns the number of cells and a map tile name → row group index. Holds one tile at a time.
    """
    extra_table = None if extra is None else pa.Table.from_pandas(extra, preserve_index=False)
    out_schema = schema.append(pa.field("label", pa.int32()))
    for field in extra_table.schema if extra_table is not None else ():
        out_schema = out_schema.append(field)
    n, read, groups = 0, 0, {}
    with pq.ParquetWriter(out, out_schema) as writer:
        for tile in tiles:
            part = pq.read_table(parts_dir / f"{tile.name}.parquet", schema=schema)
            read += part.num_rows
            if drop is not None:
                part = part.filter(pa.array(~drop[read - part.num_rows : read]))
            if part.num_rows == 0:
                continue
            part = part.append_column("label", pa.array(range(n + 1, n + 1 + part.num_rows), pa.int32()))
            for name in extra_table.column_names if extra_table is not None else ():
                part = part.append_column(name, extra_table.column(name).slice(n, part.num_rows).combine_chunks())
            writer.write_table(part)
            groups[tile.name] = len(groups)
            n += part.num_rows
    return n, groups


def read_part(parts_dir: Path, tile_name: str, columns: list[str]) -> pa.Table:
    """``columns`` of the part one tile task wrote (``<tile>.parquet`` in ``parts_dir``)."""
    return pq.read_table(Path(parts_dir) / f"{tile_name}.parquet", columns=columns)


def read_parts(
    parts_dir: Path, tiles: list[Tile], columns: list[str], read: dict[str, pa.Table] | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """``columns`` of all tiles' parts, concatenated in tile order (the order of ``concat_cells``),
    and each row's tile (its index in ``tiles``). ``read``: parts already read by tile name (taken
    out of it, not kept twice); the others are read from ``parts_dir``."""
    read = {} if read is None else read
    tables = [read.pop(t.name) if t.name in read else read_part(parts_dir, t.name, columns) for t in tiles]
    tile_index = np.repeat(np.arange(len(tables)), [t.num_rows for t in tables])
    return (pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=columns)), tile_index


def check_same_input(bundle: Path, slide: Path) -> None:
    """HistoError naming ``bundle`` when it holds the results of another input file than ``slide``
    (the SHA-256 in its ``run.json``; not recomputed when path, size and mtime are the ones recorded)."""
    try:
        seen = read_json(bundle / "run.json")["input"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no bundle there, or no record of its input
    stat = slide.stat()
    if (seen.get("path"), seen.get("size_bytes"), seen.get("mtime")) == (
        str(slide.resolve()),
        stat.st_size,
        stat.st_mtime,
    ):
        return
    if file_fingerprint(slide)["sha256"] != seen.get("sha256"):
        raise HistoError(
            bundle,
            f"this bundle holds the results of another input ({seen.get('path')}); "
            "give --overwrite to replace it, or another --out",
        )


def file_fingerprint(path: Path, chunk: int = 1 << 22) -> dict:
    """Size, modification time and SHA-256 of a file (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "size_bytes": stat.st_size,
        "mtime": stat.st_mtime,
        "sha256": digest.hexdigest(),
    }
