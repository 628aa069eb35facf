"""Export: a bundle's metrics table as CSV (plain, or Excel-friendly) and its regions as QuPath GeoJSON
in the slide's level-0 pixels (a bundle of a rectangle is shifted back onto its slide).

No ``from __future__ import annotations`` here: magicgui reads the widget's annotations at run time.
"""

from pathlib import Path

import pandas as pd
import shapely
from magicgui import magic_factory

from histo.outputs.export import write_regions_geojson
from histo.outputs.review import read_regions, read_run
from napari_histo._bundle import slide_of


def export_metrics(bundle: str | Path, out: str | Path, excel: bool = True) -> Path:
    """``metrics.parquet`` as CSV; ``excel``: UTF-8 with a byte-order mark and CRLF line ends, which
    Excel opens with the µ and accents intact."""
    table = pd.read_parquet(Path(bundle) / "metrics.parquet")
    table.to_csv(out, index=False, encoding="utf-8-sig" if excel else "utf-8", lineterminator="\r\n" if excel else "\n")
    return Path(out)


def export_qupath(bundle: str | Path, out: str | Path) -> Path:
    """Regions with their metrics as a QuPath GeoJSON on the bundle's slide (level-0 px)."""
    slide, (dy, dx) = slide_of(read_run(bundle))
    regions = read_regions(bundle)
    regions["geometry"] = shapely.transform(regions.geometry.to_numpy(), lambda xy: xy + (dx, dy))
    metrics = pd.read_parquet(Path(bundle) / "metrics.parquet")
    return write_regions_geojson(regions.drop(columns="review"), out, slide["mpp"], metrics)


def beside(bundle: Path) -> tuple[Path, Path]:
    """Default export files of ``bundle``: ``NAME.metrics.csv`` and ``NAME.qupath.geojson`` beside it."""
    return bundle.with_name(f"{bundle.name}.metrics.csv"), bundle.with_name(f"{bundle.name}.qupath.geojson")


def init_export(widget) -> None:
    """The bundle of the topmost bundle layer of the current viewer, the export files beside it; a
    bundle chosen later moves them beside it too."""
    import napari

    def follow(bundle):
        widget.metrics_csv.value, widget.regions_geojson.value = beside(Path(bundle))

    widget.bundle.changed.connect(follow)
    viewer = napari.current_viewer()
    shown = [lyr.metadata["bundle"] for lyr in (viewer.layers if viewer else []) if "bundle" in lyr.metadata]
    if shown:
        widget.bundle.value = shown[-1]


@magic_factory(
    call_button="Export",
    widget_init=init_export,
    bundle={"mode": "d"},
    metrics_csv={"mode": "w", "filter": "*.csv"},
    regions_geojson={"mode": "w", "filter": "*.geojson"},
)
def export_widget(
    bundle: Path,
    metrics_csv: Path = Path("metrics.csv"),
    excel: bool = True,
    regions_geojson: Path = Path("regions.geojson"),
) -> None:
    """Write the bundle's metrics CSV and its regions for QuPath."""
    from napari.utils.notifications import show_error, show_info

    from histo.errors import HistoError

    try:
        read_run(bundle)  # a folder that is not a complete bundle: one line saying so
        export_metrics(bundle, metrics_csv, excel)
        export_qupath(bundle, regions_geojson)
    except HistoError as exc:
        show_error(str(exc))
        return
    show_info(f"exported {metrics_csv} and {regions_geojson}")
