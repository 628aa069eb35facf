"""Learned nucleus classes: patches, the classifier in the tile task, training, typed evaluation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, histo, shared_path

from histo.errors import HistoError
from histo.segment.nucleus_classes import (
    CLASSES,
    CLASSIFIER_FILE,
    PATCH_MPP,
    PATCH_PX,
    class_of,
    nucleus_patches,
    standardise_stain,
    tile_patches,
    to_patch_scale,
)
from histo.train.evaluate import class_counts, class_f1


def disc(cy: float, cx: float, r: float, n: int = 32) -> np.ndarray:
    a = 2 * np.pi * np.arange(n) / n
    return np.stack([cy + r * np.sin(a), cx + r * np.cos(a)])


def test_tile_patches_centre_the_nucleus_and_draw_its_outline():
    img = np.full((200, 300, 3), 255, np.uint8)
    yy, xx = np.mgrid[:200, :300]
    img[(yy - 80) ** 2 + (xx - 150) ** 2 <= 12**2] = (60, 30, 120)  # a dark nucleus of radius 12 px at 0.25 µm/px
    coord = disc(80, 150, 12)[None]
    [(p,)] = tile_patches(img, coord, np.array([[80, 150]]), 0.25)
    assert p.shape == (1, PATCH_PX, PATCH_PX, 4) and p.dtype == np.float32
    mask = p[0, ..., 3] > 0
    r_um = 12 * 0.25
    assert mask.sum() == pytest.approx(np.pi * (r_um / PATCH_MPP) ** 2, rel=0.25)
    cy, cx = np.argwhere(mask).mean(axis=0)
    assert abs(cy - (PATCH_PX - 1) / 2) <= 1 and abs(cx - (PATCH_PX - 1) / 2) <= 1
    assert p[0, ..., :3][mask].mean() < 0.5 < p[0, ..., :3][~mask].mean()  # dark inside, glass around


def test_patches_beyond_the_image_edge_are_glass():
    small = np.zeros((100, 100, 3), np.float32)
    p = nucleus_patches(small, [disc(0, 0, 2).T], np.array([[0.0, 0.0]]))
    assert p[0, 0, 0, :3].tolist() == [1.0, 1.0, 1.0] and p[0, -1, -1, :3].tolist() == [0.0, 0.0, 0.0]


def test_patches_are_the_windows_and_outlines_drawn_one_by_one():
    """All nuclei at once give each nucleus's own window and ``skimage.draw.polygon``'s pixels for its
    outline, whatever the ring's length and wherever it lies (partly beyond the image too)."""
    from skimage.draw import polygon as draw_polygon

    rng = np.random.default_rng(3)
    small = rng.random((90, 110, 3)).astype(np.float32)
    rings, size = [], 30
    for _ in range(60):
        centre, r = rng.uniform(-3, (93, 113)), rng.uniform(1.5, 14)
        a = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 40)))
        rings.append(np.stack([centre[0] + r * np.sin(a), centre[1] + r * np.cos(a)], axis=1))
    centres = np.array([ring.mean(axis=0) for ring in rings])
    p = nucleus_patches(small, rings, centres, size)
    padded = np.pad(small, ((size, size), (size, size), (0, 0)), constant_values=1.0)
    for i, ((r, c), ring) in enumerate(zip(centres, rings)):
        r0, c0 = round(r) - size // 2, round(c) - size // 2
        np.testing.assert_array_equal(p[i, ..., :3], padded[r0 + size : r0 + 2 * size, c0 + size : c0 + 2 * size])
        mask = np.zeros((size, size), bool)
        mask[draw_polygon(ring[:, 0] - r0, ring[:, 1] - c0, (size, size))] = True
        np.testing.assert_array_equal(p[i, ..., 3] > 0, mask)


@pytest.mark.parametrize("mpp", [0.25, 0.275, 0.6])
def test_patch_scale_is_skimage_resize(mpp):
    """The patch-scale image is ``skimage.transform.resize``'s (anti-aliased when shrinking), to the bit."""
    from skimage.transform import resize

    img = np.random.default_rng(4).integers(0, 256, (101, 87, 3), dtype=np.uint8)
    x = img.astype(np.float32) / 255.0
    f = mpp / PATCH_MPP
    shape = (round(101 * f), round(87 * f), 3)
    expected = resize(x, shape, order=1, anti_aliasing=f < 1, preserve_range=True).astype(np.float32)
    np.testing.assert_array_equal(to_patch_scale(img, mpp), expected)


