"""Versions of what shaped a result, for run.json and model cards."""

from __future__ import annotations

import platform
from importlib import metadata

from histo import __version__

PACKAGES = ("numpy", "dask", "distributed", "tifffile", "imagecodecs", "zarr", "scikit-image", "stardist",
            "csbdeep", "tensorflow-cpu", "keras", "shapely", "pyarrow", "pandas", "geopandas")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict:
    """Python, histo and the installed ``packages`` (distribution names) with their versions."""
    found = {"python": platform.python_version(), "histo": __version__}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found
