"""histo evaluate: F1 / PQ / AJI against StarDist's own matching, masks, GeoJSON, bundles."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import shared_path
from skimage.draw import disk

from histo.cli import main
from histo.train.evaluate import score


def disks(shape=(300, 300), n=40, seed=0, r=(5, 11)) -> np.ndarray:
    """A label image of ``n`` random disks (later ones on top)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        rr, cc = disk(tuple(rng.uniform(0, shape[0], 2)), rng.uniform(*r), shape=shape)
        out[rr, cc] = i
    return out


def perturbed(truth: np.ndarray, seed=1) -> np.ndarray:
    """Shifted by a pixel, a few nuclei dropped, a few false ones added."""
    rng = np.random.default_rng(seed)
    pred = np.roll(truth, 1, axis=1)
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, rng.choice(ids, 5, replace=False))] = 0
    extra = disks(truth.shape, 6, seed + 10)
    pred[(extra > 0) & (pred == 0)] = extra[(extra > 0) & (pred == 0)] + 1000
    return pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_stardist_matching(seed):
    from stardist.matching import matching

    truth = disks(seed=seed)
    pred = perturbed(truth, seed)
    ours = score(truth, pred)
    ref = matching(truth, pred, thresh=0.5)
    assert (ours["tp"], ours["fp"], ours["fn"]) == (ref.tp, ref.fp, ref.fn)
    assert ours["f1"] == pytest.approx(ref.f1)
    assert ours["pq"] == pytest.approx(ref.panoptic_quality)
    assert ours["mean_iou"] == pytest.approx(ref.mean_matched_score)
    assert 0 < ours["aji"] < ours["f1"]


def test_aji_by_hand():
    """Truth: A (100 px), B (100 px). Prediction: P over all of A and half of B, Q a stray 50 px.
    Both A and B pick P (best IoU); AJI = (100 + 50) / ((150) + (200) + 50) = 150 / 400."""
    truth = np.zeros((10, 40), np.int32)
    truth[:, 0:10], truth[:, 10:20] = 1, 2
    pred = np.zeros_like(truth)
    pred[:, 0:15], pred[:5, 30:40] = 7, 9
    s = score(truth, pred)
    assert s["aji"] == pytest.approx(150 / 400)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 1) and s["mean_iou"] == pytest.approx(100 / 150)


def test_empty_images():
    z = np.zeros((20, 20), np.int32)
    assert score(z, z)["f1"] == 1.0 and score(z, z)["aji"] == 1.0
    assert score(disks((20, 20), 1), z)["recall"] == 0.0


def _write(folder, masks: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in masks.items():
        tifffile.imwrite(folder / f"{name}.tif", m.astype(np.uint16))


def test_cli_mask_against_itself_and_with_nuclei_removed(tmp_path, capsys):
    truths = {f"tile{i}": disks(seed=i) for i in range(3)}
    _write(tmp_path / "truth", truths)
    assert (
        main(["evaluate", str(tmp_path / "truth"), "--pred", str(tmp_path / "truth"), "--out", str(tmp_path / "a")])
        == 0
    )
    table = pd.read_csv(tmp_path / "a" / "scores.csv")
    assert list(table["image"]) == ["tile0", "tile1", "tile2", "pooled"]
    assert (table[["f1", "pq", "aji", "precision", "recall"]] == 1).all().all()
    assert "pooled" in capsys.readouterr().out

    removed = {}
    for name, m in truths.items():  # drop every 4th nucleus that is visible
        ids = np.unique(m)[1:]
        removed[name] = np.where(np.isin(m, ids[::4]), 0, m)
    _write(tmp_path / "pred", removed)
    main(["evaluate", str(tmp_path / "truth"), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "b")])
    pooled = pd.read_csv(tmp_path / "b" / "scores.csv").set_index("image").loc["pooled"]
    n_true = sum(len(np.unique(m)) - 1 for m in truths.values())
    n_removed = sum(len(np.unique(m)[1:][::4]) for m in truths.values())
    assert pooled["n_true"] == n_true and pooled["fn"] == n_removed and pooled["fp"] == 0
    assert pooled["recall"] == pytest.approx(1 - n_removed / n_true) and pooled["precision"] == 1


