"""The cohort's statistics over a batch's summary: per tissue and endpoint, the change post − pre per
patient, tested within each arm and between the arms, with Benjamini–Hochberg q-values per family.

Values are pooled per patient, tissue and timepoint over that patient's slides (tissue area, pieces
and slides behind each value are kept: :mod:`histo.stats.endpoints`). Tests (scipy):

* within an arm: the Wilcoxon signed-rank test of the changes (exact null distribution without
  ties; with ties or zeros an exact sign-flip permutation test where it can be enumerated), and the
  one-sample Hodges–Lehmann estimate (median of the Walsh averages) with its exact (Tukey)
  confidence interval;
* between two arms: the Mann–Whitney U test of the changes (exact without ties, else an exact or
  Monte-Carlo permutation test), and the Hodges–Lehmann shift (median of all pairwise
  differences of changes, first arm − second) with its exact (Moses) confidence interval;
* a test is not run where even the most extreme data could not give p ≤ 0.05 (e.g. 5 pairs:
  smallest Wilcoxon p 2/2⁵ = 0.0625), nor between arms whose changes are all one value (an
  endpoint that never varies would only dilute the q-values); the table says so, and it lists a
  declared endpoint without any paired value (a tissue without slides, a structure never found).

q-values: ``scipy.stats.false_discovery_control`` over the endpoints of one tissue, one family
(primary / exploratory) and one comparison.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy.stats import PermutationMethod, false_discovery_control, mannwhitneyu, wilcoxon

from histo.stats.endpoints import Endpoints, endpoint_table

if TYPE_CHECKING:
    from histo.workflow import Workflow

PRE, POST = "pre", "post"  # the sample sheet's timepoint values (case-insensitive)
ALPHA = 0.05  # two-sided level of the tests and of the confidence intervals (1 − ALPHA)
EXACT_MAX_N = 50  # scipy's exact null distributions are used up to this many values (without ties)
N_RESAMPLES = 99_999  # permutation tests: exact enumeration when there are fewer distinct permutations
ALL_ARMS = "all"  # the arm of every patient when the sheet has no ``arm`` column
WEIGHT_COLUMNS = ("slides", "n_slides", "area_mm2", "n_pieces", "n_regions")  # what stands behind a value


def _tissue(frame: pd.DataFrame) -> pd.Series:
    return frame["tissue"].fillna("").astype(str) if "tissue" in frame else pd.Series("", index=frame.index)


def usable_slides(summary: pd.DataFrame) -> pd.DataFrame:
    """The ``ok`` slides of ``summary`` with a patient and a ``pre`` / ``post`` timepoint, with
    normalised ``tissue``, ``timepoint`` and ``arm`` (``"all"`` without an ``arm`` column)."""
    ok = summary[summary["status"].eq("ok")].copy()
    ok["timepoint"] = ok["timepoint"].astype(str).str.strip().str.lower()
    ok["patient"] = ok["patient"].astype(str).str.strip()
    ok["tissue"] = _tissue(ok)
    ok["arm"] = ok["arm"].fillna("").astype(str).str.strip() if "arm" in ok else ALL_ARMS
    return ok[ok["timepoint"].isin([PRE, POST]) & ok["patient"].ne("") & ok["patient"].ne("nan")]


def _regions(bundle: str, kind: str, column: str) -> np.ndarray:
    """``column`` of the rows of kind ``kind`` in ``bundle/metrics.csv`` (NaN dropped)."""
    table = pd.read_csv(Path(bundle) / "metrics.csv")
    if column not in table:
        return np.zeros(0)
    values = pd.to_numeric(table.loc[table["kind"].eq(kind), column], errors="coerce")
    return values.dropna().to_numpy(float)


def pooled_value(slides: pd.DataFrame, endpoint: dict) -> tuple[float, int]:
    """One patient's value of ``endpoint`` at one timepoint from its ``slides`` (summary rows), and the
    number of regions behind it (median pools; 0 otherwise). Slides whose value is missing are left
    out of the pool; area and cell weights pool densities and fractions over all slides' tissue."""
    pool, metric = endpoint["pool"], endpoint["metric"]
    if pool == "median":
        values = np.concatenate([_regions(b, endpoint["region"], endpoint["column"]) for b in slides["bundle"]])
        return (float(np.median(values)) if len(values) else np.nan), len(values)
    if metric not in slides:
        return np.nan, 0
    values = pd.to_numeric(slides[metric], errors="coerce").to_numpy(float)
    if pool in ("area", "cells"):
        weights = pd.to_numeric(slides["area_mm2" if pool == "area" else "n_cells"], errors="coerce").to_numpy(float)
        keep = np.isfinite(values) & np.isfinite(weights) & (weights > 0)
        return (float(np.average(values[keep], weights=weights[keep])) if keep.any() else np.nan), 0
    values = values[np.isfinite(values)]
    if not len(values):
        return np.nan, 0
    return float(values.sum() if pool == "sum" else values.max()), 0


