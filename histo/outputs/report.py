"""``overview.png`` and ``report.html``: what a pathologist looks at first.

Figures use matplotlib's Agg canvas directly (no pyplot state, no display). The HTML report is one
self-contained file: images embedded as base64 PNG, tables as plain HTML.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from histo.outputs.export import KIND_COLORS
from histo.structures.metrics import type_column
from histo.structures.regions import Grid, disc_sum, grid_counts

CELL_COLORS = {
    "lymphocyte": "#1f1a8a",
    "large": "#ff8c00",
    "stromal": "#2ca02c",
    "epithelial": "#d4a017",
    "lining": "#e0119d",
    "other": "#7f7f7f",
}
MORE_COLORS = ("#d62728", "#1f77b4", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2", "#ff7f0e")  # gated types
MAX_POINTS = 200_000
DENSITY_RADIUS_UM = 25.0  # §7.1: lymphocytes within 25 µm
THUMB_MAX_PX = 4000  # longer side of the overview thumbnail, px
THUMB_MIN_MPP = 2.0  # µm/px: no finer than this (overlays need no more)
DPI = 110  # figure px per inch


def thumbnail_mpp(shape_px, mpp: float) -> float:
    """µm/px of the overview thumbnail of a slide of ``shape_px`` (h, w) at ``mpp`` µm/px."""
    return max(THUMB_MIN_MPP, max(shape_px[:2]) * mpp / THUMB_MAX_PX)


def thumbnail(slide) -> tuple[np.ndarray, float]:
    """An RGB thumbnail of the slide and its exact µm/px (slide width µm / thumbnail width px)."""
    width_um = slide.shape[1] * slide.mpp
    thumb = slide.thumbnail(thumbnail_mpp(slide.shape, slide.mpp))
    if thumb.shape[-1] != 3:  # fluorescence: first channel as grey
        grey = thumb[..., 0].astype(np.float32)
        grey = (255 * grey / max(float(grey.max()), 1.0)).astype(np.uint8)
        thumb = np.repeat(grey[..., None], 3, axis=-1)
    return thumb, width_um / thumb.shape[1]


def _rgb(kind: str) -> tuple:
    return tuple(v / 255 for v in KIND_COLORS.get(kind, (0, 0, 0)))


def _cell_types(cells: pd.DataFrame) -> list[str]:
    """The cell types present, in category order (H&E rules, gates) or sorted."""
    col = cells["cell_type"]
    listed = list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else sorted(set(col.astype(str)))
    present = set(col.astype(str))
    return [t for t in listed if t in present]


def type_colors(cells: pd.DataFrame) -> dict[str, str]:
    """The colour of each cell type present in ``cells``, as the overview, the report, napari and
    ``cells.h5ad`` (``uns["cell_type_colors"]``) draw it."""
    return cell_colors(_cell_types(cells))


def cell_colors(types: list[str]) -> dict[str, str]:
    """A colour per cell type (``types`` present, in category order): :data:`CELL_COLORS` for the H&E
    types, :data:`MORE_COLORS` in turn for others; the overview and napari's cell-type layer use it."""
    more = iter(MORE_COLORS * (1 + len(types) // len(MORE_COLORS)))
    return {t: CELL_COLORS[t] if t in CELL_COLORS else next(more) for t in types}


def _figure(thumbnail: np.ndarray, thumb_mpp: float, fade: float, width_in: float = 10.0):
    """Figure with the thumbnail (blended ``fade`` towards white) on the left 80 %, µm axes. The
    thumbnail is resampled once to its size on the canvas (PIL, Lanczos), so matplotlib draws it
    pixel for pixel: a third of the time of matplotlib's own Lanczos on the float image."""
    h, w = thumbnail.shape[:2]
    fig = Figure(figsize=(width_in, max(3.0, 0.8 * width_in * h / w)), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 0.8, 1.0))
    scale = min(0.8 * fig.bbox.width / w, fig.bbox.height / h)  # canvas px per thumbnail px
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = np.asarray(Image.fromarray(np.ascontiguousarray(thumbnail[..., :3])).resize(size, Image.Resampling.LANCZOS))
    img = (img.astype(np.float32) * (1 - fade) + 255 * fade).astype(np.uint8)
    ax.imshow(img, extent=(0, w * thumb_mpp, h * thumb_mpp, 0), interpolation="nearest")
    ax.set_axis_off()
    return fig, ax


def _outlines(
    ax,
    regions,
    kinds=("tissue", "follicle", "aggregate", "germinal_centre", "lining", "annotation"),
    max_labels: int = 80,
):
    """Region outlines coloured by kind; the ``max_labels`` largest follicles / aggregates that are
    ≥ 12 pt across get their number (and grade)."""
    for kind in kinds:
        geoms = regions.geometry[regions.kind == kind]
        rings = [np.asarray(r.coords) for g in geoms for p in shapely.get_parts(g) for r in [p.exterior, *p.interiors]]
        ax.add_collection(
            LineCollection(
                rings,
                colors=[_rgb(kind)],
                linewidths=0.8 if kind == "tissue" else 1.4,
                linestyles="--" if kind == "germinal_centre" else "-",
            )
        )
    x0, x1 = ax.get_xlim()
    pt_per_um = ax.get_window_extent().width / ax.figure.dpi * 72 / abs(x1 - x0)
    big = regions[
        regions.kind.isin(["follicle", "aggregate"]) & (2 * np.sqrt(regions.area_um2 / np.pi) * pt_per_um >= 12)
    ]
    for rec in big.sort_values("area_um2", ascending=False).head(max_labels).itertuples():
        c = rec.geometry.centroid
        grade = getattr(rec, "grade", np.nan)
        text = rec.region_id.split("-")[-1] + (
            f" G{int(grade)}" if rec.kind == "aggregate" and np.isfinite(grade) else ""
        )
        ax.annotate(
            text,
            (c.x, c.y),
            color="black",
            fontsize=7,
            ha="center",
            va="center",
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=_rgb(rec.kind), alpha=0.8, lw=0.8),
        )


