"""Many slides on one Dask cluster: tiles of several slides in flight at once, one bundle per slide,
failures recorded, complete bundles with an unchanged fingerprint reused, ``summary.csv`` over all.

The client process plans slides (open, tissue, tiles) and keeps about two tile tasks per worker
thread queued on the cluster; a slide whose tiles are all done is finished (structures, exports,
labels, ``run.json``) in a background thread while the tiles of the next slides keep the cluster busy.
"""

from __future__ import annotations

import json
import queue
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from distributed import Client
from distributed import Future as TileFuture
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from histo.errors import HistoError
from histo.io.bundle import SLIDE_SUFFIXES, OutputLock, bundle_lock, file_fingerprint, is_complete, slide_name
from histo.io.files import atomic_write
from histo.outputs.export import spreadsheet_safe
from histo.run.pipeline import (
    EarlyFinish,
    SlidePlan,
    finish_slide,
    plan_slide,
    run_fingerprint,
    submit_tiles,
    tile_finished,
)
from histo.segment.models import inference_precision, resolve_model
from histo.timing import Stopwatch, stopwatch
from histo.workflow import WORKFLOW_DIR, Workflow, load_workflow

RUN_COLUMNS = ("name", "status", "error", "reused", "bundle", "n_tiles", "n_tile_errors")  # besides sheet and metrics
TILES_PER_THREAD = 2  # tile tasks queued per worker thread: enough to bridge a slide's finishing
_TISSUES = {"lymph node": "lymph-node", "ln": "lymph-node", "synovial": "synovium"}  # sheet spellings → preset names
_STAINS = {"h&e": "he", "h & e": "he", "hematoxylin-eosin": "he"}


def read_input(path: str | Path) -> pd.DataFrame:
    """The slides of a batch: a folder of slide files, or a sample sheet CSV with a ``slide`` column
    (paths relative to the sheet's folder) and optionally ``patient``, ``timepoint``, ``tissue``,
    ``stain``, ``workflow``, ``mpp`` (µm/px) and any other columns, carried into the summary.

    Returns one row per slide with ``slide`` as an absolute path and ``name`` its bundle name.
    Raises HistoError naming the sheet for a missing or blank slide path, a column histo writes
    (``RUN_COLUMNS``), an ``mpp`` that is not a number or two slides with one bundle name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SLIDE_SUFFIXES)
        )
        if not files:
            raise HistoError(path, f"no slide files in this folder (looked for {', '.join(SLIDE_SUFFIXES)})")
        sheet = pd.DataFrame({"slide": [str(p.resolve()) for p in files]})
    elif path.is_file():
        try:
            sheet = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HistoError(path, f"not a readable CSV sample sheet ({exc})") from None
        sheet.columns = [c.strip().lower() for c in sheet.columns]
        if "slide" not in sheet.columns:
            raise HistoError(path, f"the sample sheet needs a 'slide' column (has: {', '.join(sheet.columns)})")
        if clash := [c for c in RUN_COLUMNS if c in sheet.columns]:
            raise HistoError(
                path, f"the sample sheet's column '{clash[0]}' is one histo writes into the summary; rename it"
            )
        if sheet.empty:
            raise HistoError(path, "the sample sheet lists no slides")
        if (blank := sheet["slide"].str.strip().eq("")).any():
            raise HistoError(path, f"line {blank.idxmax() + 2}: no slide path")
        sheet["slide"] = [str((path.parent / s.strip()).resolve()) for s in sheet["slide"]]
        if "mpp" in sheet.columns:
            mpp = pd.to_numeric(sheet["mpp"].where(sheet["mpp"].str.strip().ne("")), errors="coerce")
            if (bad := sheet["mpp"].str.strip().ne("") & mpp.isna()).any():
                raise HistoError(path, f"mpp must be a number of µm per px, got {sheet.loc[bad.idxmax(), 'mpp']!r}")
            sheet["mpp"] = mpp
    else:
        raise HistoError(path, "no such folder or sample sheet")
    sheet.insert(1, "name", [slide_name(s) for s in sheet["slide"]])
    twice = sheet[sheet["name"].duplicated(keep=False)]
    if len(twice):
        raise HistoError(
            path,
            f"slides {', '.join(twice['slide'])} would share the bundle name '{twice['name'].iloc[0]}'; rename one",
        )
    if missing := [s for s in sheet["slide"] if not Path(s).is_file()]:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise HistoError(path, f"slide file not found: {missing[0]}{more}")
    return sheet


def workflow_for(entry: dict, default: str | None) -> str:
    """The workflow of one slide: ``default`` (``--workflow``), else the sheet's ``workflow``, else the
    preset named ``<tissue>-<stain>`` (e.g. ``lymph-node-he``), else ``lymph-node-he``."""
    if default:
        return default
    if entry.get("workflow"):
        return entry["workflow"]
    tissue, stain = (str(entry.get(k) or "").strip().lower() for k in ("tissue", "stain"))
    if not (tissue or stain):
        return "lymph-node-he"
    name = f"{_TISSUES.get(tissue, tissue)}-{_STAINS.get(stain, stain or 'he')}".replace(" ", "-")
    if not (WORKFLOW_DIR / f"{name}.yaml").is_file():
        raise HistoError(
            entry["slide"],
            f"no workflow preset '{name}' for tissue '{tissue}' and stain '{stain}'; "
            "add a 'workflow' column or pass --workflow",
        )
    return name


def is_current(bundle: Path, slide: Path, wf: Workflow, model: str | None, mpp: float | None) -> bool:
    """True when ``bundle`` is complete and its fingerprint equals the one the slide would get now.
    The input's SHA-256 is taken from ``run.json`` while the file's size and mtime are unchanged,
    else recomputed (so a re-run over hundreds of unchanged slides reads none of them)."""
    if not is_complete(bundle):
        return False
    run = json.loads((bundle / "run.json").read_text())
    if "fingerprint" not in run:
        return False
    stat, seen = slide.stat(), run["input"]
    same_file = stat.st_size == seen.get("size_bytes") and stat.st_mtime == seen.get("mtime")
    sha = seen["sha256"] if same_file else file_fingerprint(slide)["sha256"]
    spec = resolve_model(model or wf.model, stain="fluo" if wf.stain == "if" else "he")
    return run["fingerprint"] == run_fingerprint(sha, wf, spec, mpp, None, inference_precision())


def slide_metrics(bundle: Path) -> dict:
    """The slide row of ``bundle/metrics.csv`` (areas mm², counts, densities per mm², …) and the
    bundle's number of tiles."""
    run = json.loads((bundle / "run.json").read_text())
    metrics = pd.read_csv(bundle / "metrics.csv")
    row = metrics[metrics["region_id"] == "slide"].drop(columns=["region_id", "kind", "name"], errors="ignore")
    values = row.iloc[0].dropna().to_dict() if len(row) else {}  # region-only columns are empty here
    return {"n_tiles": run["n_tiles"], "n_tile_errors": len(run.get("tile_errors", [])), **values}


