"""Training (histo.train.outlines), its data (histo.train.data) and H&E augmentation (histo.train.augment).

Training tests use a tiny network (U-Net depth 2, 8 filters) on small synthetic disk images made
here, so each runs in seconds on 2 cores; one test fits two real MoNuSeg *training* tiles (never
monuseg/test) when ../shared is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histo.errors import HistoError
from histo.train.augment import (
    HEAugmenter,
    brightness_contrast,
    flip_rot,
    hsv_jitter,
    rgb_to_od,
    scale_jitter,
    stain_jitter,
)
from histo.train.config import TrainConfig
from histo.train.data import pairs_from_folders, patch_grid, read_pair, resample_pair, split_by_image
from histo.train.outlines import train

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MONUSEG_TRAIN = SHARED / "data" / "monuseg" / "train"

TINY = dict(unet_n_depth=2, unet_n_filter_base=8, n_rays=16, patch_size=64, batch_size=2)


# ---------------------------------------------------------------- synthetic data
def disk_scene(size=96, n=14, seed=0):
    """RGB H&E-like image with dark-purple disks on pink, and its instance mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    m = np.zeros((size, size), np.uint16)
    k = 1
    for _ in range(n * 4):
        if k > n:
            break
        cy, cx = rng.uniform(6, size - 6, 2)
        r = rng.uniform(3.5, 6.5)
        d = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        if (m[d] > 0).any():
            continue
        m[d] = k
        k += 1
    img = np.empty((size, size, 3), np.float32)
    img[:] = (236, 200, 222)
    img[m > 0] = (85, 55, 140)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), m


def write_disks(root: Path, n=6, size=96, seed=0):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, m = disk_scene(size, seed=seed + i)
        tifffile.imwrite(root / "images" / f"{i:04d}.tif", img)
        tifffile.imwrite(root / "masks" / f"{i:04d}.tif", m)
    return pairs_from_folders(root / "images", root / "masks")


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    return write_disks(tmp_path_factory.mktemp("disks"))


# ---------------------------------------------------------------- data reading
def test_pairs_from_folders_matches_by_stem_and_reports_problems(tmp_path):
    pairs = write_disks(tmp_path / "d", n=3)
    assert [p[0].stem for p in pairs] == ["0000", "0001", "0002"]
    assert all(i.stem == m.stem for i, m in pairs)

    # image without a mask: the error names the image
    img, m = disk_scene(seed=9)
    tifffile.imwrite(tmp_path / "d" / "images" / "extra.tif", img)
    with pytest.raises(HistoError) as e:
        pairs_from_folders(tmp_path / "d" / "images", tmp_path / "d" / "masks")
    assert "extra.tif" in str(e.value) and "no mask" in str(e.value)

    # mask of another size: the error names the mask
    tifffile.imwrite(tmp_path / "d" / "masks" / "extra.tif", m[:50])
    with pytest.raises(HistoError) as e:
        pairs_from_folders(tmp_path / "d" / "images", tmp_path / "d" / "masks")
    assert "extra.tif" in str(e.value) and "differs" in str(e.value)

    with pytest.raises(HistoError):
        pairs_from_folders(tmp_path / "nope", tmp_path / "d" / "masks")


def test_read_pair_and_resample_keep_alignment(tmp_path):
    (pair,) = write_disks(tmp_path, n=1, size=120)
    img, m = read_pair(*pair)
    assert img.dtype == np.uint8 and img.shape == (120, 120, 3) and m.dtype == np.int32
    ri, rm = resample_pair(img, m, image_mpp=0.25, model_mpp=0.5)
    assert ri.shape == (60, 60, 3) and rm.shape == (60, 60)
    assert set(np.unique(rm)) <= set(np.unique(m))  # nearest: no new labels
    # dark pixels (nuclei) coincide with the labels after resampling
    dark = ri.mean(-1) < 160
    assert ((rm > 0) == dark).mean() > 0.95
    # no-op when the pixel size already matches
    same_i, same_m = resample_pair(img, m, 0.5, 0.5)
    assert same_i is img and same_m is m


