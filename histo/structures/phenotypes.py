"""Cell types: H&E (learned nucleus classes or morphology rules), and marker gating for IHC / IF.

Both work on the whole slide's cells table (after the tiles are concatenated) and return a
``pandas.Categorical`` plus a small JSON-ready report of the thresholds actually used (for
run.json). Features and their units are those of :mod:`histo.segment.features` and :mod:`histo.segment.nuclei`.
No stain constant is absolute: haematoxylin references are measured on the slide itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter1d
from scipy.spatial import cKDTree
from skimage.filters import threshold_otsu

from histo.config import Section
from histo.errors import WorkflowError

Number = (int, float)
HE_TYPES = ("lymphocyte", "large", "stromal", "epithelial", "other")


@dataclass(frozen=True)
class HERules(Section):
    """The ``cell_types:`` section of a workflow: H&E nucleus typing rules (:func:`classify_he`).

    [L] read in the cited source, [P] our proxy (DOMAIN.md tags). Areas µm², OD decadic (histo.segment.features).
    """

    learned: bool = True  # use the model's learned nucleus classes (histo.segment.nucleus_classes) where it has them
    calibrate: bool = True  # measure the two lymphocyte references below on the slide (DOMAIN §6)
    lymphocyte_area_um2: float = 28.0  # µm², reference small-lymphocyte nucleus area, 27–29 (Baek 2010) [L];
    #   calibrated: mode of the areas in the densest `dense_fraction` of nuclei (DOMAIN §6) [P]
    lymphocyte_min_area_um2: float = 15.0  # µm², DOMAIN §6 [P]; areas scale with measured / reference area
    lymphocyte_max_area_um2: float = 40.0  # µm², DOMAIN §6 [P]
    lymphocyte_max_eccentricity: float = 0.7  # DOMAIN §6 [P]
    lymphocyte_min_solidity: float = 0.9  # DOMAIN §6 [P]
    lymphocyte_min_od_ratio: float = 0.75  # dark: H OD ≥ ratio × reference OD [P] (DOMAIN's slide-wide
    #   "top tercile" would call only a third of a node's lymphocytes lymphocytes, so the reference is used)
    large_classes: list[str] = field(default_factory=lambda: ["lymphocyte", "stromal", "other"])  # learned classes a
    #   large pale one comes from (lymph node: add epithelial — a node has no epithelium; a colon-trained
    #   classifier calls centroblasts so) [P]
    lymphocyte_classes: list[str] = field(default_factory=list)  # learned classes whose nuclei the rules call
    #   lymphocytes (lymphocyte-sized, round and dark, thresholds above) are typed lymphocyte (lymph node:
    #   [epithelial, stromal] — a colon-trained classifier calls small lymphocytes of other organs so) [P]
    large_min_area_um2: float = 45.0  # µm², centroblast / macrophage > 45 (DOMAIN §6) [P]
    large_max_od_ratio: float = 1.0  # pale: H OD < ratio × reference OD, "below lymphocyte median" (§7.4) [P]
    stromal_min_eccentricity: float = 0.9  # fibroblast / synoviocyte, DOMAIN §6 [P]
    stromal_min_axis_ratio: float = 2.5  # major / minor axis, DOMAIN §6 [P]
    dense_fraction: float = 0.05  # the densest 5 % of nuclei give the references (DOMAIN §6) [P]
    density_radius_um: float = 25.0  # µm, neighbourhood for density (DOMAIN §7.1) [P]
    min_reference_cells: int = 50  # fewer dense reference nuclei: the slide-wide fallbacks (reported)

    RANGES: ClassVar = {
        "lymphocyte_max_eccentricity": (0.0, 1.0),
        "lymphocyte_min_solidity": (0.0, 1.0),
        "stromal_min_eccentricity": (0.0, 1.0),
        "dense_fraction": (1e-4, 1.0),
    }


@dataclass(frozen=True)
class MarkerGates(Section):
    """The ``marker_gates:`` section: IHC / immunofluorescence cell types, the first positive gate wins
    (:func:`gate_markers`)."""

    gates: list[dict] = field(default_factory=list)  # [{marker, cell_type, threshold: number | auto, column}]
    auto: str | None = "otsu"  # per-slide threshold method for "auto" gates: otsu | gmm

    def validated(self, path: str) -> MarkerGates:
        """Itself; WorkflowError naming ``marker_gates`` for a malformed gate or method (:func:`check_gates`)."""
        try:
            check_gates(self.gates, self.auto)
        except ValueError as exc:
            raise WorkflowError(path, f"'marker_gates': {exc}") from None
        return self


DENSITY_SAMPLE = 100_000  # nuclei whose neighbours are counted for the calibration
HE_COLUMNS = ("area_um2", "eccentricity", "solidity", "major_axis_um", "minor_axis_um", "hematoxylin_od")


def _area_mode(area: np.ndarray) -> float:
    """Mode (µm²) of areas: 1 µm² histogram smoothed with σ = 2 µm²."""
    counts, edges = np.histogram(area, bins=np.arange(0.0, 201.0))
    return float(edges[np.argmax(gaussian_filter1d(counts.astype(float), 2.0))] + 0.5)


def _dense_sample(cells: pd.DataFrame, rules: HERules) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the nuclei whose density was counted, which of them are in the densest
    ``dense_fraction``). Density (neighbours within ``density_radius_um``) is counted around every
    k-th nucleus only, at most ``DENSITY_SAMPLE`` of them (1M nuclei: 18 s → 2 s on 2 busy cores)."""
    xy = cells[["x_um", "y_um"]].to_numpy(np.float64)
    sample = np.arange(0, len(xy), -(-len(xy) // DENSITY_SAMPLE))
    density = cKDTree(xy).query_ball_point(xy[sample], rules.density_radius_um, return_length=True, workers=-1)
    return sample, density >= np.quantile(density, 1 - rules.dense_fraction)


def _first_reference(
    candidates: list[tuple[str, np.ndarray, float]], od: np.ndarray, n_min: int, fallback_area: float
) -> dict:
    """The lymphocyte references from the first candidate ``(source, nuclei mask, area mode µm²)``
    with ≥ ``n_min`` finite haematoxylin ODs, else from every nucleus (``all``, ``fallback_area``):
    the area mode, the median OD and how many nuclei gave it."""
    finite = np.isfinite(od)
    usable = ((source, od[pick & finite], area) for source, pick, area in candidates)
    source, values, area = next((c for c in usable if c[1].size >= n_min), ("all", od[finite], fallback_area))
    return {
        "source": source,
        "n_reference_cells": int(values.size),
        "lymphocyte_area_um2": area,
        "lymphocyte_hematoxylin_od": float(np.median(values)) if values.size else float("nan"),
    }


def _references(cells: pd.DataFrame, rules: HERules, round_: np.ndarray) -> dict:
    """The slide's lymphocyte references (:func:`_first_reference`), in order of preference:

    ``dense``: round lymphocyte-sized nuclei among the densest ``dense_fraction`` (DOMAIN §6);
    ``slide``: round lymphocyte-sized nuclei anywhere on the slide (a small crop has too few dense
    ones); ``all``: every nucleus. The area mode is the dense nuclei's, else the preset. Never a preset OD.
    """
    area = cells["area_um2"].to_numpy(np.float64)
    ref_area = rules.lymphocyte_area_um2
    calibrate = rules.calibrate and len(cells)
    if calibrate:
        sample, dense = _dense_sample(cells, rules)
        if dense.sum() >= rules.min_reference_cells:
            ref_area = _area_mode(area[sample][dense])
    scale = ref_area / rules.lymphocyte_area_um2
    sized = round_ & (area >= rules.lymphocyte_min_area_um2 * scale) & (area <= rules.lymphocyte_max_area_um2 * scale)
    candidates = [("slide", sized, ref_area)]
    if calibrate:
        in_dense = np.zeros(len(cells), bool)
        in_dense[sample[dense]] = True
        candidates.insert(0, ("dense", in_dense & sized, ref_area))
    od = cells["hematoxylin_od"].to_numpy(np.float64)
    return _first_reference(candidates, od, rules.min_reference_cells, ref_area)


def classify_he(cells: pd.DataFrame, rules: HERules | None = None) -> tuple[pd.Categorical, dict]:
    """H&E nucleus types: learned classes where the cells table has them, else morphology rules.

    Parameters
    ----------
    cells : pandas.DataFrame
        One row per nucleus with ``area_um2`` (µm²), ``eccentricity``, ``solidity``,
        ``major_axis_um``, ``minor_axis_um`` (µm), ``hematoxylin_od`` (decadic OD), and ``x_um``,
        ``y_um`` (µm; read when ``rules.calibrate``), optionally ``nucleus_class``
        (histo.segment.nucleus_classes: lymphocyte, epithelial, stromal, other).
    rules : HERules, optional
        The workflow's ``cell_types`` section; None: its defaults (``HERules()``; change a few
        with keyword arguments, ``HERules(calibrate=False)``).

    Returns
    -------
    types : pandas.Categorical
        One type per nucleus, categories :data:`HE_TYPES`.
    report : dict
        The references (µm², OD) and thresholds used, where they came from, and the counts per type.

    Raises
    ------
    ValueError
        The cells table lacks a column the rules read.

    Notes
    -----
    Learned (``learned`` and ``nucleus_class`` present): each nucleus keeps its class, except that a
    nucleus of ``large_classes`` ≥ ``large_min_area_um2`` and paler than ``large_max_od_ratio`` × the
    slide's lymphocytes is ``large`` (the germinal-centre cue: centroblasts, macrophages), and one of
    ``lymphocyte_classes`` that the rules call a lymphocyte is ``lymphocyte`` (``retyped_lymphocyte``
    in the report; only where ≥ ``min_reference_cells`` learned lymphocytes give the references); the
    lymphocyte references are the learned lymphocytes' area mode and median OD. Rules: lymphocyte =
    lymphocyte-sized, round and dark; stromal = elongated; large = large and pale; else other. The
    references come from the slide (:func:`_references`); area bounds scale with the area mode.
    """
    r = HERules() if rules is None else rules
    missing = [c for c in HE_COLUMNS + (("x_um", "y_um") if r.calibrate else ()) if c not in cells]
    if missing:
        raise ValueError(f"cells table lacks the column(s): {', '.join(missing)}")
    col = {c: cells[c].to_numpy(np.float64) for c in HE_COLUMNS}
    area, od = col["area_um2"], col["hematoxylin_od"]
    learned = r.learned and "nucleus_class" in cells
    round_ = (col["eccentricity"] < r.lymphocyte_max_eccentricity) & (col["solidity"] >= r.lymphocyte_min_solidity)
    if learned:
        cls = cells["nucleus_class"].astype(str).to_numpy()
        refs = _learned_references(cls, area, od, r)
    else:
        refs = _references(cells, r, round_)
    scale = refs["lymphocyte_area_um2"] / r.lymphocyte_area_um2
    ref_od = refs["lymphocyte_hematoxylin_od"]
    t = {
        "lymphocyte_min_area_um2": r.lymphocyte_min_area_um2 * scale,
        "lymphocyte_max_area_um2": r.lymphocyte_max_area_um2 * scale,
        "lymphocyte_min_hematoxylin_od": r.lymphocyte_min_od_ratio * ref_od,
        "large_min_area_um2": r.large_min_area_um2 * scale,
        "large_max_hematoxylin_od": r.large_max_od_ratio * ref_od,
    }
    large = (area >= t["large_min_area_um2"]) & (od < t["large_max_hematoxylin_od"])
    lymphocyte = (
        (area >= t["lymphocyte_min_area_um2"])
        & (area <= t["lymphocyte_max_area_um2"])
        & round_
        & (od >= t["lymphocyte_min_hematoxylin_od"])
    )
    if learned:
        large &= np.isin(cls, r.large_classes)
        own = refs["source"] == "learned"  # else too few learned lymphocytes to measure the slide's: none retyped
        retype = lymphocyte & np.isin(cls, r.lymphocyte_classes) & ~large & own
        if not r.lymphocyte_classes:
            t = {k: v for k, v in t.items() if k.startswith("large")}
        code = np.select(
            [large, (cls == "lymphocyte") | retype, cls == "epithelial", cls == "stromal"], [1, 0, 3, 2], 4
        )
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = col["major_axis_um"] / col["minor_axis_um"]
        stromal = (col["eccentricity"] > r.stromal_min_eccentricity) | (ratio >= r.stromal_min_axis_ratio)
        code = np.select([lymphocyte, stromal, large], [0, 2, 1], 4)  # codes of HE_TYPES
    types = pd.Categorical.from_codes(code, categories=list(HE_TYPES))
    report = {
        "method": "learned" if learned else "rules",
        "reference_source": refs["source"],  # where the lymphocyte references were measured (see _references)
        "calibrated": refs["source"] in ("dense", "learned"),
        "n_reference_cells": refs["n_reference_cells"],
        "lymphocyte_area_um2": refs["lymphocyte_area_um2"],
        "lymphocyte_hematoxylin_od": ref_od,
        **t,
        "counts": {k: int(v) for k, v in types.value_counts().items()},
        **({"retyped_lymphocyte": int(retype.sum())} if learned and r.lymphocyte_classes else {}),
    }
    return types, report


def _learned_references(cls: np.ndarray, area: np.ndarray, od: np.ndarray, rules: HERules) -> dict:
    """Lymphocyte references from the nuclei the classifier calls lymphocytes (``learned``), else
    from every nucleus with the preset area (``all``; :func:`_first_reference`)."""
    lym = (cls == "lymphocyte") & np.isfinite(area) & np.isfinite(od)
    mode = _area_mode(area[lym]) if lym.any() else rules.lymphocyte_area_um2
    return _first_reference([("learned", lym, mode)], od, rules.min_reference_cells, rules.lymphocyte_area_um2)


def _gmm_split(x: np.ndarray, iterations: int = 500) -> float:
    """Where a two-Gaussian mixture fitted to ``x`` (EM on a 256-bin histogram) hands over to the
    upper component."""
    counts, edges = np.histogram(x, bins=256)
    c, wt = (edges[:-1] + edges[1:]) / 2, counts / counts.sum()
    m, s, w = np.quantile(x, [0.25, 0.75]), np.full(2, x.std() / 2), np.full(2, 0.5)
    for _ in range(iterations):
        p = w / s * np.exp(-0.5 * ((c[:, None] - m) / s) ** 2) + 1e-300
        resp = wt[:, None] * p / p.sum(axis=1, keepdims=True)
        w = resp.sum(axis=0)
        m = (resp * c[:, None]).sum(axis=0) / w
        s = np.sqrt((resp * (c[:, None] - m) ** 2).sum(axis=0) / w) + 1e-9
    lo, hi = np.argsort(m)
    grid = np.linspace(m[lo], m[hi], 1001)
    dens = w / s * np.exp(-0.5 * ((grid[:, None] - m) / s) ** 2)
    return float(grid[np.argmax(dens[:, hi] >= dens[:, lo])])


def auto_threshold(values: np.ndarray, method: str = "otsu") -> float:
    """Per-slide positivity threshold of a marker, in the column's units.

    Found on log1p(intensity) (negatives taken as 0), clipped to its 1st–99th percentiles so a few
    empty or saturated cells do not pull the split: "otsu" = Otsu's threshold (256 bins), "gmm" =
    where a two-component Gaussian mixture's upper component takes over. NaN with < 2 values.
    """
    if method not in ("otsu", "gmm"):
        raise ValueError(f"unknown automatic threshold method {method!r}: expected 'otsu' or 'gmm'")
    x = np.log1p(np.clip(np.asarray(values, np.float64), 0, None))
    x = x[np.isfinite(x)]
    if x.size < 2:
        return float("nan")
    x = np.clip(x, *np.quantile(x, [0.01, 0.99]))
    if np.ptp(x) == 0:
        return float(np.expm1(x[0]))
    return float(np.expm1(threshold_otsu(x, nbins=256) if method == "otsu" else _gmm_split(x)))


def check_gates(gates: list, auto: str | None = "otsu") -> None:
    """Raise ValueError naming the first malformed gate (for workflow validation at load time)."""
    if not isinstance(gates, list):
        raise ValueError(f"gates must be a list of mappings, got {type(gates).__name__}")
    if auto not in (None, "otsu", "gmm"):
        raise ValueError(f"unknown automatic threshold method {auto!r}: expected 'otsu', 'gmm' or none")
    for gate in gates:
        if (
            not isinstance(gate, dict)
            or set(gate) - {"marker", "cell_type", "threshold", "column"}
            or not {"marker", "cell_type"} <= set(gate)
        ):
            raise ValueError(f"gate {gate!r}: needs 'marker' and 'cell_type', may have 'threshold' and 'column'")
        threshold = gate.get("threshold", "auto")
        if threshold == "auto" and auto is None:
            raise ValueError(f"gate for {gate['marker']}: threshold 'auto' but automatic thresholds are off")
        if threshold != "auto" and (not isinstance(threshold, Number) or isinstance(threshold, bool)):
            raise ValueError(f"gate for {gate['marker']}: threshold must be a number or 'auto', got {threshold!r}")


def gate_column(gate: dict) -> str:
    """The cells-table column a gate reads: its ``column``, else ``mean_<marker>``."""
    return gate.get("column") or f"mean_{gate['marker']}"


def check_gate_columns(gates: list[dict], columns) -> None:
    """Raise ValueError naming the first gate whose column is not among ``columns`` (a cells table's;
    e.g. a gate on a channel the slide lacks). Run at plan time, before any tile is segmented."""
    for gate in gates:
        if gate_column(gate) not in columns:
            raise ValueError(f"gate for {gate['marker']}: no column {gate_column(gate)!r} in the cells table")


def gate_markers(
    cells: pd.DataFrame, gates: list[dict], auto: str | None = "otsu"
) -> tuple[pd.Categorical, list[dict]]:
    """Cell types from marker gates applied in order; the first positive gate wins, else ``other``.

    A gate is ``{marker, cell_type, threshold, column}``: ``column`` defaults to ``mean_<marker>``;
    ``threshold`` is a number in the column's units (positive = value ≥ threshold) or "auto", found
    per slide by :func:`auto_threshold` with method ``auto`` (None: "auto" gates are an error).
    Returns the types (categories: the gates' cell types in order, then "other") and per gate its
    threshold, method, positive fraction and the fraction of cells it typed.
    """
    check_gates(gates, auto)
    check_gate_columns(gates, cells.columns)
    n = len(cells)
    code = np.full(n, -1)
    names: list[str] = []
    report = []
    for gate in gates:
        column = gate_column(gate)
        values = cells[column].to_numpy(np.float64)
        threshold, method = gate.get("threshold", "auto"), "manual"
        if threshold == "auto":
            threshold, method = auto_threshold(values, auto), auto
        if gate["cell_type"] not in names:
            names.append(gate["cell_type"])
        positive = values >= threshold
        new = positive & (code < 0)
        code[new] = names.index(gate["cell_type"])
        report.append(
            {
                "marker": gate["marker"],
                "column": column,
                "cell_type": gate["cell_type"],
                "method": method,
                "threshold": float(threshold) if np.isfinite(threshold) else None,
                "positive_fraction": float(positive.mean()) if n else 0.0,
                "typed_fraction": float(new.mean()) if n else 0.0,
            }
        )
    if "other" not in names:
        names.append("other")
    code[code < 0] = names.index("other")
    return pd.Categorical.from_codes(code, categories=names), report