def pooled_values(slides: pd.DataFrame, endpoints: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per tissue, arm, patient, timepoint and endpoint (``endpoints``: tissue → the list of
    :func:`histo.stats.endpoints.endpoint_table`): ``value`` and what stands behind it: ``slides``
    (names, ``;``-joined), ``n_slides``, ``area_mm2`` (tissue area), ``n_pieces`` (tissue pieces),
    ``n_regions`` (regions behind a median)."""
    rows = []
    keys = ["tissue", "arm", "patient", "timepoint"]
    for (tissue, arm, patient, timepoint), group in slides.groupby(keys, sort=False):
        area = pd.to_numeric(group.get("area_mm2"), errors="coerce")
        pieces = pd.to_numeric(group.get("n_tissue_pieces"), errors="coerce")
        behind = dict(
            slides=";".join(group["name"].astype(str)),
            n_slides=len(group),
            area_mm2=float(area.sum()) if area is not None else np.nan,
            n_pieces=int(pieces.sum()) if pieces is not None else 0,
        )
        for e in endpoints.get(tissue, []):
            value, n_regions = pooled_value(group, e)
            rows.append(
                dict(
                    tissue=tissue,
                    arm=arm,
                    patient=patient,
                    timepoint=timepoint,
                    metric=e["metric"],
                    value=value,
                    **behind,
                    n_regions=n_regions,
                )
            )
    return pd.DataFrame(rows, columns=["tissue", "arm", "patient", "timepoint", "metric", "value", *WEIGHT_COLUMNS])


def paired_rows(values: pd.DataFrame) -> pd.DataFrame:
    """One row per tissue, arm, patient and endpoint with a value at both timepoints: ``pre``,
    ``post``, ``change`` (post − pre) and, per timepoint, the slides, tissue area (mm²), pieces and
    regions behind the value (``area_mm2_pre``, …)."""
    keys = ["tissue", "arm", "patient", "metric"]
    wide = values.dropna(subset=["value"]).pivot(index=keys, columns="timepoint", values=["value", *WEIGHT_COLUMNS])
    if wide.empty or not {PRE, POST} <= set(wide.columns.get_level_values(1)):
        return pd.DataFrame(columns=[*keys, PRE, POST, "change"])
    table = wide["value"][[PRE, POST]].dropna()
    table["change"] = table[POST] - table[PRE]
    for column in WEIGHT_COLUMNS:
        table[[f"{column}_{PRE}", f"{column}_{POST}"]] = wide[column].loc[table.index, [PRE, POST]].to_numpy()
    return table.reset_index().rename_axis(columns=None)


def _has_ties(x: np.ndarray) -> bool:
    return len(np.unique(x)) < len(x)


def within_arm_test(changes: np.ndarray) -> dict:
    """Two-sided Wilcoxon signed-rank test that the changes are centred on 0 (zeros dropped, as
    Wilcoxon's original test): exact where there are no ties, else an exact (or, for many pairs,
    Monte-Carlo) sign-flip permutation test of the same statistic. Returns ``statistic``,
    ``p_value`` and ``test`` (which test ran, or why none did)."""
    d = np.asarray(changes, float)
    d = d[d != 0]
    n = len(d)
    smallest = 2.0 / 2**n if n else 1.0
    if smallest > ALPHA:
        return dict(
            statistic=np.nan,
            p_value=np.nan,
            test=f"not tested: {n} non-zero changes; the smallest "
            f"possible two-sided p would be {smallest:.3g} > {ALPHA}",
        )
    if not _has_ties(np.abs(d)) and n <= EXACT_MAX_N:
        method, test = "exact", "Wilcoxon signed-rank, exact"
    else:
        method = PermutationMethod(n_resamples=N_RESAMPLES, random_state=0)
        test = "Wilcoxon signed-rank, " + (
            "exact permutation (ties)" if 2**n <= N_RESAMPLES else f"{N_RESAMPLES} random sign flips (ties)"
        )
    result = wilcoxon(d, method=method)
    return dict(statistic=float(result.statistic), p_value=float(result.pvalue), test=test)


def _mwu_null_cdf(m: int, n: int) -> np.ndarray:
    """P(U ≤ u), u = 0 … m·n, of the Mann–Whitney U of samples of ``m`` and ``n`` without ties: the
    coefficients of the Gaussian binomial [m + n choose m]_q."""
    size = m * n + 1
    c = np.zeros(size)
    c[0] = 1.0
    for i in range(1, m + 1):
        step = n + i
        if step < size:
            c[step:] = c[step:] - c[: size - step].copy()  # × (1 − q^(n+i))
        for k in range(i, size):  # ÷ (1 − q^i)
            c[k] += c[k - i]
    return np.cumsum(c) / c.sum()


def _signed_rank_null_cdf(n: int) -> np.ndarray:
    """P(T ≤ t), t = 0 … n(n + 1)/2, of the Wilcoxon signed-rank statistic of ``n`` values without ties
    or zeros: the coefficients of ∏ᵢ (1 + qⁱ) over 2ⁿ."""
    c = np.zeros(n * (n + 1) // 2 + 1)
    c[0] = 1.0
    for i in range(1, n + 1):
        c[i:] = c[i:] + c[:-i].copy()
    return np.cumsum(c) / c.sum()


def hodges_lehmann_paired(d: np.ndarray, level: float = 1 - ALPHA) -> tuple[float, float, float]:
    """One-sample Hodges–Lehmann estimate of the centre of the changes ``d`` (the median of the Walsh
    averages (dᵢ + dⱼ)/2, i ≤ j) and its Tukey confidence interval at ``level``: the order
    statistics of the Walsh averages that the exact signed-rank null distribution puts at
    (1 − level)/2 from each end (exact without ties, conservative with them). NaN bounds when no
    interval of that level exists for this n (fewer than 6 changes at 95 %)."""
    d = np.asarray(d, float)
    if not len(d):
        return np.nan, np.nan, np.nan
    i, j = np.triu_indices(len(d))
    walsh = np.sort((d[i] + d[j]) / 2)
    estimate = float(np.median(walsh))
    k = int(np.searchsorted(_signed_rank_null_cdf(len(d)), (1 - level) / 2, side="right"))
    if k == 0:
        return estimate, np.nan, np.nan
    return estimate, float(walsh[k - 1]), float(walsh[len(walsh) - k])


def hodges_lehmann(a: np.ndarray, b: np.ndarray, level: float = 1 - ALPHA) -> tuple[float, float, float]:
    """Hodges–Lehmann shift of ``a`` against ``b`` (median of all differences aᵢ − bⱼ) and its
    Moses confidence interval at ``level``: the order statistics of those differences that the
    exact Mann–Whitney null distribution puts at (1 − level)/2 from each end (exact without ties,
    conservative with them). NaN bounds when no interval of that level exists for these sizes."""
    diffs = np.sort(np.subtract.outer(np.asarray(a, float), np.asarray(b, float)).ravel())
    estimate = float(np.median(diffs))
    cdf = _mwu_null_cdf(len(a), len(b))
    k = int(np.searchsorted(cdf, (1 - level) / 2, side="right"))  # P(U ≤ k − 1) ≤ (1 − level)/2
    if k == 0:
        return estimate, np.nan, np.nan
    return estimate, float(diffs[k - 1]), float(diffs[len(diffs) - k])


def between_arms_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Two-sided Mann–Whitney U test of the changes of arm ``a`` against arm ``b`` (exact without
    ties, else an exact or Monte-Carlo permutation test of U) and the Hodges–Lehmann shift a − b
    with its exact confidence interval. Returns ``statistic`` (U of ``a``), ``p_value``,
    ``estimate``, ``ci_low``, ``ci_high`` and ``test``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    m, n = len(a), len(b)
    row = dict(statistic=np.nan, p_value=np.nan, estimate=np.nan, ci_low=np.nan, ci_high=np.nan)
    if not (m and n):
        return {**row, "test": f"not tested: {m} and {n} patients with both timepoints"}
    row["estimate"], row["ci_low"], row["ci_high"] = hodges_lehmann(a, b)
    if len(np.unique(np.concatenate([a, b]))) == 1:
        return {**row, "test": f"not tested: every change is {a[0]:g}"}
    smallest = 2.0 / math.comb(m + n, m)
    if smallest > ALPHA:
        return {
            **row,
            "test": f"not tested: {m} and {n} patients; the smallest possible two-sided p would be "
            f"{smallest:.3g} > {ALPHA}",
        }
    if not _has_ties(np.concatenate([a, b])) and max(m, n) <= EXACT_MAX_N:
        method, test = "exact", "Mann–Whitney U, exact"
    else:
        method = PermutationMethod(n_resamples=N_RESAMPLES, random_state=0)
        test = "Mann–Whitney U, " + (
            "exact permutation (ties)"
            if math.comb(m + n, m) <= N_RESAMPLES
            else f"{N_RESAMPLES} random permutations (ties)"
        )
    result = mannwhitneyu(a, b, alternative="two-sided", method=method)
    return {**row, "statistic": float(result.statistic), "p_value": float(result.pvalue), "test": test}


def arm_order(slides: pd.DataFrame) -> list[str]:
    """The arms in the order of their first slide in the sheet (the between-arm shift is first − second)."""
    return list(dict.fromkeys(slides["arm"]))


def endpoint_tests(pairs: pd.DataFrame, endpoints: dict[str, list[dict]], arms: list[str]) -> pd.DataFrame:
    """Per tissue and endpoint: a ``within <arm>`` row per arm (``n`` pairs, medians pre / post,
    one-sample Hodges–Lehmann ``estimate`` of the change with ``ci_low`` / ``ci_high``, Wilcoxon)
    and, with two arms, a ``<first> − <second>`` row (``n`` = n₁ + n₂, Hodges–Lehmann ``estimate``
    and ``ci_low`` / ``ci_high``, Mann–Whitney); ``q_value`` per tissue, family and comparison.
    Primary endpoints come first. A declared endpoint without any paired value keeps its rows
    (``n`` 0, ``test`` says why); an undeclared one (``rest``) without values is left out."""
    rows = []
    for tissue, declared in endpoints.items():
        for e in declared:
            group = pairs[(pairs["tissue"] == tissue) & (pairs["metric"] == e["metric"])]
            if group.empty and not e.get("declared", True):
                continue
            info = dict(
                tissue=tissue, family=e["family"], metric=e["metric"], label=e["label"], unit=e["unit"], pool=e["pool"]
            )
            missing = f"not tested: no patient has a value both {PRE} and {POST}" + (
                f" (no {e['region'].replace('_', ' ')} found in the slides, or no slides of this tissue)"
                if e.get("region")
                else " (no slides of this tissue, or the metric is missing from them)"
            )
            changes = {arm: group.loc[group["arm"] == arm, "change"].to_numpy(float) for arm in arms}
            for arm in arms:
                g = group[group["arm"] == arm]
                estimate, low, high = hodges_lehmann_paired(changes[arm])
                test = within_arm_test(changes[arm])
                rows.append(
                    dict(
                        info,
                        comparison=f"within {arm}",
                        n=len(g),
                        median_pre=g[PRE].median(),
                        median_post=g[POST].median(),
                        estimate=estimate,
                        ci_low=low,
                        ci_high=high,
                        **(test if len(group) else {**test, "test": missing}),
                    )
                )
            if len(arms) == 2:
                first, second = arms
                result = between_arms_test(changes[first], changes[second])
                if group.empty:
                    result["test"] = missing
                rows.append(
                    dict(
                        info,
                        comparison=f"{first} − {second}",
                        n=len(changes[first]) + len(changes[second]),
                        median_pre=group[PRE].median(),
                        median_post=group[POST].median(),
                        **result,
                    )
                )
    columns = [
        "tissue",
        "family",
        "metric",
        "label",
        "unit",
        "pool",
        "comparison",
        "n",
        "median_pre",
        "median_post",
        "estimate",
        "ci_low",
        "ci_high",
        "statistic",
        "p_value",
        "q_value",
        "test",
    ]
    table = pd.DataFrame(rows, columns=columns)
    for _, index in table.groupby(["tissue", "family", "comparison"], sort=False).groups.items():
        p = table.loc[index, "p_value"].dropna()
        if len(p):
            table.loc[p.index, "q_value"] = false_discovery_control(p.to_numpy(float), method="bh")
    return table


def tissue_endpoints(slides: pd.DataFrame, workflows: dict[str, Workflow], metrics: list[str]) -> dict[str, list[dict]]:
    """tissue → its endpoint list (:func:`histo.stats.endpoints.endpoint_table`), from the validated
    workflow of that tissue in ``workflows`` (tissue → workflow), else the defaults (no primary
    endpoint; every numeric slide metric but sampling sizes and counts exploratory). Every tissue of
    ``workflows`` is listed, with usable slides or not, so its declared endpoints are reported."""
    default = Endpoints().validated()
    out = {}
    for tissue in dict.fromkeys([*slides["tissue"], *workflows]):  # a sheet's tissue without usable slides too
        wf = workflows.get(tissue)
        out[tissue] = endpoint_table(wf.endpoints if wf else default, metrics)
    return out