def test_split_by_image_is_seeded_and_disjoint():
    tr, va = split_by_image(20, 0.15, seed=3)
    assert (tr, va) == split_by_image(20, 0.15, seed=3)
    assert not set(tr) & set(va) and sorted(tr + va) == list(range(20))
    assert len(va) == 3
    assert split_by_image(2, 0.15, 0)[1] and split_by_image(2, 0.15, 0)[0]
    with pytest.raises(HistoError):
        split_by_image(1, 0.15, 0)


def test_patch_grid_covers_each_image_with_the_same_crops_every_time():
    rng = np.random.default_rng(0)
    images = [rng.random((100, 70, 3)), rng.random((64, 64, 3))]
    masks = [np.arange(100 * 70).reshape(100, 70), np.ones((64, 64), int)]
    xs, ys = patch_grid(images, masks, 64)
    assert len(xs) == len(ys) == 2 * 2 + 1  # rows at 0 and 36, columns at 0 and 6; one crop of the 64²
    assert all(x.shape == (64, 64, 3) and y.shape == (64, 64) for x, y in zip(xs, ys))
    seen = np.zeros(100 * 70, bool)
    seen[np.concatenate([y.ravel() for y in ys[:4]])] = True
    assert seen.all()  # every pixel of the first image is in some crop
    np.testing.assert_array_equal(xs[3], images[0][36:, 6:])  # the last crop is aligned to the far corner
    again = patch_grid(images, masks, 64)
    assert all(np.array_equal(a, b) for a, b in zip(xs + ys, again[0] + again[1]))
    with pytest.raises(HistoError, match="smaller than the patch"):
        patch_grid(images, masks, 80)
    few = patch_grid(images, masks, 64, max_patches=3)[0]  # memory stays bounded: evenly spaced crops
    assert [next(i for i, x in enumerate(xs) if np.array_equal(f, x)) for f in few] == [0, 2, 4]


# ---------------------------------------------------------------- augmentation
def _mask_image(y):
    """An image whose colour encodes the mask: purple inside objects, pink outside."""
    x = np.empty(y.shape + (3,), np.float32)
    x[:] = (0.92, 0.78, 0.87)
    x[y > 0] = (0.33, 0.22, 0.55)
    return x


def test_flip_rot_applies_the_same_symmetry_to_image_and_mask():
    _, y = disk_scene(64, seed=1)
    y = y.astype(np.int32)
    y[:5, :20] = 99  # break the symmetry
    x = _mask_image(y)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(40):
        xa, ya = flip_rot(x, y, rng)
        assert xa.shape == x.shape and ya.shape == y.shape
        assert np.array_equal(xa[..., 0] < 0.6, ya > 0)
        seen.add(ya.tobytes())
    assert len(seen) == 8  # all symmetries of the square occur


def test_stain_jitter_changes_colours_in_od_space_within_bounds_and_not_the_mask():
    img, y = disk_scene(64, seed=2)
    x = img.astype(np.float32) / 255
    rng = np.random.default_rng(1)
    aug = HEAugmenter(seed=0, p_stain=1.0, p_intensity=0, p_scale=0, p_noise=0)
    xa, ya = aug(x, y.copy())
    # geometric part may flip/rotate: undo by comparing as sets of symmetries
    assert any(np.array_equal(np.rot90(ya, k)[:, ::f], y) for k in range(4) for f in (1, -1))

    from skimage.color import hed_from_rgb

    for _ in range(10):
        xs, (alpha, beta) = stain_jitter(x, rng, scale=0.2, shift=0.05)
        assert xs.shape == x.shape and xs.dtype == np.float32
        assert 0 <= xs.min() and xs.max() <= 1
        assert np.all((alpha[:2] >= 0.8) & (alpha[:2] <= 1.2)) and np.all(np.abs(beta[:2]) <= 0.05)
        assert np.abs(xs - x).max() > 1e-3  # colours changed
        # in OD space the hematoxylin concentration of nuclei moves by at most the jitter range
        h0 = (rgb_to_od(x) @ hed_from_rgb)[..., 0][y > 0]
        h1 = (rgb_to_od(xs) @ hed_from_rgb)[..., 0][y > 0]
        ratio = np.median(h1) / np.median(h0)
        assert 0.7 < ratio < 1.3
    # haze: only more hematoxylin, on every stained pixel, so nuclei stand out less from the rest
    for _ in range(10):
        xs, (alpha, beta) = stain_jitter(x, rng, scale=0.0, shift=0.0, haze=0.25)
        assert 0 <= beta[0] <= 0.25 and beta[1] == 0 and np.all(alpha == 1)
        h1 = (rgb_to_od(xs) @ hed_from_rgb)[..., 0]
        h0 = (rgb_to_od(x) @ hed_from_rgb)[..., 0]
        stained = h0 > 0.02
        np.testing.assert_allclose((h1 - h0)[stained], beta[0], atol=0.02)