def test_stain_standardisation_leaves_glass_alone():
    glass = np.full((100, 100, 3), 0.97, np.float32)
    assert standardise_stain(glass) is glass


def test_stain_standardisation_brings_a_restained_tile_back():
    """A real CoNSeP tile and the same tile with pale haematoxylin and strong eosin (the accuracy table's
    strong stain change) differ much less after both are standardised."""
    from skimage.io import imread

    from histo.train.augment import recolour

    tile = shared_path("data", "consep", "train", "images", "train_1.png")
    x = to_patch_scale(imread(tile)[..., :3], 0.275)
    restained = recolour(x, np.array([0.6, 1.4, 1.0], np.float32))
    before = np.abs(restained - x).mean()
    after = np.abs(standardise_stain(restained) - standardise_stain(x)).mean()
    assert after < 0.8 * before, (before, after)


def test_unscaled_standardisation_maps_colours_and_keeps_stain_amounts():
    """``scale=False`` maps a tile's stain colours to the reference as the full standardisation does,
    but a tile with 40 % less haematoxylin stays paler: the darkness a lymphocyte is known by is kept."""
    from skimage.io import imread

    from histo.train.augment import recolour, rgb_to_od

    tile = shared_path("data", "consep", "train", "images", "train_1.png")
    x = to_patch_scale(imread(tile)[..., :3], 0.275)
    pale = recolour(x, np.array([0.6, 1.0, 1.0], np.float32))
    h_ref = np.array([0.5626, 0.7201, 0.4062]) / np.linalg.norm([0.5626, 0.7201, 0.4062])  # Macenko's H vector

    def h_amount(img):
        return float(np.percentile(rgb_to_od(img) @ h_ref, 99))

    scaled = h_amount(standardise_stain(pale)) / h_amount(standardise_stain(x))
    unscaled = h_amount(standardise_stain(pale, scale=False)) / h_amount(standardise_stain(x, scale=False))
    assert scaled == pytest.approx(1.0, abs=0.1) and unscaled == pytest.approx(0.6, abs=0.12), (scaled, unscaled)
    assert to_patch_scale(imread(tile)[..., :3], 0.275, "macenko-unscaled") == pytest.approx(
        standardise_stain(x, scale=False)
    )


def test_class_names_map_to_histo_classes():
    assert class_of("Inflammatory") == "lymphocyte" and class_of("spindle") == "stromal"
    with pytest.raises(ValueError, match="unknown nucleus type 'necrosis'"):
        class_of("necrosis")


def test_class_counts_follow_the_fields_definition():
    """A nucleus counts for class c only when matched and both say c; unmatched calls are false positives."""
    true_cls = np.array(["", "lymphocyte", "lymphocyte", "stromal", "lymphocyte"], object)
    pred_cls = np.array(["", "lymphocyte", "stromal", "stromal", "lymphocyte"], object)
    # true 1↔pred 1 (both lymphocyte), true 2↔pred 2 (lymphocyte called stromal), true 3↔pred 3;
    # true 4 missed, pred 4 spare
    c = class_counts(true_cls, pred_cls, np.array([1, 2, 3]), np.array([1, 2, 3]), ["lymphocyte", "stromal"])
    assert (c["tp_lymphocyte"], c["fp_lymphocyte"], c["fn_lymphocyte"]) == (1, 1, 2)
    assert (c["tp_stromal"], c["fp_stromal"], c["fn_stromal"]) == (1, 1, 0)
    assert class_f1(c, ["lymphocyte"])["f1_lymphocyte"] == pytest.approx(2 / 5)


@pytest.fixture(scope="module")
def classified_model(tmp_path_factory):
    """The shipped nucleus model with an (untrained, seeded) classifier: the plumbing, not the science."""
    import keras

    from histo.segment.nucleus_classes import network

    folder = tmp_path_factory.mktemp("models") / "histo-he-classes"
    shutil.copytree(ROOT / "models" / "histo-he", folder)
    keras.utils.set_random_seed(0)
    network().save(folder / CLASSIFIER_FILE)
    card = json.loads((folder / "card.json").read_text())
    card["nucleus_classes"] = {"classes": list(CLASSES), "file": CLASSIFIER_FILE}
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def test_pipeline_writes_learned_classes(classified_model, generated, client, tmp_path):
    from histo.run.pipeline import run_slide

    slide = generated("lymph-node", 1024, 5, 0.5)
    bundle = run_slide(
        slide, tmp_path, "lymph-node-he", model=str(classified_model), client=client, show_progress=False
    )
    cells = pq.read_table(bundle / "cells.parquet").to_pandas()
    assert len(cells) > 100
    assert set(cells["nucleus_class"]) <= set(CLASSES)
    assert cells["nucleus_class_prob"].between(1 / len(CLASSES), 1).all()
    run = json.loads((bundle / "run.json").read_text())
    typing = run["cell_types"]
    assert typing["method"] == "learned"
    # epithelial calls stay epithelial; the other learned classes may only give way to "large"
    called = cells["cell_type"].astype(str)
    assert (called[cells.nucleus_class == "epithelial"] == "epithelial").all()
    moved = called != cells["nucleus_class"]
    assert (called[moved] == "large").all()


