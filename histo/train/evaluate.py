"""Score nucleus segmentations against expert outlines, the way the field reports them.

Per image and pooled over images: nuclei matched one-to-one at IoU ≥ ``thresh`` (0.5) give TP, FP,
FN, precision, recall and F1 (= detection quality DQ); ``mean_iou`` is the mean IoU of matched pairs
(segmentation quality SQ); panoptic quality PQ = DQ · SQ = ΣIoU(TP) / (TP + FP/2 + FN/2) (Kirillov
et al. 2019; Graham et al. 2019); the aggregated Jaccard index AJI (Kumar et al. 2017) pairs every
true nucleus with the predicted one it overlaps best (IoU) and adds unpaired predictions to the union.
Pooled scores sum the counts (TP, FP, FN, ΣIoU, AJI intersections and unions) over the images.

Truth is an instance mask (TIFF/PNG, 0 = background) or a QuPath GeoJSON of nucleus polygons in
pixel coordinates; predictions are label images, or histo bundles whose ``cells.parquet`` polygons
are drawn at the image's own pixel grid.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
from scipy.optimize import linear_sum_assignment

from histo.errors import HistoError
from histo.io.files import read_json, write_json
from histo.segment.labels import rasterise
from histo.train.data import list_images, pixel_sizes, read_array

MASK_EXT = (".tif", ".tiff", ".png")
GEOJSON_EXT = (".geojson", ".json")
COUNTS = ("n_true", "n_pred", "tp", "fp", "fn", "sum_iou", "aji_intersection", "aji_union")


def overlaps(truth: np.ndarray, pred: np.ndarray):
    """Areas of every true and predicted label (px, indexed by label) and the overlapping pairs:
    (true ids, predicted ids, intersection px)."""
    t = truth.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    t_area, p_area = np.bincount(t), np.bincount(p)
    both = (t > 0) & (p > 0)
    base = np.int64(p_area.size)
    pairs, inter = np.unique(t[both] * base + p[both], return_counts=True)
    return t_area, p_area, pairs // base, pairs % base, inter


def score(truth: np.ndarray, pred: np.ndarray, thresh: float = 0.5, pairs: list | None = None) -> dict:
    """The counts (``COUNTS``) and scores of one image; ``truth`` and ``pred`` are label images of
    the same shape (0 = background). ``pairs``, a list, receives the matched (true id, predicted id)
    arrays."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    t_area, p_area, ti, pi, inter = overlaps(truth, pred)
    true_ids, pred_ids = np.flatnonzero(t_area[1:]) + 1, np.flatnonzero(p_area[1:]) + 1
    iou = inter / (t_area[ti] + p_area[pi] - inter)

    # one-to-one matching among pairs with IoU ≥ thresh, maximising the summed IoU
    cand = iou >= thresh
    tp, sum_iou = 0, 0.0
    if cand.any():
        rows, r_idx = np.unique(ti[cand], return_inverse=True)
        cols, c_idx = np.unique(pi[cand], return_inverse=True)
        m = np.zeros((rows.size, cols.size))
        m[r_idx, c_idx] = iou[cand]
        r, c = linear_sum_assignment(m, maximize=True)
        hit = m[r, c] >= thresh
        tp, sum_iou = int(hit.sum()), float(m[r, c][hit].sum())
        if pairs is not None:
            pairs += [rows[r[hit]], cols[c[hit]]]

    # AJI: each true nucleus with its best-IoU prediction (which may serve several), + unused predictions
    order = np.lexsort((-iou, ti))
    first = np.ones(order.size, bool)
    first[1:] = ti[order][1:] != ti[order][:-1]
    best = order[first]
    aji_i = float(inter[best].sum())
    aji_u = float((t_area[ti[best]] + p_area[pi[best]] - inter[best]).sum())
    aji_u += float(t_area[np.setdiff1d(true_ids, ti[best])].sum())
    aji_u += float(p_area[np.setdiff1d(pred_ids, pi[best])].sum())

    counts = dict(
        n_true=int(true_ids.size),
        n_pred=int(pred_ids.size),
        tp=tp,
        fp=int(pred_ids.size) - tp,
        fn=int(true_ids.size) - tp,
        sum_iou=sum_iou,
        aji_intersection=aji_i,
        aji_union=aji_u,
    )
    return counts | scores_from_counts(counts)