def test_geojson_outlines_and_bad_files(tmp_path, capsys):
    truth = disks(seed=4)
    _write(tmp_path / "truth", {"t": truth})
    (tmp_path / "pred").mkdir()
    feats = []
    for i in np.unique(truth)[1:]:
        from skimage.measure import find_contours

        c = max(find_contours(np.pad(truth == i, 1).astype(float), 0.5), key=len)[:, ::-1] - 1 + 0.5
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [c.tolist() + [c[0].tolist()]]},
                "properties": {"objectType": "detection"},
            }
        )
    feats.append(
        {
            "type": "Feature",
            "properties": {},  # a self-intersecting bow tie: mended, still counted
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[250, 250], [270, 270], [270, 250], [250, 270], [250, 250]]],
            },
        }
    )
    (tmp_path / "pred" / "t.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    main(["evaluate", str(tmp_path / "truth"), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "o")])
    row = pd.read_csv(tmp_path / "o" / "scores.csv").iloc[0]
    assert row["tp"] == row["n_true"] and row["fp"] == 1 and row["mean_iou"] > 0.85

    (tmp_path / "pred" / "t.geojson").write_text("{not json")
    assert (
        main(["evaluate", str(tmp_path / "truth"), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err
    assert "t.geojson" in err and "not a GeoJSON file" in err


def test_real_expert_outlines_agree_with_their_masks():
    """The MoNuSeg test GeoJSON (hand-drawn, some self-intersecting) drawn by histo against the
    masks rasterised from the same XML: every nucleus found; IoU < 1 only from the half-pixel
    convention (QuPath pixel corners vs the masks' pixel centres)."""
    folder = shared_path("data", "monuseg", "test")
    from histo.train.evaluate import read_truth

    name = "TCGA-2Z-A9J9-01A-01-TS1"
    mask = read_truth(folder / "masks" / f"{name}.tif")
    drawn = read_truth(folder / "polygons" / f"{name}.geojson", mask.shape)
    s = score(mask, drawn)
    assert s["f1"] > 0.99 and s["mean_iou"] > 0.85


def test_plain_crops_through_histo_run_then_scored(client, tmp_path):
    """Annotated crops without a pyramid (TIFF, pixel size given) go through the whole pipeline
    and are scored from their bundles: the shipped model finds the generated nuclei."""
    from histo.train.evaluate import evaluate, run_images
    from histo_sample import write_training_set

    write_training_set(tmp_path / "set", 2, tile_px=640, seed=5, mpp=0.25, per_scene=1)
    errors = run_images(
        tmp_path / "set" / "masks",
        tmp_path / "set" / "images",
        tmp_path / "bundles",
        0.25,
        client=client,
        show_progress=False,
    )
    assert errors == {}
    run = json.loads((tmp_path / "bundles" / "0000" / "run.json").read_text())
    assert run["input"]["levels"] == 1 and run["tissue"]["pieces"] >= 1
    table = evaluate(tmp_path / "set" / "masks", bundles_dir=tmp_path / "bundles").set_index("image")
    assert len(table) == 3 and table.loc["pooled", "f1"] >= 0.85, table


def test_scores_recorded_in_a_model_card(tmp_path):
    import shutil
    from pathlib import Path

    from histo.train.evaluate import evaluate, record_in_card

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "models" / "histo-he" / "card.json", model / "card.json")
    _write(tmp_path / "truth", {"a": disks(seed=1)})
    _write(tmp_path / "pred", {"a": perturbed(disks(seed=1))})
    table = evaluate(tmp_path / "truth", pred_dir=tmp_path / "pred")
    before = [e["dataset"] for e in json.loads((model / "card.json").read_text()).get("evaluations", [])]
    for _ in range(2):  # recording the same dataset again replaces it; the others stay
        record_in_card(model, "disks", table, command="histo evaluate …")
    card = json.loads((model / "card.json").read_text())
    assert [e["dataset"] for e in card["evaluations"]] == before + ["disks"]
    assert card["evaluations"][-1]["pooled"]["f1"] == pytest.approx(table.iloc[-1]["f1"])
    md = (model / "MODEL.md").read_text()
    assert "| disks | 1 |" in md and f"{table.iloc[-1]['pq']:.3f}" in md