def test_train_classes_on_two_real_tiles(tmp_path):
    """``histo train-classes`` on two CoNSeP training tiles (1 epoch, a half-width net): a classifier and
    its card section."""
    consep = shared_path("data", "consep", "train")
    for kind, ext in (("images", ".png"), ("masks", ".tif")):
        (tmp_path / kind).mkdir()
        for tile in ("train_1", "train_3"):
            (tmp_path / kind / f"{tile}{ext}").symlink_to(consep / kind / f"{tile}{ext}")
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "histo-he", model)

    def train(*extra):
        small = ("--epochs", "1", "--val-fraction", "0.5", "--filters", "8", "16", "32", "64", *extra)
        images, masks, types = tmp_path / "images", tmp_path / "masks", consep / "types.csv"
        return histo(
            "train-classes", images, masks, types, "--model", model, "--image-mpp", "0.275", *small, timeout=900
        )

    done = train()
    assert done.returncode == 0, done.stderr[-2000:]
    card = json.loads((model / "card.json").read_text())["nucleus_classes"]
    assert (model / CLASSIFIER_FILE).is_file() and card["classes"] == list(CLASSES)
    import keras

    net = keras.models.load_model(model / CLASSIFIER_FILE, compile=False)
    widths = [layer.filters for layer in net.layers if hasattr(layer, "filters")]
    assert card["filters"] == [8, 16, 32, 64] == widths[::2]
    assert card["n_train_nuclei"] > 300 and card["n_val_nuclei"] > 300 and card["epochs_run"] == 1
    assert 0 <= card["validation"]["accuracy"] <= 1 and "lymphocyte" in card["validation"]
    from skimage.io import imread

    truth = pd.read_csv(consep / "types.csv")
    assert card["n_train_nuclei"] + card["n_val_nuclei"] == truth["tile"].isin(["train_1", "train_3"]).sum()

    def add(stain):
        return train("--inference-turns", "1", "--stain", stain, "--add")

    done = add("macenko-unscaled")
    assert done.returncode == 0, done.stderr[-2000:]
    both = json.loads((model / "card.json").read_text())["nucleus_classes"]
    files = [m["file"] for m in both["members"]]
    assert files == [CLASSIFIER_FILE, "nucleus_classes_unscaled.keras"] and (model / files[1]).is_file()
    assert [m["stain"] for m in both["members"]] == ["macenko", "macenko-unscaled"]
    assert both["validation"]["n"] == card["n_val_nuclei"] and both["members"][0]["validation"] == card["validation"]
    card_md = (model / "MODEL.md").read_text()
    assert "`nucleus_classes_unscaled.keras`: Inference: the upright patch alone." in card_md
    assert "Together, on the same validation tiles" in card_md
    again = add("macenko-unscaled")
    assert again.returncode == 2 and "already has a member" in again.stderr

    from histo.segment.nucleus_classes import load_classifier, predict_classes, tile_class_probs

    graphs = load_classifier(str(model))
    assert [(g.stain, g.turns) for g in graphs] == [("macenko", 4), ("macenko-unscaled", 1)]
    img = imread(consep / "images" / "train_1.png")[..., :3]
    coord, points = disc(300, 400, 14)[None], np.array([[300.0, 400.0]])
    mean = tile_class_probs(graphs, img, coord, points, 0.275, alone=1.01)  # every member for every nucleus
    one = [
        predict_classes(g, next(tile_patches(img, coord, points, 0.275, ((g.patch_px, g.stain),)))[0], turns=t)
        for g, t in zip(graphs, (4, 1))
    ]
    assert mean == pytest.approx((one[0] + one[1]) / 2, abs=1e-5) and not np.allclose(one[0], one[1])