def test_hsv_jitter_turns_hue_and_scales_saturation_within_bounds_and_keeps_value():
    from skimage.color import rgb2hsv

    img, y = disk_scene(64, seed=2)
    x = img.astype(np.float32) / 255
    h0 = rgb2hsv(x)
    coloured = h0[..., 1] > 0.2
    rng = np.random.default_rng(3)
    for _ in range(10):
        xs = hsv_jitter(x, rng, hue=0.04, saturation=0.6)
        assert xs.shape == x.shape and xs.dtype == np.float32 and 0 <= xs.min() and xs.max() <= 1
        h1 = rgb2hsv(xs)
        np.testing.assert_allclose(h1[..., 2], h0[..., 2], atol=1e-5)  # brightness (V) untouched
        turn = (h1[..., 0] - h0[..., 0] + 0.5) % 1.0 - 0.5
        assert np.abs(turn[coloured]).max() <= 0.04 + 1e-4 and np.ptp(turn[coloured]) < 1e-3  # one turn
        ratio = h1[..., 1][coloured] / h0[..., 1][coloured]
        assert 0.4 - 1e-4 <= np.median(ratio) <= 1.6 + 1e-4
    np.testing.assert_allclose(hsv_jitter(x, rng, hue=0.0, saturation=0.0), x, atol=1e-5)
    # off by default: an augmenter without HSV settings never calls it
    aug = HEAugmenter(seed=0, p_stain=0, p_intensity=0, p_scale=0, p_noise=0, p_hsv=1.0)
    xa, ya = aug(x, y)
    assert any(np.array_equal(np.rot90(x, k)[:, ::f], xa) for k in range(4) for f in (1, -1))


def test_scale_jitter_keeps_alignment_and_marks_unknown_border_as_ignore():
    _, y = disk_scene(96, seed=3)
    y = y.astype(np.int32)
    x = _mask_image(y)
    for s in (0.9, 0.95, 1.05, 1.1):
        xs, ys = scale_jitter(x, y, s)
        assert xs.shape == x.shape and ys.shape == y.shape
        known = ys >= 0
        agree = (xs[..., 0] < 0.6)[known] == (ys > 0)[known]
        assert agree.mean() > 0.97
        assert set(np.unique(ys[ys > 0])) <= set(np.unique(y[y > 0]))
        if s < 1:
            assert (ys == -1).any() and not (ys[20:-20, 20:-20] == -1).any()
        else:
            assert not (ys == -1).any()


def test_he_augmenter_is_reproducible_and_keeps_shapes():
    img, y = disk_scene(64, seed=4)
    x = img.astype(np.float32) / 255
    a1 = [HEAugmenter(seed=5)(x, y) for _ in range(1)][0]
    a2 = HEAugmenter(seed=5)(x, y)
    assert np.array_equal(a1[0], a2[0]) and np.array_equal(a1[1], a2[1])
    aug = HEAugmenter(seed=6)
    for _ in range(20):
        xa, ya = aug(x, y)
        assert xa.shape == x.shape and ya.shape == y.shape and xa.dtype == np.float32
        assert 0 <= xa.min() and xa.max() <= 1
    xb = brightness_contrast(x, np.random.default_rng(0))
    assert xb.shape == x.shape and 0 <= xb.min() and xb.max() <= 1
    assert json.dumps(aug.as_dict())


