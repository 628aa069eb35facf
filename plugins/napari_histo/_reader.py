"""Readers: a slide opens as a multiscale image in µm; a bundle folder as nucleus labels in µm."""

from __future__ import annotations

from pathlib import Path

from histo.bundle import SLIDE_SUFFIXES


def get_reader(path):
    """napari reader hook: a function for slides and bundle folders, None for anything else."""
    if isinstance(path, list):
        return None
    p = Path(path)
    if p.is_dir() and (p / "run.json").exists():
        return read_bundle
    if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES):
        return read_slide
    return None


def read_slide(path) -> list[tuple]:
    """The slide as one multiscale image layer scaled in µm (y, x)."""
    from histo.slide import open_slide

    slide = open_slide(path)
    scales = [(slide.mpp * d, slide.mpp * d) for d in slide.downsamples]
    meta = {"name": Path(path).name, "multiscale": True, "scale": scales[0],
            "rgb": slide.kind == "brightfield", "metadata": {"mpp": slide.mpp}}
    return [(slide.levels, meta, "image")]


def read_bundle(path) -> list[tuple]:
    """The bundle's nucleus labels (``labels.ome.zarr``) as a multiscale labels layer in µm."""
    import dask.array as da
    import zarr

    root = zarr.open_group(str(Path(path) / "labels.ome.zarr"), mode="r")
    datasets = root.attrs.asdict().get("ome", root.attrs.asdict())["multiscales"][0]["datasets"]
    levels = [da.from_zarr(root[d["path"]]) for d in datasets]
    scale = datasets[0]["coordinateTransformations"][0]["scale"]
    return [(levels, {"name": f"{Path(path).name} nuclei", "multiscale": True, "scale": scale}, "labels")]
