"""Analyze: run the pipeline (``histo.run.pipeline.plan_slide`` → ``submit_tiles`` → ``finish_slide``) on
the whole slide or on a drawn rectangle, in Dask worker processes (TensorFlow never loads in
napari's process), with a progress bar of tiles done (in the widget and napari's activity panel), and
open the bundle on the slide.

A rectangle is cut from level 0 into ``OUT/crops/NAME.ome.tif`` with ``NAME.origin.json`` (where it
lies on its slide), and analysed as a crop; its bundle is placed back on the slide by the reader.
"""

import json
import shutil
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import dask
import numpy as np
from distributed import wait
from magicgui.widgets import ComboBox, Container, FileEdit, LineEdit
from napari.layers import Shapes
from napari.utils.notifications import show_error, show_info
from napari.viewer import Viewer
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget
from superqt.utils import GeneratorWorker

from histo.io.bundle import bundle_lock, partial_dir, slide_name
from histo.workflow import list_workflows
from napari_histo import _activity
from napari_histo._bundle import origin_file

WHOLE_SLIDE = "whole slide"
POLL_S = 0.25  # how often a run looks for Cancel while its tile tasks run (s)


def write_crop(slide: dict, box_um: tuple[float, float, float, float], folder: Path) -> Path:
    """Cut ``box_um`` (y0, x0, y1, x1 µm) of the slide ``slide`` (:func:`read_slide` metadata) at
    level 0 into ``folder/NAME.ome.tif`` plus ``NAME.origin.json``; returns the crop's path."""
    import tifffile

    from histo.io.slide import open_slide

    mpp = slide["mpp"]
    h_px, w_px = slide["shape_px"]
    y0, x0 = (max(0, int(np.floor(v / mpp))) for v in box_um[:2])
    y1, x1 = min(h_px, int(np.ceil(box_um[2] / mpp))), min(w_px, int(np.ceil(box_um[3] / mpp)))
    if y1 - y0 < 16 or x1 - x0 < 16:
        raise ValueError("the rectangle is smaller than 16 px or off the slide")
    pixels = open_slide(slide["path"]).read(x0, y0, x1 - x0, y1 - y0, mpp)
    folder.mkdir(parents=True, exist_ok=True)
    crop = folder / f"{slide_name(slide['path'])}_x{x0}_y{y0}_{x1 - x0}x{y1 - y0}.ome.tif"
    tifffile.imwrite(
        crop,
        pixels,
        photometric="rgb" if pixels.ndim == 3 else "minisblack",
        tile=(256, 256),
        metadata={"PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"},
    )
    origin_file(crop).write_text(json.dumps({"slide": slide, "x_um": x0 * mpp, "y_um": y0 * mpp}, indent=2))
    return crop


def rectangle_um(layer) -> tuple[float, float, float, float]:
    """Bounding box (y0, x0, y1, x1) µm of the selected shape of ``layer``, else of its last one."""
    if not len(layer.data):
        raise ValueError(f"draw a rectangle on {layer.name!r} first")
    i = min(layer.selected_data) if layer.selected_data else len(layer.data) - 1
    world = np.asarray(layer.data[i])[:, -2:] * layer.scale[-2:] + layer.translate[-2:]
    return (*world.min(0), *world.max(0))


