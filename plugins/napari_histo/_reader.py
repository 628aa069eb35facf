"""Readers: a slide file opens as a multiscale image in µm; a bundle folder (one holding ``run.json``)
as overlays on its slide, with the cell-type legend docked. Anything else is left to other plugins
(napari-ome-zarr, napari-spatialdata, napari's own reader).

Problems with the input (an incomplete bundle, a bundle of another slide than the one shown, an
unreadable slide) are shown as one-line error notifications, not tracebacks.
"""

from __future__ import annotations

from pathlib import Path

from histo.errors import HistoError
from histo.io.bundle import SLIDE_SUFFIXES

NO_LAYERS = [(None,)]  # npe2's "read, nothing to add" sentinel
SLIDE_FILES = tuple(s for s in SLIDE_SUFFIXES if s != ".ome.zarr")  # OME-Zarr folders: napari-ome-zarr's
LEGEND = "Cell-type legend"  # the legend's display name in napari.yaml


def get_reader(path):
    """napari reader hook: a slide file (by suffix) or a bundle folder (one holding ``run.json``);
    None for anything else, so that another plugin reads it."""
    if isinstance(path, list):
        return None
    p = Path(path)
    if p.is_file() and p.name.lower().endswith(SLIDE_FILES):
        return reporting(read_slide)
    if (p / "run.json").is_file():
        return reporting(read_bundle)
    return None


def reporting(read):
    """``read`` with HistoError shown as an error notification (and no layers) instead of raised."""

    def reader(path):
        from napari.utils.notifications import show_error

        try:
            return read(path)
        except HistoError as exc:
            show_error(str(exc))
            return NO_LAYERS

    return reader


def read_slide(path) -> list[tuple]:
    """The slide as one multiscale image layer scaled in µm (y, x); ``metadata["slide"]`` describes
    it (path, size, shape, µm/px) so bundles can be checked against it."""
    from histo.io.slide import open_slide

    slide = open_slide(path)
    scales = [(slide.mpp * d, slide.mpp * d) for d in slide.downsamples]
    p = Path(path).resolve()
    about = {"path": str(p), "size_bytes": p.stat().st_size, "shape_px": list(slide.shape[:2]), "mpp": slide.mpp}
    meta = {
        "name": p.name,
        "multiscale": True,
        "scale": scales[0],
        "translate": [s / 2 for s in scales[0]],
        "rgb": slide.kind == "brightfield",
        "metadata": {"slide": about},
    }
    return [(slide.levels, meta, "image")]


def shown_slides(viewer) -> list[dict]:
    """Descriptions of the slides open in ``viewer`` (image layers from :func:`read_slide`)."""
    return [lyr.metadata["slide"] for lyr in (viewer.layers if viewer else []) if "slide" in lyr.metadata]


def read_bundle(path) -> list[tuple]:
    """A bundle's overlays: nucleus labels, cell types and regions, placed on its slide. The slide
    itself is added too when the viewer shows no slide and the file is still where the run read it.
    A bundle of another slide than the one shown is refused. The cell-type legend is docked."""
    import napari
    from napari.utils.notifications import show_warning

    from histo.outputs.review import read_run
    from napari_histo._bundle import cell_type_layer, nuclei_layer, regions_layer, same_slide, slide_of

    bundle = Path(path).resolve()
    run = read_run(bundle)
    slide, offset = slide_of(run)
    viewer = napari.current_viewer()
    shown = shown_slides(viewer)
    layers = []
    if shown and not any(same_slide(s, slide) for s in shown):
        names = ", ".join(Path(s["path"]).name for s in shown)
        raise HistoError(
            bundle,
            f"this bundle is of {Path(slide['path']).name} ({slide['shape_px']} px), "
            f"not of the slide shown ({names}); open its own slide first",
        )
    if not shown:
        if Path(slide["path"]).exists():
            layers += read_slide(slide["path"])
        else:
            show_warning(f"{bundle}: its slide {slide['path']} is not there; overlays are shown without it")
    layers += [nuclei_layer(bundle, offset), cell_type_layer(bundle, offset), regions_layer(bundle, offset)]
    if viewer is not None:  # the legend follows the layer list: it shows these once they are added
        viewer.window.add_plugin_dock_widget("napari-histo", LEGEND)
    return layers
