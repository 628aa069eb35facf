"""``cohort.html``: the cohort's report in one self-contained file (figures as base64 PNG).

Primary endpoints first, as paired plots (a line pre → post per patient, coloured by arm) and their
tests; then the exploratory endpoints' table; the biopsies behind each value; the methods in plain
words and the caution that a cohort of about 15 patients supports estimates more than verdicts.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from histo.stats.cohort import (
    ALPHA,
    POST,
    PRE,
    arm_order,
    endpoint_tests,
    paired_rows,
    pooled_values,
    tissue_endpoints,
    usable_slides,
)

if TYPE_CHECKING:
    from histo.workflow import Workflow

ARM_COLOURS = ("#d95f02", "#1b9e77", "#7570b3", "#e7298a")  # colour-blind safe (ColorBrewer Dark2)
STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222;line-height:1.45}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.caution{background:#fff4e0;
border-left:5px solid #e69f00;padding:0.6em 1em}.low{font-weight:bold}.muted{color:#777}img{max-width:100%}"""


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}"
    return str(value)


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return f'<img alt="paired plots" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def paired_figure(pairs: pd.DataFrame, tests: pd.DataFrame, arms: list[str], ncols: int = 3) -> str:
    """One panel per endpoint of ``pairs`` (one tissue): per arm a line pre → post per patient in the
    arm's colour and the arm's medians as a thick line; the between-arm shift and q in the title."""
    metrics = [m for m in dict.fromkeys(tests["metric"]) if m in set(pairs["metric"])]  # declared order
    if not metrics:  # declared endpoints without values: the table below says so
        return ""
    ncols = min(ncols, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")  # no pyplot state: thread-safe
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    between = tests[~tests["comparison"].str.startswith("within ")].set_index("metric")
    for ax, metric in zip(axes.flat, metrics):
        group = pairs[pairs["metric"] == metric]
        info = tests[tests["metric"] == metric].iloc[0]
        for k, arm in enumerate(arms):
            g = group[group["arm"] == arm]
            x = np.array([0, 1]) + 1.6 * k
            colour = ARM_COLOURS[k % len(ARM_COLOURS)]
            if len(g):
                ax.plot(x, g[[PRE, POST]].to_numpy().T, color=colour, alpha=0.55, lw=1, marker="o", ms=3)
                ax.plot(x, [g[PRE].median(), g[POST].median()], color=colour, lw=3.5, solid_capstyle="round")
        ax.set_xticks(
            np.ravel([[1.6 * k, 1.6 * k + 1] for k in range(len(arms))]),
            [f"{tp}\n{arm if tp == PRE else ''}" for arm in arms for tp in (PRE, POST)],
            fontsize=7,
        )
        ax.set_xlim(-0.4, 1.6 * (len(arms) - 1) + 1.4)
        ax.set_ylabel(info["unit"], fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        note = ""
        if metric in between.index and pd.notna(between.loc[metric, "estimate"]):
            b = between.loc[metric]
            ci = f" [{_fmt(b['ci_low'])}, {_fmt(b['ci_high'])}]" if pd.notna(b["ci_low"]) else ""
            q = f", q = {_fmt(b['q_value'], 2)}" if pd.notna(b["q_value"]) else ", not tested"
            note = f"\nshift {_fmt(b['estimate'])}{ci}{q}"
        ax.set_title(f"{info['label']}{note}", fontsize=8.5)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    return _png(fig)


def endpoint_table(tests: pd.DataFrame, arms: list[str]) -> str:
    """One row per endpoint: unit, per arm the change (Hodges–Lehmann, its CI, n pairs, within-arm p
    and q), the between-arm shift with its CI, p, q and the test that ran (or why none did)."""
    head = ["endpoint", "unit", *[f"{arm}: change [{1 - ALPHA:.0%} CI] (n), p, q" for arm in arms]]
    if len(arms) == 2:
        head += [f"shift {arms[0]} − {arms[1]} [{1 - ALPHA:.0%} CI]", "p", "q", "between-arm test"]
    body = []
    for metric, group in tests.groupby("metric", sort=False):
        rows = group.set_index("comparison")
        first = group.iloc[0]
        cells = [
            html.escape(first["label"])
            + (f'<br><span class="muted">{html.escape(metric)}</span>' if first["label"] != metric else ""),
            html.escape(first["unit"]),
        ]
        for arm in arms:
            r = rows.loc[f"within {arm}"]
            test = "" if pd.notna(r["p_value"]) else f'<br><span class="muted">{html.escape(r["test"])}</span>'
            ci = f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if pd.notna(r["ci_low"]) else ""
            cells.append(
                f"{_fmt(r['estimate'])}{ci} ({r['n']}), p {_fmt(r['p_value'], 2) or '–'}, "
                f"q {_fmt(r['q_value'], 2) or '–'}{test}"
            )
        if len(arms) == 2:
            r = rows.drop(index=[f"within {a}" for a in arms]).iloc[0]
            ci = f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if pd.notna(r["ci_low"]) else ""
            low = ' class="low"' if pd.notna(r["q_value"]) and r["q_value"] < ALPHA else ""
            cells += [
                f"{_fmt(r['estimate'])}{ci}",
                _fmt(r["p_value"], 2),
                f"<span{low}>{_fmt(r['q_value'], 2)}</span>",
                html.escape(r["test"]),
            ]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table>"


def behind_table(pairs: pd.DataFrame) -> str:
    """Per tissue, arm and patient: slides, tissue pieces and tissue area (mm²) behind the pre and
    post values."""
    keys = ["tissue", "arm", "patient"]
    columns = [f"{c}_{tp}" for tp in (PRE, POST) for c in ("slides", "n_pieces", "area_mm2")]
    table = pairs.drop_duplicates(keys)[keys + columns]
    head = keys + [f"{tp}: {c}" for tp in (PRE, POST) for c in ("slides", "pieces", "tissue mm²")]
    body = [
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in table.itertuples(index=False)
    ]
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table>"


def methods(arms: list[str], n_patients: dict[str, int]) -> str:
    """The methods in plain words, with the numbers of this cohort."""
    counts = ", ".join(f"{arm}: {n}" for arm, n in n_patients.items())
    two = len(arms) == 2
    between = (
        (
            f"<li><b>Between the arms</b> (the study's question): are the changes in {arms[0]} different from "
            f"those in {arms[1]}? The Mann–Whitney U test compares the two groups of changes without "
            "assuming a distribution (exact p-values; with tied values an exact permutation test). The "
            f"<b>shift</b> is the Hodges–Lehmann estimate: the median of every difference between a change in "
            f"{arms[0]} and a change in {arms[1]}, in the endpoint's unit; negative means the endpoint fell "
            f"more (or rose less) in {arms[0]}. Its {1 - ALPHA:.0%} confidence interval is exact (Moses); "
            "it is empty where the arms are too small for one.</li>"
        )
        if two
        else "<li>The sheet has no second arm (column <code>arm</code>), so the arms are not compared.</li>"
    )
    return f"""<h2>Methods</h2><ul>
<li><b>Patients</b> (with both a pre- and a post-treatment biopsy): {html.escape(counts)}.</li>
<li><b>Values</b>: every endpoint is computed per patient and timepoint from all of that patient's slides of
the tissue: densities and area fractions as all cells (or structures) over all tissue area, cell-type
fractions over all nuclei, medians (germinal-centre area, mantle thickness) over every structure of all
slides; never as an average of slide averages. The table of biopsies says how much tissue stands behind
each value: a value from a small or fragmented biopsy deserves less trust.</li>
<li><b>Change</b> = post − pre, per patient, in the endpoint's unit.</li>
<li><b>Within an arm</b>: the Wilcoxon signed-rank test asks whether the changes are centred on zero
(exact p-values; with tied values an exact sign-flip permutation test). The <b>change</b> shown is the
Hodges–Lehmann estimate (the median of the averages of every pair of changes, each change with itself
included), with its exact {1 - ALPHA:.0%} confidence interval (Tukey; none for fewer than 6 patients).
It cannot say whether the treatment caused the change: untreated biopsies change too.</li>{between}
<li><b>Not tested</b>: where even the most extreme data could not reach p ≤ {ALPHA} (e.g. fewer than 6 pairs
within an arm, or 3 against 3 patients between arms), no test is run and the table says why. A declared
endpoint that no patient has before and after (no slides of its tissue, no structure of its kind found)
is listed with the reason, not left out.</li>
<li><b>q-values</b> (Benjamini–Hochberg): with many endpoints some p-values fall below {ALPHA} by chance.
A q-value is the smallest false-discovery rate at which an endpoint would count as changed: among
endpoints with q &lt; {ALPHA}, about {ALPHA:.0%} or fewer are expected to be false findings. Primary and
exploratory endpoints are corrected separately, per tissue and comparison, so the few primary endpoints
are not diluted by the many exploratory ones. Sampling sizes and raw counts are never tested.</li>
</ul>"""


def write_report(
    path: str | Path, pairs: pd.DataFrame, tests: pd.DataFrame, arms: list[str], slides: pd.DataFrame
) -> None:
    """Write ``cohort.html`` from the paired rows and tests of :func:`write_cohort`.

    Parameters
    ----------
    path : str or Path
        The HTML file written.
    pairs : DataFrame
        Paired rows (tissue, arm, patient, metric, pre, post, change, what stands behind them).
    tests : DataFrame
        :func:`histo.stats.cohort.endpoint_tests`: one row per tissue, endpoint and comparison.
    arms : list of str
        The arms, first one first (the shift is first − second).
    slides : DataFrame
        The usable slides (names, tissue, arm) behind the report.
    """
    n_patients = pairs.groupby("arm")["patient"].nunique().reindex(arms).fillna(0).astype(int).to_dict()
    total = sum(n_patients.values())
    title = " vs ".join(arms) if len(arms) > 1 else "pre vs post"
    parts = [
        f"<h1>Cohort report: {html.escape(title)}</h1>",
        f"<p>{total} patients with paired biopsies "
        f"({', '.join(f'{html.escape(a)} {n}' for a, n in n_patients.items())}), {len(slides)} slides.</p>",
        f'<p class="caution"><b>Read estimates before verdicts.</b> With {total} patients a p-value says '
        "little on its own: a real change of moderate size is often missed, and a chance difference can "
        "look convincing. The shift and its confidence interval say how large a change the data allow; "
        "the q-value says how it stands among the endpoints tested. Generated data and image analysis "
        "proxies (DOMAIN.md) are not a pathologist's reading.</p>",
    ]
    for tissue, tt in tests.groupby("tissue", sort=False):
        tp = pairs[pairs["tissue"] == tissue]
        name = html.escape(tissue or "all slides")
        primary = tt[tt["family"] == "primary"]
        parts.append(f"<h2>{name}: primary endpoints</h2>")
        if len(primary):
            parts.append(paired_figure(tp[tp["metric"].isin(primary["metric"])], primary, arms))
            parts.append(endpoint_table(primary, arms))
        else:
            parts.append(
                "<p>No primary endpoints declared for this tissue (workflow <code>endpoints.primary</code>).</p>"
            )
        exploratory = tt[tt["family"] == "exploratory"]
        if len(exploratory):
            order = exploratory[~exploratory["comparison"].str.startswith("within ")].sort_values("p_value")["metric"]
            order = list(order) if len(order) else list(dict.fromkeys(exploratory["metric"]))
            parts.append(
                f"<h2>{name}: exploratory endpoints</h2><p>Hypotheses for the next study, not findings; "
                "sorted by the between-arm p-value.</p>"
            )
            parts.append(endpoint_table(exploratory.set_index("metric").loc[order].reset_index(), arms))
        if tp.empty:
            parts.append(f"<p>No patient has usable {PRE} and {POST} slides of {name}.</p>")
        else:
            parts.append(f"<h3>{name}: biopsies behind each value</h3>" + behind_table(tp))
    parts.append(methods(arms, n_patients))
    parts.append(
        "<p class='muted'>Tables for the statistician: <code>cohort.csv</code> (one row per tissue, patient "
        "and endpoint: pre, post, change and what stands behind them) and <code>cohort_tests.csv</code> "
        "(one row per tissue, endpoint and comparison).</p>"
    )
    Path(path).write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Cohort report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>",
        encoding="utf-8",
    )


def write_cohort(
    summary: pd.DataFrame, metrics: list[str], out: Path, console=None, workflows: dict[str, Workflow] | None = None
) -> pd.DataFrame | None:
    """The cohort report of a batch when ``summary`` has ``patient`` and ``timepoint`` columns.

    Parameters
    ----------
    summary : DataFrame
        ``summary.csv`` of :func:`histo.run.batch.run_batch`: sheet columns (``patient``, ``timepoint``,
        optional ``tissue`` and ``arm``), ``status``, ``bundle``, slide metrics.
    metrics : list of str
        The numeric slide-metric columns of ``summary``.
    out : Path
        Folder that receives ``cohort.csv`` (paired rows), ``cohort_tests.csv`` (tests) and
        ``cohort.html`` (the report).
    console : rich Console, optional
        Where the one-line outcome is printed (else ``print``).
    workflows : dict of str to Workflow, optional
        tissue (the sheet's spelling) → the validated workflow whose ``endpoints`` apply.

    Returns
    -------
    DataFrame or None
        The paired rows, or None (with a line on ``console``) without patients or pairs.
    """
    say = console.print if console is not None else print
    if not {"patient", "timepoint"} <= set(summary.columns):
        return None
    slides = usable_slides(summary)
    endpoints = tissue_endpoints(slides, workflows or {}, metrics)
    pairs = paired_rows(pooled_values(slides, endpoints))
    if pairs.empty:
        say(f"no cohort table: no patient has both a '{PRE}' and a '{POST}' slide that succeeded")
        return None
    arms = arm_order(slides)
    info = pd.DataFrame([{"tissue": t, **e} for t, es in endpoints.items() for e in es])
    pairs = pairs.merge(info[["tissue", "metric", "family", "unit", "pool"]], on=["tissue", "metric"], how="left")
    with warnings.catch_warnings():  # scipy's notes on ties and zeros: the table names the test that ran
        warnings.simplefilter("ignore", (RuntimeWarning, UserWarning))
        tests = endpoint_tests(pairs, endpoints, arms)
    pairs.to_csv(out / "cohort.csv", index=False)
    tests.to_csv(out / "cohort_tests.csv", index=False)
    write_report(out / "cohort.html", pairs, tests, arms, slides)
    n = pairs.groupby("arm")["patient"].nunique()
    say(
        f"wrote {out / 'cohort.html'}, cohort.csv and cohort_tests.csv "
        f"({', '.join(f'{arm}: {k} patients paired' for arm, k in n.items())})"
    )
    return pairs