def analyse(slide: dict, box_um, out: Path, workflow: str, model: str | None, client, cancelled: threading.Event):
    """Generator: the bundle of the slide ``slide`` (:func:`read_slide` metadata), or of its rectangle
    ``box_um`` (None = whole slide), made on ``client``; yields (tiles done, tiles total) as tile
    tasks finish and returns the bundle's path. Setting ``cancelled`` cancels the tile tasks within
    ``POLL_S`` (or, once they are all done, discards the bundle when it is written); a failed or
    cancelled run leaves no bundle, partial or complete. ``client`` is used by this thread only."""
    from histo.run.pipeline import EarlyFinish, finish_slide, plan_slide, submit_tiles, tile_finished

    path = Path(slide["path"]) if box_um is None else write_crop(slide, box_um, out / "crops")
    with bundle_lock(out, slide_name(path)):  # another writer of this bundle is refused
        try:
            plan = plan_slide(path, out, workflow, model, mpp=slide["mpp"])
            plan.early = EarlyFinish(plan)  # the finish starts while the tiles run, as in histo run
            totals: dict[str, float] = {}
            yield 0, len(plan.tiles)
            pending, done = set(submit_tiles(client, plan)), 0
            while pending:
                if cancelled.is_set():
                    client.cancel(list(pending))
                    raise CancelledError("analysis cancelled")
                try:
                    finished, pending = wait(pending, timeout=POLL_S, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    continue
                for future in finished:
                    tile_finished(plan, totals, future.result())
                done += len(finished)
                yield done, len(plan.tiles)
            bundle = finish_slide(client, plan, totals, show_progress=False)
        except BaseException:
            shutil.rmtree(partial_dir(out, slide_name(path)), ignore_errors=True)
            raise
    if cancelled.is_set():  # cancelled after its last tile task: the bundle is discarded all the same
        shutil.rmtree(bundle, ignore_errors=True)
        raise CancelledError("analysis cancelled")
    return bundle


class AnalyzeWidget(QWidget):
    """Dock widget: slide, region, workflow, model, output folder, Dask scheduler; Run, Cancel, and a
    progress bar of tiles segmented out of the total.

    Each run uses the scheduler given in the form (it starts as Dask's configured ``scheduler-address``),
    else a LocalCluster of its own, through a Client of its own used by the run's thread only (Dask
    clients closed from another thread can hang the thread waiting on them); Cancel sets an event
    that the run's thread acts on.
    """

    def __init__(self, napari_viewer: Viewer):
        super().__init__()
        self.viewer = viewer = napari_viewer
        self.worker, self.bar = None, None
        self.cancelled, self.phase = threading.Event(), ""
        self.form = Container(
            widgets=[
                ComboBox(name="slide", choices=lambda _: [lyr for lyr in viewer.layers if "slide" in lyr.metadata]),
                ComboBox(
                    name="region",
                    choices=lambda _: (
                        [WHOLE_SLIDE]
                        + [lyr for lyr in viewer.layers if isinstance(lyr, Shapes) and "bundle" not in lyr.metadata]
                    ),
                ),
                ComboBox(name="workflow", choices=list_workflows()),
                LineEdit(name="model", tooltip="empty: the workflow's model"),
                FileEdit(name="out", mode="d", value=Path.home() / "histo-results"),
                LineEdit(
                    name="scheduler",
                    value=dask.config.get("scheduler-address", None) or "",
                    tooltip="address of a Dask scheduler (tcp://host:port); empty: a local cluster",
                ),
            ]
        )
        self.run_button, self.cancel_button = QPushButton("Run"), QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress, self.status = QProgressBar(), QLabel("")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.timer, self.started = QTimer(self), 0.0
        self.timer.timeout.connect(
            lambda: self.status.setText(f"{self.phase}… {time.monotonic() - self.started:.0f} s")
        )
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(lambda _: self.form.reset_choices())

    def run(self):
        """Start the analysis in a thread; the bundle opens on the slide when it is written."""
        f = self.form
        if f.slide.value is None:
            show_error("open a slide first")
            return
        try:
            box = None if f.region.value == WHOLE_SLIDE else rectangle_um(f.region.value)
        except ValueError as exc:
            show_error(str(exc))
            return
        slide, out = f.slide.value.metadata["slide"], Path(f.out.value)
        self.cancelled = threading.Event()
        # superqt's worker, not napari's thread_worker: napari's re-raises and relays every error (a
        # cancel included) as a traceback notification, and its task-status hook fails on errors
        self.worker = GeneratorWorker(
            self._work, slide, box, out, f.workflow.value, f.model.value or None, f.scheduler.value
        )
        self.worker.yielded.connect(self._progress)
        self.worker.returned.connect(self._done)
        self.worker.errored.connect(self._failed)
        self.worker.finished.connect(self._idle)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)  # busy until the tiles are laid out
        self.progress.resetFormat()
        self.phase, self.started = "opening the slide, finding tissue", time.monotonic()
        self.timer.start(1000)
        self.bar = _activity.start(self.worker, f"Analyze {Path(slide['path']).name}")

    def _work(self, slide, box, out, workflow, model, scheduler):
        """Generator run in the worker thread: :func:`analyse` on a Client of this run's own."""
        from distributed import Client

        from histo.run.cluster import local_cluster

        cluster = None if scheduler else local_cluster()
        try:
            with Client(scheduler or cluster.scheduler_address) as client:
                return (yield from analyse(slide, box, out, workflow, model, client, self.cancelled))
        finally:
            if cluster is not None:
                cluster.close()

    def cancel(self):
        """Stop the run: its thread cancels its tile tasks; no bundle is left behind."""
        self.cancelled.set()
        self.phase = "cancelling"
        self.status.setText("cancelling…")

    def _progress(self, counts: tuple[int, int]):
        done, total = counts
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done if total else 1)
        self.progress.setFormat(f"{done} / {total} tiles (%p%)")
        self.bar.total = total
        self.bar.update(done - self.bar.n)
        if not self.cancelled.is_set():
            self.phase = "writing the bundle" if done == total else "segmenting tiles"

    def _done(self, bundle: Path):
        self.status.setText(f"bundle written: {bundle}")
        show_info(f"analysis done: {bundle}")
        self.viewer.open(str(bundle), plugin="napari-histo")

    def _failed(self, exc: Exception):
        if self.cancelled.is_set():
            self.status.setText("cancelled: no bundle written")
            show_info("analysis cancelled")
            return
        self.status.setText(f"failed: {exc}")
        show_error(f"analysis failed: {exc}")

    def _idle(self):
        self.timer.stop()
        if self.progress.maximum() == 0:  # ended before the tiles were laid out
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
