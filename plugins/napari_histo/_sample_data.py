"""Sample data: a generated H&E lymph-node slide (with ground truth beside it) and its bundle, made
once into ``$HISTO_SAMPLE_DIR`` (default ``~/.cache/histo/napari-sample``)."""

from __future__ import annotations

import os
from pathlib import Path

from histo.bundle import is_complete, slide_name

SIZE_PX = 2048  # level-0 side at 0.5 µm/px: 1 mm², a few follicles
SEED = 1


def sample_folder() -> Path:
    return Path(os.environ.get("HISTO_SAMPLE_DIR", Path.home() / ".cache" / "histo" / "napari-sample"))


def sample_slide_path(kind: str = "lymph-node", size: int = SIZE_PX, folder: Path | None = None) -> Path:
    """The generated slide, written on first use."""
    from histo_sample import write_sample

    path = (folder or sample_folder()) / f"{kind}-sample-{size}.ome.tif"
    if not path.exists():
        write_sample(kind, path, size=size, seed=SEED, mpp=0.5)
    return path


def sample_bundle_path(kind: str = "lymph-node", size: int = SIZE_PX, folder: Path | None = None, client=None) -> Path:
    """The sample slide's bundle, analysed on first use (Dask worker processes; takes minutes)."""
    from histo.pipeline import run_slide

    slide = sample_slide_path(kind, size, folder)
    bundle = slide.parent / "bundles" / slide_name(slide)
    if not is_complete(bundle):
        run_slide(slide, bundle.parent, f"{kind}-he", client=client, show_progress=False)
    return bundle


def lymph_node_slide() -> list[tuple]:
    """napari sample: the generated lymph-node slide."""
    from napari_histo._reader import read_slide

    return read_slide(sample_slide_path())


def lymph_node_bundle() -> list[tuple]:
    """napari sample: the generated lymph-node slide with its analysis overlays."""
    from napari_histo._reader import read_bundle

    return read_bundle(sample_bundle_path())