# ---------------------------------------------------------------- training
def test_train_config_is_frozen_typed_and_round_trips_through_json():
    c = TrainConfig(mpp=0.5, grid=[2, 2], nms_threshs=[0.3], reduce_lr={"factor": 0.5})
    assert c.grid == (2, 2) and c.nms_threshs == (0.3,) and TrainConfig().epochs == 50
    with pytest.raises(AttributeError):
        c.epochs = 3
    d = json.loads(json.dumps(c.as_dict()))
    assert d["grid"] == [2, 2] and TrainConfig.from_dict(d) == c
    assert c.with_settings(epochs=3).epochs == 3 and c.with_settings() is c
    with pytest.raises(TypeError, match="unknown training setting.*epoch_count"):
        c.with_settings(epoch_count=3)
    with pytest.raises(TypeError, match="unknown training setting"):
        train([], [], "x", image_mpp=0.5, epoch_count=3)


def test_start_run_resumes_a_state_written_before_train_config(tmp_path):
    """``train_state.json`` as every version wrote it (no config in it) still resumes; a new rate and
    stain scale are recorded as changes, more epochs extend the run, and the split is kept."""
    from histo.train.outlines import start_run

    images = [tmp_path / f"{i}.tif" for i in range(4)]
    state = {
        "images": [str(p) for p in images],
        "split": {"train": [0, 1, 3], "val": [2]},
        "epochs_total": 20,
        "steps_per_epoch": 100,
        "epochs_done": 7,
        "best_val_loss": 0.9,
        "learning_rate": 1e-4,
        "wall_time_s": 3600.0,
        "complete": False,
        "seed": 0,
        "stain_scale": 0.4,
        "init_weights": "histo-he",
        "history": [{"epoch": 7, "loss": 1.0}],
    }
    (tmp_path / "train_state.json").write_text(json.dumps(state))
    (tmp_path / "weights_last.h5").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    config = TrainConfig(
        epochs=25, steps_per_epoch=5, val_fraction=0.5, learning_rate=5e-5, stain_scale=0.3, scale_range=0.3
    )
    got, resuming = start_run(tmp_path, images, config)
    assert resuming and got["split"] == state["split"] and got["steps_per_epoch"] == 100
    assert got["epochs_total"] == 25 and got["learning_rate"] == 5e-5 and got["best_val_loss"] is None
    assert got["learning_rate_changes"] == [{"epoch": 7, "from": 1e-4, "to": 5e-5}]
    assert got["stain_scale_changes"] == [{"epoch": 7, "from": 0.4, "to": 0.3}]
    # a state saved before the zoom jitter was recorded had HEAugmenter's default
    assert got["scale_range_changes"] == [{"epoch": 7, "from": 0.1, "to": 0.3}] and got["scale_range"] == 0.3
    # its validation loss was on random patches: the new grid's is not comparable with its best
    assert got["validation_patches_changes"][0]["epoch"] == 7 and got["validation_patches"].startswith("grid")
    with pytest.raises(HistoError, match="training images differ"):
        start_run(tmp_path, images[:3], config)


