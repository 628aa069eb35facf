"""Cohort tables over a batch's summary: per slide-level metric, pre vs post treatment per patient
(paired within patient and tissue), the differences, and a Wilcoxon signed-rank test where there
are enough pairs; one plot of the pairs per tissue.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import wilcoxon

PRE, POST = "pre", "post"  # the sample sheet's timepoint values (case-insensitive)
# pairs with a non-zero difference a test needs: with 5 the smallest exact two-sided p is 2/2⁵ = 0.0625
MIN_PAIRS = 6


def paired_rows(summary: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per tissue, patient and metric with both timepoints: ``pre``, ``post``,
    ``difference`` (post − pre) and the slides behind each value (their mean where a patient has
    several slides of one timepoint and tissue). Only ``ok`` slides count."""
    ok = summary[summary["status"].eq("ok")].copy()
    ok["timepoint"] = ok["timepoint"].astype(str).str.strip().str.lower()
    ok["tissue"] = ok["tissue"].fillna("") if "tissue" in ok.columns else ""
    ok = ok[ok["timepoint"].isin([PRE, POST]) & ok["patient"].astype(str).str.strip().ne("")]
    keys = ["tissue", "patient", "metric"]
    long = ok.melt(id_vars=["tissue", "patient", "timepoint", "name"], value_vars=metrics, var_name="metric")
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    values = long.pivot_table(index=keys, columns="timepoint", values="value", aggfunc="mean")
    slides = long.pivot_table(index=keys, columns="timepoint", values="name", aggfunc=";".join)
    if not {PRE, POST} <= set(values.columns):
        return pd.DataFrame(columns=[*keys, PRE, POST, "difference", "slides_pre", "slides_post"])
    table = values[[PRE, POST]].join(slides[[PRE, POST]].add_prefix("slides_")).dropna(subset=[PRE, POST])
    table.insert(2, "difference", table[POST] - table[PRE])
    return table.reset_index().rename_axis(columns=None)


def paired_tests(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per tissue and metric: number of pairs, medians, and the two-sided Wilcoxon signed-rank test
    on the differences (zeros dropped) where at least ``MIN_PAIRS`` differences are non-zero."""
    rows = []
    for (tissue, metric), group in pairs.groupby(["tissue", "metric"], sort=False):
        d = group["difference"].to_numpy(float)
        nonzero = int(np.count_nonzero(d))
        row = dict(tissue=tissue, metric=metric, n_pairs=len(d), n_nonzero=nonzero, median_pre=group[PRE].median(),
                   median_post=group[POST].median(), median_difference=float(np.median(d)),
                   wilcoxon_statistic=np.nan, p_value=np.nan, test="")
        if nonzero >= MIN_PAIRS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                result = wilcoxon(d)
            row.update(wilcoxon_statistic=float(result.statistic), p_value=float(result.pvalue),
                       test="wilcoxon signed-rank, two-sided")
        else:
            row["test"] = f"not tested: {nonzero} non-zero differences (< {MIN_PAIRS})"
        rows.append(row)
    return pd.DataFrame(rows)


def plot_pairs(pairs: pd.DataFrame, tests: pd.DataFrame, path: Path, title: str, ncols: int = 5) -> None:
    """Small multiples, one per metric that changes in some pair: a line pre → post per patient,
    the medians in black, the p-value (or the number of pairs) in the panel title."""
    changing = [m for m, g in pairs.groupby("metric", sort=False) if g["difference"].ne(0).any()]
    if not changing:
        return
    ncols = min(ncols, len(changing))
    nrows = -(-len(changing) // ncols)
    fig = Figure(figsize=(3 * ncols, 2.6 * nrows), layout="constrained")  # no pyplot state: thread-safe
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    stats = tests.set_index("metric")
    for ax, metric in zip(axes.flat, changing):
        group = pairs[pairs["metric"] == metric]
        ax.plot([0, 1], group[[PRE, POST]].to_numpy().T, color="0.6", lw=1, marker="o", ms=3)
        ax.plot([0, 1], [group[PRE].median(), group[POST].median()], color="k", lw=2.5)
        p = stats.loc[metric, "p_value"]
        note = f"p = {p:.3g}, n = {len(group)}" if pd.notna(p) else f"n = {len(group)} pairs"
        ax.set_title(f"{metric}\n{note}", fontsize=8)
        ax.set_xticks([0, 1], [PRE, POST])
        ax.set_xlim(-0.2, 1.2)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(changing):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=80)


def write_cohort(summary: pd.DataFrame, metrics: list[str], out: Path, console=None) -> pd.DataFrame | None:
    """``out/cohort.csv`` (paired rows), ``out/cohort_tests.csv`` and ``out/cohort_<tissue>.png`` (``cohort.png`` without a tissue column)
    when the summary has ``patient`` and ``timepoint`` columns and at least one pre/post pair;
    returns the paired rows, or None (with a line on ``console``) when there are none."""
    say = console.print if console is not None else print
    if not {"patient", "timepoint"} <= set(summary.columns):
        return None
    pairs = paired_rows(summary, metrics)
    if pairs.empty:
        say(f"no cohort table: no patient has both a '{PRE}' and a '{POST}' slide that succeeded")
        return None
    tests = paired_tests(pairs)
    pairs.to_csv(out / "cohort.csv", index=False)
    tests.to_csv(out / "cohort_tests.csv", index=False)
    for tissue, group in pairs.groupby("tissue"):
        name = f"cohort_{re.sub(r'[^A-Za-z0-9._-]+', '-', tissue)}.png" if tissue else "cohort.png"
        plot_pairs(group, tests[tests["tissue"] == tissue], out / name,
                   f"{tissue or 'all slides'}: {PRE} vs {POST} per patient")
    say(f"wrote {out / 'cohort.csv'} ({pairs['patient'].nunique()} patients paired) and {out / 'cohort_tests.csv'}")
    return pairs
