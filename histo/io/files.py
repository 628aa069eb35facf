"""Small file mechanics every room shares: a write that is never seen half done, and JSON in and out.

``atomic_write`` writes a temporary file in the target's own folder, then ``os.replace``-s it onto the
target, so a reader (or a run that is killed mid-write) sees the old file or the new one, never a
truncated one. It writes text or bytes when given them, or hands a temporary path to a writer that
needs one (parquet, HDF5):

>>> atomic_write(folder / "notes.txt", "text")  # doctest: +SKIP
>>> with atomic_write(folder / "part.parquet", unique=True) as tmp:  # doctest: +SKIP
...     pq.write_table(table, tmp)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "read_json", "write_json", "json_default"]

_MISSING = object()


class atomic_write:  # noqa: N801 - used like a function
    """Write ``path`` through a temporary file in the same folder and ``os.replace``.

    Parameters
    ----------
    path : str or Path
        The file to write (its folder must exist).
    data : str or bytes, optional
        Written at once (text as ``encoding``) and ``path`` replaced. Without it, use the object as a
        context manager: ``with atomic_write(path) as tmp:`` gives the temporary path to write to;
        ``path`` is replaced when the block ends without an error, and the temporary file removed
        when it raises.
    encoding : str
        Encoding of text ``data``.
    unique : bool
        Give the temporary file this process's id (``<name>.tmp<pid>``) for files that several
        processes may write at once; otherwise it is ``<name>.tmp``.

    Attributes
    ----------
    path : Path
        The target.
    tmp : Path
        The temporary file, beside the target.
    """

    def __init__(
        self, path: str | Path, data: str | bytes | None = None, *, encoding: str = "utf-8", unique: bool = False
    ):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid() if unique else ''}")
        if data is not None:
            with self as tmp:
                if isinstance(data, bytes):
                    tmp.write_bytes(data)
                else:
                    tmp.write_text(data, encoding=encoding)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            try:
                self.tmp.unlink(missing_ok=True)
            except OSError:
                pass


def json_default(o: Any):
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths; TypeError for anything else."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | Path, missing: Any = _MISSING) -> Any:
    """The JSON value in ``path`` (UTF-8).

    Parameters
    ----------
    path : str or Path
        The file.
    missing : optional
        Returned when the file does not exist; without it, FileNotFoundError is raised.

    Returns
    -------
    The parsed value (``json.JSONDecodeError``, a ValueError, if it is not JSON).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing is _MISSING:
            raise
        return missing
    return json.loads(text)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, default=json_default, **dumps_kwargs) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (:class:`atomic_write`).

    Parameters
    ----------
    path : str or Path
        The file.
    obj
        Anything ``json.dumps`` takes; numpy values and paths through ``default`` (:func:`json_default`).
    indent, default, **dumps_kwargs
        Passed to ``json.dumps``.

    Returns
    -------
    Path : ``path``.
    """
    atomic_write(path, json.dumps(obj, indent=indent, default=default, **dumps_kwargs))
    return Path(path)
