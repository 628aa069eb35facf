"""Review regions: a sortable table of a bundle's structures; accept, reject, reclassify, redraw or
add regions on the regions layer, then *Save* writes them back, re-measures and redraws the
overview and report (histo.outputs.review) in a worker thread, shown in napari's activity panel."""

from pathlib import Path

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox
from napari.utils.notifications import show_error, show_info
from napari.viewer import Viewer
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget
from superqt.utils import FunctionWorker

from histo.errors import HistoError
from histo.outputs.review import read_regions, save_review
from histo.structures.regions import KINDS
from napari_histo import _activity
from napari_histo._bundle import region_colors, region_shapes, regions_from_shapes

COLUMNS = (
    "region_id",
    "kind",
    "review",
    "grade",
    "area_mm2",
    "n_cells",
    "density_cells_per_mm2",
    "fraction_lymphocyte",
)
EDITABLE = tuple(k for k in KINDS if k != "tissue")  # kinds a reviewer can give a region


def regions_layers(viewer) -> list:
    """The viewer's regions layers (Shapes with a ``bundle`` in their metadata)."""
    from napari.layers import Shapes

    return [lyr for lyr in viewer.layers if isinstance(lyr, Shapes) and "bundle" in lyr.metadata]


class ReviewWidget(QWidget):
    """Dock widget: table of the structures of the chosen regions layer, review buttons, *Save*."""

    def __init__(self, napari_viewer: Viewer):
        super().__init__()
        self.viewer = viewer = napari_viewer
        self.layer_box = ComboBox(label="regions", choices=lambda _: regions_layers(viewer))
        self.kind_box = ComboBox(label="kind", choices=EDITABLE, value="aggregate")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self.zoom_to_selection)
        buttons = {
            "Accept": lambda: self.set_feature("review", "accepted"),
            "Reject": lambda: self.set_feature("review", "rejected"),
            "Set kind": lambda: self.set_feature("kind", self.kind_box.value),
            "Redraw": self.redraw,
            "Add": self.add,
            "Save": self.save,
        }
        self.buttons = {}
        row = QHBoxLayout()
        for text, slot in buttons.items():
            self.buttons[text] = QPushButton(text)
            self.buttons[text].clicked.connect(slot)
            row.addWidget(self.buttons[text])
        layout = QVBoxLayout(self)
        layout.addWidget(self.layer_box.native)
        layout.addWidget(self.kind_box.native)
        layout.addWidget(self.table)
        layout.addLayout(row)
        self.layer_box.changed.connect(self.refresh)
        viewer.layers.events.inserted.connect(lambda _: self.layer_box.reset_choices())
        viewer.layers.events.removed.connect(lambda _: self.layer_box.reset_choices())
        self.refresh()

    @property
    def layer(self):
        return self.layer_box.value

    def refresh(self, *_):
        """Fill the table from the layer's shapes and the bundle's metrics (structures only)."""
        self.table.setSortingEnabled(False)
        self.table.setRowCount(0)
        if self.layer is None:
            return
        metrics = pd.read_parquet(Path(self.layer.metadata["bundle"]) / "metrics.parquet").set_index("region_id")
        features = self.layer.features
        shown = [i for i, k in enumerate(features.kind) if k != "tissue"]
        self.table.setRowCount(len(shown))
        for r, i in enumerate(shown):
            rid = features.region_id.iloc[i]
            for c, col in enumerate(COLUMNS):
                value = features[col].iloc[i] if col in features else metrics[col].get(rid) if col in metrics else None
                item = QTableWidgetItem()
                if isinstance(value, (int, float, np.number)) and not pd.isna(value):
                    item.setData(Qt.DisplayRole, float(value))
                else:
                    item.setText("" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value))
                item.setData(Qt.UserRole, i)
                self.table.setItem(r, c, item)
        self.table.setSortingEnabled(True)

    def selected(self) -> list[int]:
        """Shape indices of the selected table rows, else of the shapes selected on the canvas."""
        rows = {self.table.item(ix.row(), 0).data(Qt.UserRole) for ix in self.table.selectionModel().selectedRows()}
        return sorted(rows or (self.layer.selected_data if self.layer is not None else set()))

    def zoom_to_selection(self):
        """Select the rows' shapes and fit the view to them."""
        idx = self.selected()
        if not idx:
            return
        self.layer.selected_data = set(idx)
        pts = np.concatenate([np.asarray(self.layer.data[i])[:, -2:] for i in idx])
        lo, hi = pts.min(0), pts.max(0)
        self.viewer.camera.center = tuple((lo + hi) / 2)
        canvas = np.asarray(self.viewer.canvas.size, float)  # (h, w) screen px
        self.viewer.camera.zoom = 0.8 * float(np.min(canvas / np.maximum(hi - lo, 1.0)))

    def set_feature(self, column: str, value: str):
        """Set ``column`` of the selected regions (all parts of each) and recolour."""
        idx = self.selected()
        if not idx:
            show_info("select a region in the table or on the canvas first")
            return
        features = self.layer.features.copy()
        ids = set(features.region_id.iloc[idx].dropna()) - {""}
        rows = features.index[features.region_id.isin(ids)].union(features.index[idx])
        features.loc[rows, column] = value
        self.layer.features = features
        self.layer.face_color, self.layer.edge_color = region_colors(features)
        self.refresh()

    def redraw(self):
        """Vertex editing of the selected region: drag its vertices, then *Save*."""
        self.layer.selected_data = set(self.selected())
        self.layer.mode = "direct"
        self.viewer.layers.selection.active = self.layer

    def add(self):
        """Draw a new region of the chosen kind (polygon mode); it is accepted when drawn."""
        self.table.clearSelection()
        self.layer.selected_data = set()  # napari gives the selected shapes the current colours set below
        self.layer.feature_defaults = {
            "region_id": "",
            "kind": self.kind_box.value,
            "name": self.kind_box.value,
            "review": "accepted",
            "grade": np.nan,
        }
        self.layer.current_face_color, self.layer.current_edge_color = (
            c[0]
            for c in region_colors(
                pd.DataFrame({"kind": [self.kind_box.value], "grade": [np.nan], "review": ["accepted"]})
            )
        )
        self.viewer.layers.selection.active = self.layer
        self.layer.mode = "add_polygon"

    def save(self):
        """Write the reviewed regions, their re-measured metrics and the redrawn overview and report
        into the bundle, in a worker thread (the buttons wait meanwhile); then reload the layer."""
        layer = self.layer
        bundle = Path(layer.metadata["bundle"])
        offset = np.asarray(layer.metadata["offset_um"], float)
        try:
            regions = regions_from_shapes(layer.data, layer.features, offset, read_regions(bundle))
        except HistoError as exc:
            show_error(str(exc))
            return
        layer.mode = "pan_zoom"
        layer.selected_data = set()
        worker = FunctionWorker(write_review, bundle, regions, offset)
        worker.returned.connect(lambda shapes: self._saved(layer, *shapes))
        worker.errored.connect(lambda exc: show_error(f"{bundle.name}: review not saved: {exc}"))
        worker.finished.connect(lambda: self.enable(True))
        self.enable(False)
        _activity.start(worker, f"{bundle.name}: saving the review")

    def enable(self, on: bool):
        """Review buttons on or off (off while a review is saved)."""
        for button in self.buttons.values():
            button.setEnabled(on)

    def _saved(self, layer, data, features):
        """Show the saved regions on ``layer``."""
        layer.data = []
        layer.add_polygons(data)
        layer.features = features
        layer.face_color, layer.edge_color = region_colors(features)
        self.refresh()
        show_info(
            f"{Path(layer.metadata['bundle']).name}: regions saved and re-measured ({len(data)} shapes); "
            "overview and report redrawn"
        )


def write_review(bundle: Path, regions, offset) -> tuple[list, pd.DataFrame]:
    """:func:`histo.outputs.review.save_review`, then the saved regions as shapes (worker thread: no Qt)."""
    save_review(bundle, regions)
    return region_shapes(read_regions(bundle), offset)