@pytest.fixture(scope="module")
def trained(disks, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny-he"
    ims, mks = zip(*disks)
    folder, model = train(
        list(ims),
        list(mks),
        out,
        mpp=0.5,
        image_mpp=0.5,
        epochs=2,
        steps_per_epoch=4,
        val_fraction=0.34,
        seed=0,
        return_model=True,
        verbose=0,
        sources=[{"name": "synthetic disks (test)", "licence": "CC0-1.0", "n_images": len(ims)}],
        command="pytest",
        **TINY,
    )
    return folder, model, disks


def test_train_writes_a_complete_small_model_folder(trained):
    folder, model, disks = trained
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "thresholds.json", "weights_best.h5", "card.json", "MODEL.md"} <= names
    assert not names & {"weights_last.h5", "weights_now.h5", "train_state.json", "logs"}
    card = json.loads((folder / "card.json").read_text())
    for key in (
        "name",
        "mpp",
        "normalize",
        "n_rays",
        "grid",
        "architecture",
        "training",
        "validation",
        "thresholds",
        "max_nucleus_um",
    ):
        assert key in card, key
    assert card["mpp"] == 0.5 and card["normalize"] == {"kind": "fixed", "low": 0, "high": 255}
    assert card["n_rays"] == 16 and card["grid"] == [2, 2]
    assert card["architecture"]["unet_n_depth"] == 2 and card["architecture"]["unet_n_filter_base"] == 8
    t = card["training"]
    assert t["epochs"] == 2 and t["steps_per_epoch"] == 4 and t["patch_size"] == 64
    assert t["n_train"] + t["n_val"] == len(disks) and t["n_val"] == 2
    assert t["sources"][0]["licence"] == "CC0-1.0" and t["wall_time_s"] > 0
    for k in ("f1", "precision", "recall"):
        assert 0.0 <= card["validation"][k] <= 1.0
    assert card["validation"]["thresh"] == 0.5
    config = TrainConfig.from_dict(t["config"])  # the settings, saved with the model
    assert config == TrainConfig(
        mpp=0.5,
        epochs=2,
        steps_per_epoch=4,
        val_fraction=0.34,
        learning_rate=3e-4,
        reduce_lr=config.reduce_lr,  # as StarDist saved it (it adds "verbose")
        stain_scale=0.2,
        scale_range=0.1,  # HEAugmenter's, as the run recorded it
        hue_shift=0.0,
        saturation_range=0.0,
        haze=0.0,
        **TINY,
    )
    assert {"factor": 0.5, "patience": 5, "min_delta": 0}.items() <= config.reduce_lr.items()
    thr = json.loads((folder / "thresholds.json").read_text())
    assert thr["prob"] == pytest.approx(card["thresholds"]["prob"])
    md = (folder / "MODEL.md").read_text()
    assert "0.5 µm/px" in md and "CC0-1.0" in md and "F1" in md


def test_model_folder_round_trips(trained):
    from histo.segment.models import load_model, normalize_image, resolve_model

    folder, model, disks = trained
    spec = resolve_model(str(folder))
    assert spec.mpp == 0.5 and spec.normalize["kind"] == "fixed" and spec.n_channels == 3
    loaded = load_model(spec)
    img, _ = read_pair(*disks[0])
    x = normalize_image(img, spec)
    assert np.allclose(x, img / 255.0, atol=1e-6)
    p1, d1 = model.predict(x)
    p2, d2 = loaded.predict(x)
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    np.testing.assert_allclose(d1, d2, atol=1e-4)
    l1 = model.predict_instances(x, verbose=False)[0]
    l2 = loaded.predict_instances(x, verbose=False)[0]
    assert np.array_equal(l1, l2)


def test_existing_model_is_not_overwritten(trained):
    folder, _, disks = trained
    ims, mks = zip(*disks)
    with pytest.raises(HistoError, match="already holds a trained model"):
        train(list(ims), list(mks), folder, mpp=0.5, image_mpp=0.5, epochs=1, steps_per_epoch=1, verbose=0, **TINY)


