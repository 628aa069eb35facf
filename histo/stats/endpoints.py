"""The endpoints of a cohort report, declared per tissue in a workflow's ``endpoints:`` section.

An endpoint is a slide-level value: a column of the slide row of ``metrics.csv`` (``metric``), or a
median over the regions of one kind (``region``, ``column``). ``primary`` endpoints are few and
tested as one family; ``exploratory`` ones (declared, plus with ``rest: true`` every other numeric
slide metric not matched by ``never``) form a second family; sampling sizes and raw counts
(``never``) are reported by no test. Where a patient has several slides of one timepoint, values
are pooled, never averaged slide by slide (``pool``):

* ``area``: weighted by tissue area, so a density or area fraction is all cells (or structures,
  or structure area) over all tissue;
* ``cells``: weighted by the number of nuclei (cell-type fractions: cells of the type over all cells);
* ``sum``, ``max``: the sum or the largest value (counts, the highest grade);
* ``median``: the median of ``column`` over every region of kind ``region`` in those slides.

This module imports nothing heavy: :mod:`histo.workflow` builds the section (:class:`Endpoints`) with it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from histo.config import Section
from histo.errors import WorkflowError

POOLS = ("area", "cells", "sum", "max", "median")
REGION_KINDS = ("follicle", "germinal_centre", "aggregate", "lining", "tissue")
ENDPOINT_KEYS = ("metric", "unit", "label", "pool", "region", "column")
# sampling sizes, run bookkeeping and raw counts: never tested (counts grow with the biopsy)
NEVER = ["*_n_cells", "n_*", "area_um2", "area_mm2", "sampling_flag", "n_tiles", "n_tile_errors"]
_UNITS = [
    (r"_per_mm2$", "/mm²"),
    (r"_per_100um$", "/100 µm"),
    (r"_um2$", "µm²"),
    (r"_um$", "µm"),
    (r"_mm2$", "mm²"),
    (r"_mm$", "mm"),
    (r"^fraction_", "fraction 0–1"),
    (r"^n_", "count"),
    (r"^krenn_", "score"),
    (r"_grade$|grade\d", "grade"),
    (r"^nhood_z_", "z-score"),
]


def unit_from_name(metric: str) -> str:
    """The unit a metric's column name carries (``_per_mm2`` → ``/mm²``, ``fraction_`` → ``fraction 0–1``,
    …; histo.structures.metrics spells units in names), or ``""`` for a unitless score."""
    return next((unit for pattern, unit in _UNITS if re.search(pattern, metric)), "")


def pool_from_name(metric: str) -> str:
    """How a slide metric is pooled over several slides when its endpoint does not say: ``cells`` for
    a cell-type fraction, ``sum`` for a count, ``max`` for a maximum, else ``area``."""
    if metric.startswith("fraction_") and not metric.startswith("fraction_area_"):
        return "cells"
    return "sum" if metric.startswith("n_") else "max" if metric.startswith("max_") else "area"


def is_never(metric: str, patterns: list[str]) -> bool:
    """True when ``metric`` matches one of the glob ``patterns`` (sampling sizes, counts)."""
    return any(fnmatch.fnmatchcase(metric, p) for p in patterns)


def _endpoint(item, where: str, path: str) -> dict:
    if not isinstance(item, dict):
        raise WorkflowError(path, f"'{where}' must be a mapping with 'metric' and 'unit', got {item!r}")
    if unknown := sorted(set(item) - set(ENDPOINT_KEYS)):
        raise WorkflowError(path, f"unknown key '{where}.{unknown[0]}' (allowed: {', '.join(ENDPOINT_KEYS)})")
    for key in ENDPOINT_KEYS:
        if item.get(key) is not None and not isinstance(item[key], str):  # null: not given (run.json writes it)
            raise WorkflowError(path, f"'{where}.{key}' has the wrong type: {item[key]!r} ({type(item[key]).__name__})")
    for key in ("metric", "unit"):
        if not item.get(key):
            raise WorkflowError(path, f"'{where}' needs '{key}'")
    pool = item.get("pool") or pool_from_name(item["metric"])
    if pool not in POOLS:
        raise WorkflowError(path, f"'{where}.pool' must be one of {', '.join(POOLS)}, got {pool!r}")
    if (pool == "median") != bool(item.get("region") or item.get("column")):
        raise WorkflowError(path, f"'{where}': pool 'median' and 'region' + 'column' go together")
    if pool == "median" and (item.get("region") not in REGION_KINDS or not item.get("column")):
        raise WorkflowError(
            path,
            f"'{where}.region' must be one of {', '.join(REGION_KINDS)} and 'column' a "
            f"metrics.csv column, got {item.get('region')!r} / {item.get('column')!r}",
        )
    return dict(
        metric=item["metric"],
        unit=item["unit"],
        label=item.get("label") or item["metric"],
        pool=pool,
        region=item.get("region"),
        column=item.get("column"),
    )


@dataclass(frozen=True)
class Endpoints(Section):
    """The ``endpoints:`` section of a workflow: the cohort report's endpoints (items, units, pooling
    over slides; module docstring)."""

    primary: list[dict] = field(default_factory=list)  # [{metric, unit, label, pool, region, column}]: one test family
    exploratory: list[dict] = field(default_factory=list)  # declared exploratory endpoints: the second family
    rest: bool = True  # every other numeric slide metric is exploratory too (unit from its name)
    never: list[str] = field(default_factory=lambda: list(NEVER))  # glob patterns of metrics never tested
    #   (sampling sizes, counts)

    def validated(self, path: str = "<workflow>") -> Endpoints:
        """A copy with every endpoint filled in (``label``, ``pool``, ``region``, ``column``).
        Raises WorkflowError naming the key for a missing metric or unit, an unknown pool, a
        metric declared twice."""
        families = {}
        seen: set[str] = set()
        for family in ("primary", "exploratory"):
            items = getattr(self, family)
            families[family] = [_endpoint(item, f"endpoints.{family}[{i}]", path) for i, item in enumerate(items)]
            for e in families[family]:
                if e["metric"] in seen:
                    raise WorkflowError(path, f"'endpoints.{family}': {e['metric']!r} is declared twice")
                seen.add(e["metric"])
        if bad := [p for p in self.never if not isinstance(p, str)]:
            raise WorkflowError(path, f"'endpoints.never' lists metric names or patterns, got {bad[0]!r}")
        return self.replace(**families)


def endpoint_table(endpoints: Endpoints, metrics: list[str]) -> list[dict]:
    """Every endpoint of one tissue with its ``family`` (primary first, then exploratory): the
    declared ones (``declared`` True: reported even without values), then with ``rest`` each other
    numeric slide metric in ``metrics`` (unit and pool from its name) unless it matches ``never``."""
    rows = [
        {**e, "family": family, "declared": True}
        for family in ("primary", "exploratory")
        for e in getattr(endpoints, family)
    ]
    declared = {e["metric"] for e in rows}
    if endpoints.rest:
        rows += [
            dict(
                metric=m,
                unit=unit_from_name(m),
                label=m,
                pool=pool_from_name(m),
                region=None,
                column=None,
                family="exploratory",
                declared=False,
            )
            for m in metrics
            if m not in declared and not is_never(m, endpoints.never)
        ]
    return rows