def scores_from_counts(c: dict) -> dict:
    """precision, recall, f1, mean_iou, pq and aji from summed ``COUNTS``."""
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    return dict(
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        mean_iou=c["sum_iou"] / tp if tp else 0.0,
        pq=c["sum_iou"] / (tp + fp / 2 + fn / 2) if tp + fp + fn else 1.0,
        aji=c["aji_intersection"] / c["aji_union"] if c["aji_union"] else 1.0,
    )


def pooled(rows: pd.DataFrame) -> dict:
    """Scores over all images: counts summed, then the scores of the sums (per class too, when typed)."""
    counts = {k: rows[k].sum() for k in COUNTS}
    classes = [c[3:] for c in rows.columns if c.startswith("tp_")]
    typed = {f"{k}_{c}": rows[f"{k}_{c}"].sum() for c in classes for k in ("tp", "fp", "fn")}
    return counts | scores_from_counts(counts) | typed | class_f1(typed, classes)


# ---------------------------------------------------------------- nucleus classes
def class_counts(
    true_cls: np.ndarray, pred_cls: np.ndarray, true_ids: np.ndarray, pred_ids: np.ndarray, classes: list[str]
) -> dict:
    """Per class c, the field's typed detection counts (HoVer-Net's F_c): ``tp_c`` = matched pairs
    where both say c, ``fp_c`` = nuclei called c without a matched true c, ``fn_c`` = true c
    without a matched call of c. ``true_cls`` / ``pred_cls``: the class of every true / predicted
    nucleus; ``true_ids`` / ``pred_ids``: the matched pairs as indices into them."""
    mt, mp = true_cls[true_ids], pred_cls[pred_ids]
    out = {}
    for c in classes:
        tp = int(np.sum((mt == c) & (mp == c)))
        out |= {f"tp_{c}": tp, f"fp_{c}": int(np.sum(pred_cls == c)) - tp, f"fn_{c}": int(np.sum(true_cls == c)) - tp}
    return out