def test_members_after_the_first_are_skipped_only_where_they_cannot_change_the_class():
    """The shipped classifier on a real CoNSeP tile's expert nuclei: the nuclei that the first member is
    sure of (≥ ALONE) skip the second member, and every class is the one the mean of both gives."""
    from skimage.io import imread
    from skimage.measure import regionprops

    from histo.segment.models import resolve_model
    from histo.segment.nucleus_classes import ALONE, load_classifier, predict_classes, tile_class_probs

    consep = shared_path("data", "consep", "train")
    graphs = load_classifier(str(resolve_model("histo-he").path))
    assert len(graphs) > 1, "the shipped classifier has several members"
    img = imread(consep / "images" / "train_6.png")[..., :3]  # a validation tile of the classifier
    nuclei = regionprops(imread(consep / "masks" / "train_6.tif"))
    points = np.array([r.centroid for r in nuclei])
    coord = np.stack([disc(*c, max(2.0, np.sqrt(r.area / np.pi))) for c, r in zip(points, nuclei)])
    gated = tile_class_probs(graphs, img, coord, points, 0.275)
    full = tile_class_probs(graphs, img, coord, points, 0.275, alone=1.01)
    view = ((graphs[0].patch_px, graphs[0].stain),)
    first = np.concatenate(
        [predict_classes(graphs[0], p, turns=graphs[0].turns) for (p,) in tile_patches(img, coord, points, 0.275, view)]
    )
    alone = first.max(axis=1) >= ALONE
    assert 0.1 < alone.mean() < 0.9
    assert gated[alone] == pytest.approx(first[alone], abs=1e-6)
    assert gated[~alone] == pytest.approx(full[~alone], abs=1e-6)
    assert (gated.argmax(axis=1) == full.argmax(axis=1)).all()


def test_types_from_class_masks_take_the_majority_class_under_each_nucleus(tmp_path):
    """Class masks painted from CoNSeP's own type table, with each nucleus's rim painted a wrong class
    (less than half of it), give that type table back; values not named are left out."""
    import tifffile
    from scipy import ndimage as ndi

    from histo.train.classes import parse_class_values, read_types, types_from_class_masks

    consep = shared_path("data", "consep", "train")
    mask_path = consep / "masks" / "train_1.tif"
    labels = tifffile.imread(mask_path).astype(np.int64)
    truth = read_types(consep / "types.csv").query("tile == 'train_1'")
    code = {"epithelial": 1, "lymphocyte": 2, "stromal": 3, "other": 4}
    lut = np.zeros(labels.max() + 1, np.uint8)
    lut[truth["label"].to_numpy()] = truth["class"].map(code).to_numpy()
    painted = lut[labels]
    rim = (labels > 0) & ~ndi.grey_erosion(labels, size=3).astype(bool)
    area, rim_px = np.bincount(labels.ravel()), np.bincount(labels[rim], minlength=labels.max() + 1)
    wrong = rim & (rim_px * 2 < area)[labels]
    painted[wrong] = painted[wrong] % 4 + 1
    (tmp_path / "classes").mkdir()
    tifffile.imwrite(tmp_path / "classes" / "train_1.tif", painted)
    assert wrong.sum() > 1000  # the rims do disagree with the nuclei under them

    values = parse_class_values(["1=epithelial", "2=inflammatory", "3=spindle", "4=other"])
    got = types_from_class_masks([(consep / "images" / "train_1.png", mask_path)], tmp_path / "classes", values)
    assert got.equals(truth.sort_values("label", ignore_index=True))
    without_other = types_from_class_masks(
        [(None, mask_path)], tmp_path / "classes", parse_class_values(["1=epithelial", "2=lymphocyte", "3=stromal"])
    )
    assert set(without_other["class"]) == {"epithelial", "lymphocyte", "stromal"}
    assert len(without_other) == (truth["class"] != "other").sum()
    with pytest.raises(HistoError, match="--class-values '2:lymphocyte'"):
        parse_class_values(["2:lymphocyte"])
    with pytest.raises(HistoError, match="no class mask named train_1"):
        types_from_class_masks([(None, mask_path)], tmp_path, values)


def test_train_classes_cli_names_a_class_mask_folder_without_values(tmp_path):
    consep = shared_path("data", "consep", "train")
    done = histo(
        "train-classes",
        consep / "images",
        consep / "masks",
        tmp_path,
        "--model",
        ROOT / "models" / "histo-he",
        "--image-mpp",
        "0.275",
    )
    assert done.returncode == 2 and str(tmp_path) in done.stderr and "--class-values" in done.stderr
