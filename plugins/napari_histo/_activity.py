"""Work off napari's GUI thread, shown in napari's activity panel while it runs."""

from napari.utils import progress
from superqt.utils import WorkerBase


def start(worker: WorkerBase, desc: str, total: int = 0) -> progress:
    """Start ``worker`` (a superqt worker) with a progress bar ``desc`` in the activity panel, closed
    when the worker finishes; ``total`` 0: busy, without a count. The bar is updated by its owner, in
    the GUI thread (e.g. from the worker's ``yielded`` signal)."""
    bar = progress(total=total, desc=desc)
    worker.finished.connect(bar.close)
    worker.start()
    return bar