def _scalebar(ax, width_um: float):
    length = 10 ** np.floor(np.log10(width_um / 5))
    length *= 5 if width_um / length >= 25 else 2 if width_um / length >= 10 else 1
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    x, y = x0 + 0.03 * (x1 - x0), y0 - 0.03 * (y0 - y1)
    ax.plot([x, x + length], [y, y], color="black", lw=3, solid_capstyle="butt")
    ax.text(x + length / 2, y - 0.015 * (y0 - y1), f"{length:g} µm", ha="center", va="bottom", fontsize=8)


def _png(fig) -> bytes:
    """The figure as PNG bytes; zlib level 1: a fifth of level 6's time for files ~15 % larger."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def overview_figure(
    thumbnail: np.ndarray, thumb_mpp: float, regions, cells: pd.DataFrame, max_points: int = MAX_POINTS
) -> bytes:
    """PNG bytes: the slide thumbnail (RGB, ``thumb_mpp`` µm/px) with cell-type dots (a random
    ≤ ``max_points`` subsample, fixed seed), region outlines coloured by kind, numbered follicles /
    aggregates with their grade, a legend and a scale bar."""
    fig, ax = _figure(thumbnail, thumb_mpp, fade=0.55)
    sub = cells.sample(max_points, random_state=0) if len(cells) > max_points else cells
    pt_per_um = 8.0 * 72 / (thumbnail.shape[1] * thumb_mpp)
    size = float(np.clip((7.0 * pt_per_um) ** 2, 0.3, 16))  # a dot ≈ a 7 µm nucleus
    colors = type_colors(cells)
    for t, c in colors.items():
        m = sub.cell_type == t
        ax.scatter(sub.x_um[m], sub.y_um[m], s=size, c=c, lw=0, alpha=0.8, rasterized=True)
    _outlines(ax, regions)
    _scalebar(ax, thumbnail.shape[1] * thumb_mpp)
    kinds = [k for k in KIND_COLORS if (regions.kind == k).any()]
    handles = [Line2D([], [], ls="", marker="o", color=c, label=t) for t, c in colors.items()]
    handles += [
        Line2D([], [], color=_rgb(k), ls="--" if k == "germinal_centre" else "-", lw=2, label=k.replace("_", " "))
        for k in kinds
    ]
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.805, 0.98),
        frameon=False,
        fontsize=9,
        title="cells / regions",
    )
    return _png(fig)


def density_figure(
    thumbnail: np.ndarray, thumb_mpp: float, regions, cells: pd.DataFrame, lymphoid: tuple[str, ...] = ("lymphocyte",)
) -> bytes:
    """PNG bytes: density per mm² within 25 µm (§7.1) of the ``lymphoid`` cell types (the cells
    follicles / aggregates are made of) over the thumbnail, structure outlines."""
    fig, ax = _figure(thumbnail, thumb_mpp, fade=0.3)
    h, w = thumbnail.shape[:2]
    px = max(5.0, max(h, w) * thumb_mpp / 800)
    grid = Grid(0.0, 0.0, px, (int(np.ceil(h * thumb_mpp / px)), int(np.ceil(w * thumb_mpp / px))))
    lym = cells[cells.cell_type.isin(lymphoid)]
    counts = grid_counts(grid, lym.x_um, lym.y_um)
    r = DENSITY_RADIUS_UM / px
    dens = disc_sum(counts, r) / (np.pi * DENSITY_RADIUS_UM**2) * 1e6 if r >= 1 else counts / px**2 * 1e6
    top = max(float(np.percentile(dens[dens > 0], 99)) if (dens > 0).any() else 1.0, 1.0)
    im = ax.imshow(
        np.ma.masked_less(dens, 1.0),
        extent=(0, grid.shape[1] * px, grid.shape[0] * px, 0),
        cmap="magma_r",
        alpha=0.75,
        vmin=0,
        vmax=top,
    )
    _outlines(ax, regions, kinds=("tissue", "follicle", "aggregate", "germinal_centre"))
    _scalebar(ax, w * thumb_mpp)
    cax = fig.add_axes((0.83, 0.15, 0.025, 0.7))
    fig.colorbar(im, cax=cax).set_label(f"{' + '.join(lymphoid)} / mm² (within 25 µm)")
    return _png(fig)


def neighbourhood_figure(result: dict, region_id: str = "slide") -> bytes | None:
    """PNG bytes: one region's neighbourhood enrichment z-scores (heatmap), same-type co-occurrence
    ratio and Ripley's L per cell type against distance (µm), from
    :func:`histo.stats.neighbourhood.neighbourhood_stats`; None when that region was not analysed."""
    r = result["regions"].get(region_id)
    if r is None:
        return None
    types = list(result["cell_types"])
    colors = list(cell_colors(types).values())
    # fixed margins: constrained layout measured every label repeatedly, half the figure's time
    fig = Figure(figsize=(15, 4.4), dpi=DPI)
    FigureCanvasAgg(fig)
    heat, occ, rip = fig.subplots(
        1, 3, gridspec_kw={"left": 0.07, "right": 0.99, "bottom": 0.2, "top": 0.92, "wspace": 0.3}
    )
    if "nhood_zscore" in r:
        z = r["nhood_zscore"]
        top = max(float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0, 1.0)
        im = heat.imshow(z, cmap="RdBu_r", vmin=-top, vmax=top)
        heat.set_xticks(range(len(types)), types, rotation=45, ha="right")
        heat.set_yticks(range(len(types)), types)
        for (i, j), v in np.ndenumerate(z):
            heat.text(j, i, "" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=heat).set_label("enrichment z-score")
    heat.set_title(f"Neighbourhood enrichment ({r['n_cells']:,} cells)")
    if "co_occurrence" in r:
        for i, (t, c) in enumerate(zip(types, colors)):
            occ.plot(r["co_occurrence_um"], r["co_occurrence"][i, i], color=c, label=t)
        occ.axhline(1.0, color="grey", lw=0.8, ls=":")
        occ.set_title(f"Co-occurrence, same type ({r['co_occurrence_n_cells']:,} cells sampled)")
        occ.set_xlabel("distance d (µm)")
        occ.set_ylabel("P(same type within d) / P(type)")
        occ.legend(fontsize=8, frameon=False)
    if "ripley_L" in r:
        for i, (t, c) in enumerate(zip(types, colors)):
            rip.plot(r["ripley_um"], r["ripley_L"][i], color=c, label=t)
        rip.plot(r["ripley_um"], r["ripley_um"], color="grey", lw=0.8, ls=":", label="random (L = d)")
        rip.set_title(f"Ripley's L ({r['ripley_n_cells']:,} cells sampled)")
        rip.set_xlabel("distance d (µm)")
        rip.set_ylabel("L(d) (µm)")
        rip.legend(fontsize=8, frameon=False)
    return _png(fig)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(v):
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return "" if v is None else v


SLIDE_ROWS = [
    "area_mm2",
    "n_tissue_pieces",
    "sampling_flag",
    "n_cells",
    "density_cells_per_mm2",
    "density_{lymphoid}_per_mm2",
    "fraction_{type}",  # one row per lymphoid type / per cell type
    "n_follicles",
    "follicles_per_mm2",
    "n_follicles_with_gc",
    "fraction_area_follicle",
    "fraction_area_germinal_centre",
    "follicle_eq_diameter_median_um",
    "n_follicles_edge_truncated",
    "n_aggregates",
    "aggregates_per_mm2",
    "n_aggregates_grade1",
    "n_aggregates_grade2",
    "n_aggregates_grade3",
    "n_els",
    "fraction_area_aggregate",
    "lining_length_mm",
    "lining_layers_median",
    "stroma_density_per_mm2",
    "krenn_lining",
    "krenn_stroma",
    "krenn_infiltrate",
    "krenn_sum",
    "krenn_band",
    "krenn_version",
    "pathotype_proxy_he",
]
STRUCTURE_COLUMNS = [
    "region_id",
    "tissue_id",
    "area_um2",
    "eq_diameter_um",
    "n_cells",
    "fraction_{lymphoid}",
    "density_{lymphoid}_per_mm2",
    "radial_layers",
    "grade",
    "tls_size",
    "has_gc",
    "mantle_thickness_um",
    "circularity",
    "edge_truncated",
    "distance_to_lining_um",
]
LINING_COLUMNS = [
    "region_id",
    "tissue_id",
    "length_um",
    "thickness_median_um",
    "thickness_p90_um",
    "layers_median",
    "layers_p90",
    "lining_nuclei_per_100um",
    "krenn_lining",
]


def _expand(columns: list[str], types: list[str], lymphoid: tuple[str, ...]) -> list[str]:
    """Column names with ``{type}`` / ``{lymphoid}`` spelt out for each cell type / lymphoid type."""
    out = []
    for c in columns:
        names = types if "{type}" in c else lymphoid if "{lymphoid}" in c else [None]
        out += [c.format(type=type_column(t), lymphoid=type_column(t)) if t else c for t in names]
    return out


def _table(frame: pd.DataFrame, cols: list[str]) -> str:
    cols = [c for c in cols if c in frame.columns]
    if frame.empty or not cols:
        return "<p class=none>none found</p>"
    return frame[cols].map(_fmt).to_html(index=False, border=0, classes="t")


def report_html(
    name: str,
    thumbnail: np.ndarray,
    thumb_mpp: float,
    regions,
    cells: pd.DataFrame,
    metrics: pd.DataFrame,
    tissue_type: str,
    neighbourhood: dict | None = None,
    lymphoid: tuple[str, ...] = ("lymphocyte",),
    figures: dict[str, bytes | None] | None = None,
) -> str:
    """The per-slide report as one self-contained HTML string: cell-type map, density map of the
    ``lymphoid`` cell types (those follicles / aggregates are made of), the follicle / aggregate (and
    lining) tables, the slide metrics and, with ``neighbourhood``
    (:func:`histo.stats.neighbourhood.neighbourhood_stats`), the slide's neighbourhood plots.
    ``figures``: those plots drawn already (``overview``, ``density``, ``neighbourhood`` PNG bytes,
    e.g. on a cluster); the missing ones are drawn here."""
    figures = dict(figures or {})
    if "overview" not in figures:
        figures["overview"] = overview_figure(thumbnail, thumb_mpp, regions, cells)
    if "density" not in figures:
        figures["density"] = density_figure(thumbnail, thumb_mpp, regions, cells, tuple(lymphoid))
    if "neighbourhood" not in figures:
        figures["neighbourhood"] = neighbourhood_figure(neighbourhood) if neighbourhood else None
    slide = metrics[metrics.kind == "slide"].iloc[0]
    lymphoid = tuple(lymphoid)
    slide_rows = _expand(SLIDE_ROWS, _cell_types(cells), lymphoid)
    rows = [(k, _fmt(slide[k])) for k in slide_rows if k in slide.index and _fmt(slide[k]) != ""]
    slide_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    kind = "follicle" if tissue_type == "lymph-node" else "aggregate"
    parts = [
        f"<h1>{html.escape(name)} <small>{html.escape(tissue_type)}</small></h1>",
        "<p class=note>Numbers are µm / mm². Grades and Krenn-like scores are H&amp;E proxies "
        "(DOMAIN §7) to be calibrated on pathologist review; the pathotype proxy is not a Humby/PEAC pathotype.</p>",
        "<div class=row><div><h2>Cell types and regions</h2>",
        _img(figures["overview"], "cell-type map"),
        f"</div><div><h2>{html.escape(' + '.join(lymphoid)).capitalize()} density</h2>",
        _img(figures["density"], "lymphoid density map"),
        "</div></div>",
        f"<h2>Slide</h2><table class=t>{slide_html}</table>",
        f"<h2>{kind.capitalize()}s</h2>",
        _table(metrics[metrics.kind == kind], _expand(STRUCTURE_COLUMNS, [], lymphoid)),
    ]
    nhood = figures["neighbourhood"]
    if nhood is not None:
        parts += [
            "<h2>Neighbourhood (whole slide)</h2>",
            _img(nhood, "neighbourhood statistics"),
            "<p class=note>Delaunay / radius graph in µm; co-occurrence and Ripley's L on a seeded sample "
            "(sizes in the titles); per-region values are in metrics.csv and cells.h5ad "
            "(<code>uns['neighbourhood']</code>).</p>",
        ]
    if tissue_type == "synovium":
        parts += ["<h2>Lining</h2>", _table(metrics[metrics.kind == "lining"], LINING_COLUMNS)]
    parts += ["<h2>Tissue pieces</h2>", _table(metrics[metrics.kind == "tissue"], ["region_id", *slide_rows])]
    style = (
        "body{font-family:sans-serif;margin:1.5em;color:#222}img{max-width:100%}small{color:#777;font-weight:normal}"
        ".row{display:flex;gap:1em;flex-wrap:wrap}.row>div{flex:1 1 480px}.note{color:#555;font-size:90%}"
        "table.t{border-collapse:collapse;font-size:85%;margin-bottom:1em}"
        ".t th,.t td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
        ".t th{text-align:left;background:#f4f4f4}.none{color:#777}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(name)} — histo report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def write_report(
    path: str | Path,
    name: str,
    thumbnail: np.ndarray,
    thumb_mpp: float,
    regions,
    cells: pd.DataFrame,
    metrics: pd.DataFrame,
    tissue_type: str,
    neighbourhood: dict | None = None,
    lymphoid: tuple[str, ...] = ("lymphocyte",),
    figures: dict[str, bytes | None] | None = None,
) -> Path:
    """Write :func:`report_html` to ``path`` (``report.html``)."""
    path = Path(path)
    path.write_text(
        report_html(name, thumbnail, thumb_mpp, regions, cells, metrics, tissue_type, neighbourhood, lymphoid, figures),
        encoding="utf-8",
    )
    return path