def test_a_run_started_from_a_model_takes_its_architecture_and_weights(trained, tmp_path):
    """``init_weights`` (``histo train --init``): the new run builds the saved model's network (rays,
    depth, widths, grid), whatever the call's own settings say, and starts from its weights (held here
    by a learning rate of 0); a folder that is not a model is refused by name."""
    from stardist.models import StarDist2D

    folder, model, disks = trained
    ims, mks = zip(*disks)
    kw = dict(mpp=0.5, image_mpp=0.5, epochs=1, steps_per_epoch=1, val_fraction=0.34, verbose=0, optimize=False)
    out = tmp_path / "from-tiny"
    train(list(ims), list(mks), out, init_weights=folder, learning_rate=0.0, patch_size=64, batch_size=2, **kw)
    conf = json.loads((out / "config.json").read_text())
    saved = json.loads((folder / "config.json").read_text())
    for key in ("n_rays", "grid", "unet_n_depth", "unet_n_filter_base", "net_conv_after_unet"):
        assert conf[key] == saved[key], key
    assert conf["unet_n_filter_base"] == TINY["unet_n_filter_base"] != TrainConfig.unet_n_filter_base
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["init_weights"] == folder.name
    started = StarDist2D(None, name=out.name, basedir=str(out.parent))
    for a, b in zip(started.keras_model.get_weights(), model.keras_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(HistoError, match="cannot start from this model"):
        train(list(ims), list(mks), tmp_path / "from-nothing", init_weights=tmp_path, patch_size=64, **kw)


def test_training_resumes_from_the_saved_epoch(disks, tmp_path):
    import keras

    class Stop(Exception):
        pass

    class StopAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == 1:
                raise Stop()

    ims, mks = zip(*disks)
    out = tmp_path / "resumable"
    kw = dict(
        mpp=0.5,
        image_mpp=0.5,
        epochs=3,
        steps_per_epoch=2,
        val_fraction=0.34,
        seed=1,
        verbose=0,
        optimize=False,
        **TINY,
    )
    with pytest.raises(Stop):
        train(list(ims), list(mks), out, extra_callbacks=[StopAfter()], **kw)
    state = json.loads((out / "train_state.json").read_text())
    assert state["epochs_done"] == 1 and not state["complete"] and (out / "weights_last.h5").exists()
    assert (out / "weights_best.h5").exists()

    # a lower rate and stronger stain jitter from epoch 2
    train(
        list(ims),
        list(mks),
        out,
        finalize=False,
        learning_rate=1e-4,
        stain_scale=0.4,
        scale_range=0.25,
        saturation_range=0.5,
        **kw,
    )
    state = json.loads((out / "train_state.json").read_text())
    assert state["epochs_done"] == 3 and state["complete"]
    # Adam went on from where the first call stopped: 3 epochs x 2 steps, not a fresh optimizer's 2 x 2
    assert state["optimizer_restored"] is True
    with np.load(out / "optimizer_last.npz") as adam:
        assert int(adam["arr_0"]) == 6
    assert state["learning_rate"] == pytest.approx(1e-4)
    assert state["learning_rate_changes"] == [{"epoch": 1, "from": pytest.approx(3e-4), "to": 1e-4}]
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["epochs"] == 3 and card["training"]["learning_rate_changes"][0]["to"] == 1e-4
    assert state["stain_scale_changes"] == [{"epoch": 1, "from": 0.2, "to": 0.4}]
    assert card["training"]["augmentation"]["stain_scale"] == 0.4
    assert state["scale_range_changes"] == [{"epoch": 1, "from": 0.1, "to": 0.25}]
    assert card["training"]["augmentation"]["scale_range"] == 0.25 and card["training"]["config"]["scale_range"] == 0.1
    # the card's config is the run's start; the changes are listed beside it
    assert card["training"]["config"]["learning_rate"] == pytest.approx(3e-4)
    assert card["training"]["config"]["stain_scale"] == 0.2 and card["training"]["config"]["epochs"] == 3
    assert "set to 0.0001 after epoch 1" in (out / "MODEL.md").read_text()
    assert "±0.2 until epoch 1" in (out / "MODEL.md").read_text()
    assert state["saturation_range_changes"] == [{"epoch": 1, "from": 0.0, "to": 0.5}]
    assert "HSV saturation ×(1 ± 0.5) (0.0 until epoch 1)" in (out / "MODEL.md").read_text()
    # the split did not change between the two calls
    assert card["training"]["n_val"] == len(state["split"]["val"])


def test_a_resumed_run_is_validated_on_the_same_patches(disks, tmp_path):
    """With the weights held (learning rate 0 after the resume), the first resumed epoch's validation
    loss equals the last one before it: the validation data did not change with the resume, so the
    saved best loss still means the same thing."""
    ims, mks = zip(*disks)
    out = tmp_path / "same-validation"
    kw = dict(mpp=0.5, image_mpp=0.5, steps_per_epoch=2, val_fraction=0.34, seed=2, verbose=0, optimize=False, **TINY)
    train(list(ims), list(mks), out, epochs=1, finalize=False, **kw)
    train(list(ims), list(mks), out, epochs=2, finalize=False, learning_rate=0.0, **kw)
    state = json.loads((out / "train_state.json").read_text())
    before, after = (h["val_loss"] for h in state["history"])
    assert after == pytest.approx(before, rel=1e-4)
    assert "validation_patches_changes" not in state


@pytest.mark.skipif(
    not MONUSEG_TRAIN.is_dir(),
    reason=f"real data not available: {MONUSEG_TRAIN} is absent (the shared data folder sits next to the repository)",
)
def test_histo_train_cli_on_real_tiles_with_per_image_pixel_sizes(tmp_path):
    """`histo train` on two real MoNuSeg tiles (a 40x one at its XML pixel size and a 20x outlier,
    from a CSV) plus a folder of generated tiles: both resampled to the model's 0.5 µm/px, both
    sources and licences in the card; ``--filter-base`` and ``--conv-after`` set the network's widths."""
    from histo.cli import main
    from histo_sample import write_training_set

    real = tmp_path / "real"
    names = ["TCGA-21-5784-01Z-00-DX1", "TCGA-HE-7128-01Z-00-DX1"]
    for sub in ("images", "masks"):
        (real / sub).mkdir(parents=True)
        for n in names:  # links, not copies
            (real / sub / f"{n}.tif").symlink_to(MONUSEG_TRAIN / sub / f"{n}.tif")
    (tmp_path / "mpp.csv").write_text(f"image,mpp\n{names[0]}.tif,0.2527\n{names[1]},0.5005\n")
    write_training_set(tmp_path / "gen", 2, tile_px=256, seed=0, mpp=0.5, per_scene=1)
    out = tmp_path / "he-tiny"
    rc = main(
        [
            "train",
            str(real / "images"),
            str(real / "masks"),
            "--image-mpp",
            str(tmp_path / "mpp.csv"),
            "--licence",
            "CC BY-NC-SA 4.0",
            "--data",
            str(tmp_path / "gen" / "images"),
            str(tmp_path / "gen" / "masks"),
            "0.5",
            "BSD-3-Clause",
            "--draws",
            "1",
            "3",
            "--out",
            str(out),
            "--mpp",
            "0.5",
            "--epochs",
            "1",
            "--steps",
            "2",
            "--patch",
            "128",
            "--batch",
            "2",
            "--val-fraction",
            "0.25",
            "--note",
            "smoke test",
            "--filter-base",
            "8",
            "--conv-after",
            "16",
        ]
    )
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())  # StarDist's defaults: 32 and 128
    assert (saved["unet_n_filter_base"], saved["net_conv_after_unet"]) == (8, 16)
    card = json.loads((out / "card.json").read_text())
    assert card["mpp"] == 0.5 and card["training"]["image_mpp"] == [0.2527, 0.5, 0.5005]
    assert [s["licence"] for s in card["training"]["sources"]] == ["CC BY-NC-SA 4.0", "BSD-3-Clause"]
    assert card["training"]["n_train"] == 3 and card["training"]["n_val"] == 1
    assert [s["draws"] for s in card["training"]["sources"]] == [1, 3]
    val = set(card["training"]["val_images"])  # the generated tiles drawn 3 times, the real ones once
    n_gen_train = sum(1 for p in (tmp_path / "gen" / "images").iterdir() if p.name not in val)
    assert card["training"]["n_train_drawn"] == 3 * n_gen_train + (3 - n_gen_train)
    assert card["max_nucleus_um_observed"] > 3 and card["notes"] == ["smoke test"]
    assert "histo train" in card["training"]["command"] and not (out / "train_state.json").exists()
    md = (out / "MODEL.md").read_text()
    assert "CC BY-NC-SA 4.0" in md and "BSD-3-Clause" in md
    from histo.segment.models import resolve_model

    spec = resolve_model(str(out))
    assert spec.mpp == 0.5 and spec.thresholds == card["thresholds"]

    (tmp_path / "mpp.csv").write_text(f"image,mpp\n{names[0]},0.2527\n")  # one image without a size
    assert (
        main(
            [
                "train",
                str(real / "images"),
                str(real / "masks"),
                "--image-mpp",
                str(tmp_path / "mpp.csv"),
                "--out",
                str(tmp_path / "x"),
                "--epochs",
                "1",
            ]
        )
        == 2
    )
