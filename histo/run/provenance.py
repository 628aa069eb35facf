"""Versions of what shaped a result, for run.json and model cards."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

from histo import __version__

PACKAGES = (
    "numpy",
    "dask",
    "distributed",
    "tifffile",
    "imagecodecs",
    "zarr",
    "scikit-image",
    "stardist",
    "csbdeep",
    "tensorflow-cpu",
    "keras",
    "shapely",
    "pyarrow",
    "pandas",
    "geopandas",
)


def versions(packages: tuple[str, ...] = PACKAGES) -> dict:
    """Python, histo and the installed ``packages`` (distribution names) with their versions."""
    return dict(_versions(packages))


@functools.cache
def _versions(packages: tuple[str, ...]) -> dict:
    """:func:`versions`, looked up once per process (0.05 s, at the end of every run)."""
    found = {"python": platform.python_version(), "histo": __version__}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found
