"""Cell-type legend: the colour of each cell type on a bundle's cell-types layer, with its nuclei."""

from __future__ import annotations

import html

from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget


class LegendWidget(QWidget):
    """Dock widget: the legend of the selected cell-types layer (``metadata["legend"]`` of
    :func:`napari_histo._bundle.cell_type_layer`), else of the topmost one; it follows the layer list."""

    def __init__(self, viewer):
        super().__init__()
        self.viewer, self.entries = viewer, {}
        self.label = QLabel()
        QVBoxLayout(self).addWidget(self.label)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.selection.events.active):
            event.connect(self.refresh)
        self.refresh()

    def layer(self):
        """The cell-types layer shown: the selected one, else the topmost."""
        typed = [lyr for lyr in self.viewer.layers if "legend" in lyr.metadata]
        active = self.viewer.layers.selection.active
        return active if active in typed else (typed[-1] if typed else None)

    def refresh(self, *_):
        """Show the layer's types: a swatch of each colour, the type and its number of nuclei."""
        layer = self.layer()
        if layer is None:
            self.entries = {}
            self.label.setText("open a result bundle to see its cell types")
            return
        self.entries, counts = dict(layer.metadata["legend"]), layer.metadata.get("counts", {})
        rows = "".join(f"<tr><td style='color:{color}'>&#9632;</td><td>{html.escape(name)}</td>"
                       f"<td align='right'>{counts.get(name, 0):,}</td></tr>" for name, color in self.entries.items())
        self.label.setText(f"<b>{html.escape(layer.name)}</b><table cellspacing='4'>{rows}</table>")
