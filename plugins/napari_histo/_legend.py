"""Cell-type legend: the colour of each cell type on a bundle's cell-types layer, with its nuclei, and
the switch between nuclei drawn as outlines (the default) and filled. The reader docks it with every
bundle, before the bundle's layers are added: it draws their nuclei."""

import html

from napari.layers import Labels
from napari.viewer import Viewer
from qtpy.QtWidgets import QCheckBox, QLabel, QVBoxLayout, QWidget

OUTLINE_PX = 1  # width of a nucleus's outline (labels ``contour``); 0 fills it


class LegendWidget(QWidget):
    """Dock widget: the legend of the selected cell-types layer (``metadata["legend"]`` of
    :func:`napari_histo._bundle.cell_type_layer`), else of the topmost one; it follows the layer list.
    *Filled nuclei* fills the nuclei of every bundle's labels layers; unticked, they are outlines."""

    def __init__(self, napari_viewer: Viewer):
        super().__init__()
        self.viewer, self.entries = napari_viewer, {}
        self.label = QLabel()
        self.filled = QCheckBox("Filled nuclei")
        self.filled.toggled.connect(lambda _: self.fill())
        layout = QVBoxLayout(self)
        layout.addWidget(self.label)
        layout.addWidget(self.filled)
        layout.addStretch()
        layers = napari_viewer.layers
        for event in (layers.events.inserted, layers.events.removed, layers.selection.events.active):
            event.connect(self.refresh)
        layers.events.inserted.connect(lambda event: self.draw(event.value))
        self.fill()
        self.refresh()

    def layer(self):
        """The cell-types layer shown: the selected one, else the topmost."""
        typed = [lyr for lyr in self.viewer.layers if "legend" in lyr.metadata]
        active = self.viewer.layers.selection.active
        return active if active in typed else (typed[-1] if typed else None)

    def draw(self, layer):
        """A bundle's labels layer with its nuclei filled or outlined, as *Filled nuclei* says."""
        if isinstance(layer, Labels) and "bundle" in layer.metadata:
            layer.contour = 0 if self.filled.isChecked() else OUTLINE_PX

    def fill(self):
        """Every bundle's nuclei filled or outlined, as *Filled nuclei* says."""
        for layer in self.viewer.layers:
            self.draw(layer)

    def refresh(self, *_):
        """Show the layer's types: a swatch of each colour, the type and its number of nuclei."""
        layer = self.layer()
        if layer is None:
            self.entries = {}
            self.label.setText("open a result bundle to see its cell types")
            return
        self.entries, counts = dict(layer.metadata["legend"]), layer.metadata.get("counts", {})
        rows = "".join(
            f"<tr><td style='color:{color}'>&#9632;</td><td>{html.escape(name)}</td>"
            f"<td align='right'>{counts.get(name, 0):,}</td></tr>"
            for name, color in self.entries.items()
        )
        self.label.setText(f"<b>{html.escape(layer.name)}</b><table cellspacing='4'>{rows}</table>")