def class_f1(counts: dict, classes: list[str]) -> dict:
    """``f1_<class>`` from :func:`class_counts` (summed over images)."""
    f1 = {}
    for c in classes:
        tp, fp, fn = counts[f"tp_{c}"], counts[f"fp_{c}"], counts[f"fn_{c}"]
        f1[f"f1_{c}"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return f1


def bundle_classes(bundle: str | Path) -> np.ndarray:
    """The called class of every nucleus of a bundle, in ``cells.parquet`` order (= the labels of
    :func:`bundle_labels` minus 1): ``cell_type``, with ``large`` counted as ``other`` (the typed
    datasets' classes have no "large")."""
    types = pq.read_table(Path(bundle) / "cells.parquet", columns=["cell_type"]).column("cell_type").to_pandas()
    return types.astype(str).replace({"large": "other"}).to_numpy()


# ---------------------------------------------------------------- reading truth and predictions
def truth_files(folder: str | Path) -> dict[str, Path]:
    """Truth files (masks or GeoJSON) in ``folder`` by stem; HistoError if there are none or two
    share a stem."""
    out = list_images(Path(folder), MASK_EXT + GEOJSON_EXT)
    if not out:
        raise HistoError(folder, "no truth files (instance masks .tif/.png or QuPath .geojson) in this folder")
    return out


def read_truth(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Instance labels from a mask file, or drawn from a GeoJSON of polygons in pixel coordinates
    (every object type; later polygons on top) at ``shape`` (H, W) px."""
    path = Path(path)
    if path.suffix.lower() in GEOJSON_EXT:
        from histo.io.annotations import import_annotations

        if shape is None:
            raise HistoError(path, "a GeoJSON truth needs the image size: give the images or bundles")
        geoms = import_annotations(path, mpp=1.0, object_types=None, repair=True).geometry.to_numpy()
        parts, index = shapely.get_parts(geoms, return_index=True)  # a mended outline may be in pieces
        return rasterise(parts, index + 1, 1.0, (0, 0), shape)
    mask = read_array(path)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise HistoError(path, f"a truth mask must be a 2-D integer label image, got {mask.dtype} {mask.shape}")
    return mask.astype(np.int64)


def bundle_labels(bundle: str | Path) -> tuple[np.ndarray, float]:
    """The nuclei of a complete histo bundle drawn on its slide's level-0 pixel grid, and that
    grid's µm/px."""
    bundle = Path(bundle)
    try:
        run = read_json(bundle / "run.json")
    except FileNotFoundError:
        raise HistoError(bundle, "not a complete histo bundle (no run.json)") from None
    mpp, shape = float(run["input"]["mpp"]), tuple(run["input"]["shape_px"])
    table = pq.read_table(bundle / "cells.parquet", columns=["polygon"])
    polys = shapely.from_wkb(table.column("polygon").to_numpy(zero_copy_only=False))
    return rasterise(polys, np.arange(1, len(polys) + 1), mpp, (0, 0), shape), mpp


def evaluate(
    truth_dir: str | Path,
    bundles_dir: str | Path | None = None,
    pred_dir: str | Path | None = None,
    thresh: float = 0.5,
    errors: dict[str, str] | None = None,
    types: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Score predicted nuclei against expert outlines: one row per truth file plus a ``pooled`` row.

    Parameters
    ----------
    truth_dir : str or Path
        Instance masks (.tif/.png, 0 = background) or QuPath GeoJSON outlines in pixels, one per image.
    bundles_dir, pred_dir : str or Path, optional
        The predictions, exactly one of them: histo bundles ``bundles_dir/<stem>/`` (nuclei drawn on
        the slide's level-0 pixel grid), or files ``pred_dir/<stem>.*`` (label masks or GeoJSON
        outlines in pixels).
    thresh : float
        IoU at which a true and a predicted nucleus match (0.5: the field's convention).
    errors : dict of str to str, optional
        ``{stem: message}`` of images that could not be run (e.g. from :func:`run_images`); they
        become rows with that ``error``.
    types : pandas.DataFrame, optional
        With bundles only: a class per true nucleus (``tile``, ``label``, ``class``; from
        ``histo.train.classes.read_types``). Adds per class ``tp_/fp_/fn_/f1_<class>``
        (:func:`class_counts`) and ``table.attrs["confusion"]``, the matched nuclei's true × called
        classes.

    Returns
    -------
    pandas.DataFrame
        One row per truth file (``image`` = its stem): counts ``n_true``, ``n_pred``, ``tp``, ``fp``,
        ``fn`` (nuclei), ``sum_iou``, ``aji_intersection``/``aji_union`` (px), and the scores
        ``precision``, ``recall``, ``f1``, ``mean_iou``, ``pq``, ``aji`` (fractions, 0–1); a truth
        file without a usable prediction is a row with its ``error``. The last row, ``pooled``, scores
        the counts summed over the scored images.

    Raises
    ------
    ValueError
        Both or neither of ``bundles_dir`` and ``pred_dir``, or ``types`` without bundles.
    HistoError
        No truth files, or no image could be scored.
    """
    if (bundles_dir is None) == (pred_dir is None):
        raise ValueError("give exactly one of bundles_dir and pred_dir")
    if types is not None and bundles_dir is None:
        raise ValueError("typed scores need bundles (their cell types)")
    classes = sorted(set(types["class"])) if types is not None else []
    confusion = []
    preds = truth_files(pred_dir) if pred_dir is not None else {}
    rows = []
    for stem, path in truth_files(truth_dir).items():
        if errors and stem in errors:
            rows.append({"image": stem, "error": errors[stem]})
            continue
        try:
            if bundles_dir is not None:
                pred = bundle_labels(Path(bundles_dir) / stem)[0]
                truth = read_truth(path, pred.shape)
            elif stem not in preds:
                raise HistoError(Path(pred_dir) / stem, "no prediction with the truth file's name")
            elif path.suffix.lower() in MASK_EXT:
                truth = read_truth(path)
                pred = read_truth(preds[stem], truth.shape)
            else:
                pred = read_truth(preds[stem])
                truth = read_truth(path, pred.shape)
            if truth.shape != pred.shape:
                raise HistoError(
                    path,
                    f"truth is {truth.shape[1]}×{truth.shape[0]} px but the prediction is "
                    f"{pred.shape[1]}×{pred.shape[0]} px",
                )
            pairs: list = []
            row = {"image": stem} | score(truth, pred, thresh, pairs)
            if types is not None:
                own = types[types["tile"] == stem]
                labels, ok = own["label"].to_numpy(), own["label"].to_numpy() <= truth.max()
                true_cls = np.full(int(truth.max()) + 1, "", dtype=object)  # "": no type, counts for no class
                true_cls[labels[ok]] = own["class"].to_numpy()[ok]
                true_cls[np.setdiff1d(np.arange(true_cls.size), np.unique(truth))] = ""  # labels not in the mask
                pred_cls = np.concatenate([[""], bundle_classes(Path(bundles_dir) / stem)])
                ti, pi = pairs if pairs else (np.zeros(0, int), np.zeros(0, int))
                row |= class_counts(true_cls, pred_cls, ti, pi, classes)
                row |= class_f1(row, classes)
                confusion.append(
                    pd.crosstab(pd.Series(true_cls[ti], name="true"), pd.Series(pred_cls[pi], name="called"))
                )
            rows.append(row)
        except HistoError as exc:
            rows.append({"image": stem, "error": str(exc)})
    table = with_pooled(pd.DataFrame(rows))
    if confusion:
        table.attrs["confusion"] = pd.concat(confusion).groupby(level=0).sum().fillna(0).astype(int)
    return table


def with_pooled(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (one row per image) with a last row ``image = "pooled"`` over the scored images."""
    scored = table.dropna(subset=["tp"]) if "tp" in table else table.iloc[:0]
    if scored.empty:
        raise HistoError(None, "no image could be scored: " + "; ".join(table.get("error", pd.Series()).dropna()))
    out = pd.concat([table, pd.DataFrame([{"image": "pooled"} | pooled(scored)])], ignore_index=True)
    ints = ["n_true", "n_pred", "tp", "fp", "fn"]
    out[ints] = out[ints].astype("Int64")
    return out


def format_table(table: pd.DataFrame) -> str:
    """The scores as a fixed-width text table (3 decimals), per-class F1 and the confusion matrix if typed."""
    cols = ["image", "n_true", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1", "mean_iou", "pq", "aji"]
    cols += [c for c in table.columns if c.startswith("f1_")]
    cols += ["error"] if "error" in table and table["error"].notna().any() else []
    text = table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="")
    if "confusion" in table.attrs:
        text += "\n\nmatched nuclei, true (rows) × called (columns):\n" + table.attrs["confusion"].to_string()
    return text


def run_images(
    truth_dir: str | Path,
    images_dir: str | Path,
    bundles_dir: str | Path,
    image_mpp,
    model: str | None = None,
    workflow: str | None = None,
    client=None,
    show_progress: bool = True,
) -> dict[str, str]:
    """``histo run`` on the image of every truth file (same stem in ``images_dir``) into
    ``bundles_dir``; ``image_mpp`` is one µm/px for all or a CSV (``histo.train.data.pixel_sizes``).
    Returns {stem: error} for the images that could not be run (the others are bundles)."""
    from histo.run.cluster import dask_client
    from histo.run.pipeline import run_slide

    images = list_images(Path(images_dir), MASK_EXT + (".jpg", ".jpeg"))  # histo run reads JPEG too
    mpp_of = pixel_sizes(image_mpp, images_dir)
    errors = {}
    with dask_client(None, None) if client is None else nullcontext(client) as cl:
        for stem in truth_files(truth_dir):
            try:
                if stem not in images:
                    raise HistoError(Path(images_dir) / stem, "no image with the truth file's name")
                mpp = mpp_of(stem)
                if mpp is None:
                    raise HistoError(images[stem], f"no pixel size for this image in {image_mpp}")
                run_slide(
                    images[stem],
                    bundles_dir,
                    workflow=workflow,
                    model=model,
                    mpp=mpp,
                    client=cl,
                    show_progress=show_progress,
                )
            except HistoError as exc:
                errors[stem] = str(exc)
    return errors


def record_in_card(folder: str | Path, dataset: str, table: pd.DataFrame, command: str | None = None) -> Path:
    """Add (or replace, by ``dataset`` name) a pooled evaluation in a model folder's ``card.json``
    and rewrite its ``MODEL.md``."""
    from histo.train.model_card import write_model_md

    folder = Path(folder)
    card_path = folder / "card.json"
    if not card_path.is_file():
        raise HistoError(folder, "not a histo model folder (no card.json) to record the evaluation in")
    card = read_json(card_path)
    scored = table[(table["image"] != "pooled") & table["tp"].notna()]
    pooled = table.set_index("image").loc["pooled"]
    entry = {
        "dataset": dataset,
        "n_images": len(scored),
        "command": command,
        "pooled": {k: float(pooled[k]) for k in ("precision", "recall", "f1", "mean_iou", "pq", "aji")}
        | {k: round(float(pooled[k]), 4) for k in table.columns if k.startswith("f1_")}
        | {"n_true": int(pooled["n_true"]), "n_pred": int(pooled["n_pred"])},
        "f1_per_image": {r.image: round(float(r.f1), 4) for r in scored.itertuples()},
    }
    card["evaluations"] = [e for e in card.get("evaluations", []) if e["dataset"] != dataset] + [entry]
    write_json(card_path, card)
    return write_model_md(folder)
