"""Sample data: a generated H&E lymph-node slide (with ground truth beside it) and its bundle, made
once into ``$HISTO_SAMPLE_DIR`` (default ``~/.cache/histo/napari-sample``).

The bundle is analysed on first use by the Analyze widget, docked and running in the background (a
few minutes on a laptop): the slide shows at once, the overlays when the analysis is done.
"""

import os
from pathlib import Path

from histo.io.bundle import is_complete, slide_name

SIZE_PX = 2048  # level-0 side at 0.5 µm/px: 1 mm², a few follicles
SEED = 1
ANALYZE = "Analyze"  # the Analyze widget's display name in napari.yaml


def sample_folder() -> Path:
    return Path(os.environ.get("HISTO_SAMPLE_DIR", Path.home() / ".cache" / "histo" / "napari-sample"))


def sample_slide_path(kind: str = "lymph-node") -> Path:
    """The generated slide (``SIZE_PX`` wide), written on first use."""
    from histo_sample import write_sample

    path = sample_folder() / f"{kind}-sample-{SIZE_PX}.ome.tif"
    if not path.exists():
        write_sample(kind, path, size=SIZE_PX, seed=SEED, mpp=0.5)
    return path


def bundle_folder(slide: Path) -> Path:
    """Where the sample slide's bundle is written: ``bundles/`` beside it."""
    return slide.parent / "bundles"


def lymph_node_slide() -> list[tuple]:
    """napari sample: the generated lymph-node slide."""
    from napari_histo._reader import read_slide

    return read_slide(sample_slide_path())


def lymph_node_bundle() -> list[tuple]:
    """napari sample: the generated lymph-node slide with its analysis overlays. Before the bundle
    exists, the slide alone, and the Analyze widget docked, making the bundle; it opens when done."""
    import napari

    from napari_histo._reader import read_bundle, read_slide

    slide = sample_slide_path()
    bundle = bundle_folder(slide) / slide_name(slide)
    if is_complete(bundle):
        return read_bundle(bundle)
    viewer = napari.current_viewer()

    def added(event):  # the analysis starts once the slide's layer is in the viewer
        if event.value.metadata.get("slide", {}).get("path") == str(slide.resolve()):
            viewer.layers.events.inserted.disconnect(added)
            analyse_sample(viewer, slide)

    viewer.layers.events.inserted.connect(added)
    return read_slide(slide)


def analyse_sample(viewer, slide: Path) -> None:
    """Dock the Analyze widget and run it on the whole sample ``slide`` into :func:`bundle_folder`."""
    from napari.utils.notifications import show_info

    from napari_histo._analyze import WHOLE_SLIDE

    _, widget = viewer.window.add_plugin_dock_widget("napari-histo", ANALYZE)
    form = widget.form
    form.reset_choices()
    form.slide.value = next(lyr for lyr in form.slide.choices if lyr.metadata["slide"]["path"] == str(slide.resolve()))
    form.region.value, form.workflow.value, form.out.value = WHOLE_SLIDE, "lymph-node-he", bundle_folder(slide)
    widget.run_button.click()
    show_info(
        f"analysing the sample slide {slide.name} (minutes, once): its overlays open when it is done; "
        "progress in the Analyze panel"
    )