def write_summary(rows: list[dict], sheet_columns: list[str], out: Path) -> pd.DataFrame:
    """``out/summary.csv``: one row per slide, sheet columns, then run columns, then slide metrics
    (written to a temporary name and renamed: a failed write keeps the previous one). Returns the table."""
    table = pd.DataFrame(rows)
    first = [c for c in [*sheet_columns, *RUN_COLUMNS] if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first]]
    with atomic_write(out / "summary.csv") as tmp:
        spreadsheet_safe(table).to_csv(tmp, index=False)
    return table


def _threads(client: Client) -> int:
    return max(1, sum(client.nthreads().values()))


def run_batch(
    sheet: pd.DataFrame,
    out: str | Path,
    client: Client | None = None,
    workflow: str | None = None,
    model: str | None = None,
    mpp: float | None = None,
    show_progress: bool = True,
    cluster: Callable[[], AbstractContextManager[Client]] | None = None,
) -> pd.DataFrame:
    """Analyse every slide of ``sheet`` into ``out/<name>/`` and write the cohort tables.

    Parameters
    ----------
    sheet : pandas.DataFrame
        The sample sheet (:func:`read_input`): ``name``, ``slide`` and optionally ``patient``,
        ``timepoint``, ``arm``, ``tissue``, ``stain``, ``workflow``, ``mpp`` (µm/px) and any
        other columns, carried into the summary.
    out : str or pathlib.Path
        The output folder: one bundle per slide, ``summary.csv`` and the cohort tables
        (``histo.stats.cohort``).
    client : distributed.Client, optional
        The Dask cluster the slides' tile tasks run on (or give ``cluster``).
    workflow : str, optional
        A preset name or YAML path for every slide; else the sheet's ``workflow`` column, else the
        preset of the slide's tissue and stain (:func:`workflow_for`).
    model : str, optional
        Overrides every workflow's nucleus model.
    mpp : float, optional
        µm/px of level 0 for every slide; else the sheet's ``mpp`` column where given, else the file's.
    show_progress : bool
        Progress bars on the console.
    cluster : callable, optional
        Instead of ``client``: a function giving a context manager that yields one (e.g.
        :func:`histo.run.cluster.dask_client`), entered only once the lock is held: a refused batch
        starts none.

    Returns
    -------
    pandas.DataFrame
        The summary: one row per slide (status, error, reused, bundle, the slide row's metrics),
        also written to ``out/summary.csv`` after every slide.

    Raises
    ------
    histo.errors.HistoError
        A second batch on the same ``out`` while this one runs (naming the folder), or an OSError
        outside a slide (disk full while writing the summary). A slide that fails is recorded with
        its error and the others go on; complete bundles with an unchanged fingerprint are reused.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with (
            OutputLock(out / ".histo-batch.lock", "this output folder"),
            cluster() if cluster else nullcontext(client) as client,
        ):
            return BatchRun(sheet, out, client, workflow, model, mpp, show_progress).run()
    except OSError as exc:
        raise HistoError(exc.filename or out, f"cannot write: {exc.strerror or exc}") from None


@dataclass
class InFlight:
    """A slide whose tiles were submitted and whose bundle is not finished yet."""

    entry: dict  # the sample sheet's row
    plan: SlidePlan
    futures: list[TileFuture]  # its tile tasks
    lock: OutputLock  # held on its bundle until it is finished or dropped
    left: int  # tile tasks not done yet
    totals: dict[str, float] = field(default_factory=dict)  # the tile tasks' timings summed (s)
    clock: Stopwatch = field(default_factory=stopwatch)  # since its tiles were submitted


class BatchRun:
    """One batch in progress (:func:`run_batch` holds the output folder's lock and the client).

    The client thread plans slides and keeps ``TILES_PER_THREAD`` tile tasks per worker thread
    queued (:meth:`fill`); Dask's callbacks and the finishing thread report through ``events``
    (kind ``tile``, ``segmented`` or ``finished``, the slide's name, the future), which :meth:`run`
    handles one at a time, so the in-flight slides are only ever touched by the client thread.
    """

    slides_bar: TaskID  # the progress bars, added when the run starts
    tiles_bar: TaskID

    def __init__(
        self,
        sheet: pd.DataFrame,
        out: Path,
        client: Client,
        workflow: str | None,
        model: str | None,
        mpp: float | None,
        show_progress: bool,
    ) -> None:
        self.out, self.client, self.workflow, self.model, self.mpp = out, client, workflow, model, mpp
        self.entries: list[dict] = sheet.to_dict("records")
        self.sheet_columns = [c for c in sheet.columns if c != "name"]
        self.todo = deque(self.entries)
        self.rows: dict[str, dict] = {}  # slide name → its summary row, once done
        self.events: queue.Queue[tuple[str, str, TileFuture | Future | None]] = queue.Queue()
        self.active: dict[str, InFlight] = {}  # slide name → its tiles on the cluster
        self.n_tiles = 0  # submitted so far
        self.console = Console()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.progress = Progress(*columns, console=self.console, disable=not show_progress)
        self.finisher = ThreadPoolExecutor(1, "finish-slide")

    def run(self) -> pd.DataFrame:
        """Every slide done (reused, finished or failed); then summary.csv and the cohort tables."""
        from histo.outputs.cohort_report import write_cohort

        self.console.print(f"Dask dashboard: {self.client.dashboard_link}")
        with self.progress, self.finisher:
            self.slides_bar = self.progress.add_task("slides", total=len(self.entries))
            self.tiles_bar = self.progress.add_task("tiles", total=0)
            self.fill()
            while self.active:
                kind, name, future = self.events.get()
                slide = self.active.get(name)
                if slide is None:  # a late tile of a slide that failed
                    continue
                if kind == "tile":
                    self.tile_done(name, slide, future)
                elif kind == "segmented":
                    self.segmented(name, slide)
                else:
                    self.finished(name, slide, future)
                self.fill()
        summary = write_summary([self.rows[e["name"]] for e in self.entries], self.sheet_columns, self.out)
        metrics = [
            c
            for c in summary.columns
            if c not in (*self.sheet_columns, *RUN_COLUMNS)
            and is_numeric_dtype(summary[c])
            and not is_bool_dtype(summary[c])
        ]
        write_cohort(summary, metrics, self.out, self.console, tissue_workflows(self.entries, self.workflow))
        return summary

    def record(self, entry: dict, **result) -> None:
        """A slide's summary row; summary.csv rewritten with every slide done so far."""
        self.rows[entry["name"]] = {**entry, **result}
        done = [self.rows[e["name"]] for e in self.entries if e["name"] in self.rows]
        write_summary(done, self.sheet_columns, self.out)
        self.progress.advance(self.slides_bar)

    def fail(self, entry: dict, exc: BaseException) -> None:
        """Record a slide's failure (a HistoError's one line, else the slide, the type and the message)."""
        message = str(exc) if isinstance(exc, HistoError) else f"{entry['slide']}: {type(exc).__name__}: {exc}"
        self.record(entry, status="failed", error=message, reused=False)
        self.console.print(f"[red]failed[/red] {message}")

    def start(self, entry: dict) -> None:
        """Reuse the slide's bundle, or plan the slide and submit its tiles, or record its failure."""
        try:
            slide_mpp = self.mpp or (entry["mpp"] if pd.notna(entry.get("mpp", None)) else None)
            wf = load_workflow(workflow_for(entry, self.workflow))
            bundle = self.out / entry["name"]
            if Path(entry["slide"]).is_file() and is_current(bundle, Path(entry["slide"]), wf, self.model, slide_mpp):
                self.record(entry, status="ok", error="", reused=True, bundle=str(bundle), **slide_metrics(bundle))
                return
            lock = bundle_lock(self.out, entry["name"]).acquire()
        except Exception as exc:  # noqa: BLE001 - a failing slide is recorded and the batch goes on
            self.fail(entry, exc)
            return
        try:
            plan = plan_slide(entry["slide"], self.out, wf, self.model, slide_mpp)
        except Exception as exc:  # noqa: BLE001
            lock.release()
            self.fail(entry, exc)
            return
        plan.early = EarlyFinish(plan)
        futures = submit_tiles(self.client, plan)
        self.active[plan.name] = InFlight(entry, plan, futures, lock, left=len(futures))
        self.n_tiles += len(futures)
        self.progress.update(self.tiles_bar, total=self.n_tiles)
        for future in futures:
            future.add_done_callback(lambda f, n=plan.name: self.events.put(("tile", n, f)))
        if not futures:  # no tissue: an empty bundle
            self.events.put(("segmented", plan.name, None))

    def fill(self) -> None:
        """Start slides until TILES_PER_THREAD tile tasks per worker thread are queued or running."""
        target = TILES_PER_THREAD * _threads(self.client)
        while self.todo and sum(a.left for a in self.active.values()) < target:
            self.start(self.todo.popleft())

    def tile_done(self, name: str, slide: InFlight, future: TileFuture) -> None:
        """One tile task of ``slide`` ended: its timings added and its part read (the finish only joins
        the parts: :class:`EarlyFinish`), or the slide dropped if it failed."""
        self.progress.advance(self.tiles_bar)
        try:
            tile_finished(slide.plan, slide.totals, future.result())
            slide.left -= 1
            if slide.left == 0:
                self.events.put(("segmented", name, None))
        except Exception as exc:  # noqa: BLE001
            self.drop(name, exc)

    def segmented(self, name: str, slide: InFlight) -> None:
        """Every tile of ``slide`` is done: finish it in the background thread."""
        slide.plan.timings["segment_s"] = slide.clock.s  # wall time from submission, shared with other slides' tiles
        done = self.finisher.submit(finish_slide, self.client, slide.plan, slide.totals, False)
        done.add_done_callback(lambda f, n=name: self.events.put(("finished", n, f)))

    def finished(self, name: str, slide: InFlight, future: Future) -> None:
        """``slide``'s finishing ended: its summary row, or its failure."""
        try:
            bundle = future.result()
            metrics = slide_metrics(bundle)
        except Exception as exc:  # noqa: BLE001
            self.drop(name, exc)
        else:
            self.active.pop(name).lock.release()
            self.record(slide.entry, status="ok", error="", reused=False, bundle=str(bundle), **metrics)

    def drop(self, name: str, exc: BaseException) -> None:
        """Record a slide's failure after its tiles were submitted; its partial bundle goes."""
        slide = self.active.pop(name)
        self.client.cancel(slide.futures)
        shutil.rmtree(slide.plan.partial, ignore_errors=True)
        slide.lock.release()
        self.fail(slide.entry, exc)


def tissue_workflows(entries: list[dict], workflow: str | None) -> dict[str, Workflow]:
    """tissue (the sheet's spelling, ``""`` without one) → the validated workflow of its first slide
    whose workflow loads: where the cohort report reads that tissue's endpoints."""
    out: dict[str, Workflow] = {}
    for entry in entries:
        tissue = str(entry.get("tissue") or "")
        if tissue not in out:
            try:
                out[tissue] = load_workflow(workflow_for(entry, workflow))
            except HistoError:  # that slide failed for it and is in the summary; a later slide may name another
                continue
    return out
