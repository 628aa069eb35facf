"""Model lookup, loading and normalisation (histo.segment.models)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import histo.segment.models as hm
from histo.errors import HistoError, ModelError
from histo.segment.models import (
    ModelSpec,
    compute_percentiles,
    load_model,
    normalize_image,
    resolve_model,
)

REPO = Path(__file__).resolve().parents[2]


def _write_untrained_model(folder: Path, card: dict | None = None, thresholds=None) -> Path:
    """A tiny valid StarDist model folder (random weights): config.json + weights_best.h5."""
    from stardist.models import Config2D, StarDist2D

    conf = Config2D(
        n_rays=8,
        grid=(2, 2),
        n_channel_in=3,
        unet_n_depth=1,
        unet_n_filter_base=4,
        train_tensorboard=False,
        use_gpu=False,
    )
    model = StarDist2D(conf, name=folder.name, basedir=str(folder.parent))
    model.keras_model.save_weights(str(folder / "weights_best.h5"))
    if thresholds is not None:
        (folder / "thresholds.json").write_text(json.dumps(thresholds))
    if card is not None:
        (folder / "card.json").write_text(json.dumps(card))
    return folder


CARD = {
    "name": "mine",
    "mpp": 0.5,
    "normalize": {"kind": "fixed", "low": 0, "high": 255},
    "max_nucleus_um": 22.0,
    "thresholds": {"prob": 0.6, "nms": 0.3},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("modelroot")
    return _write_untrained_model(root / "mine", card=CARD, thresholds={"prob": 0.55, "nms": 0.35})


@pytest.fixture
def no_shipped(monkeypatch, tmp_path):
    """Shipped-models folder replaced by an empty one; HISTO_MODEL_DIR unset."""
    d = tmp_path / "shipped"
    d.mkdir()
    monkeypatch.setattr(hm, "shipped_models_dir", lambda: d)
    monkeypatch.delenv("HISTO_MODEL_DIR", raising=False)
    return d


def test_resolve_folder_reads_card_config_and_thresholds(model_dir):
    spec = resolve_model(str(model_dir))
    assert spec.name == "mine" and spec.path == model_dir.resolve() and spec.source == "folder"
    assert spec.mpp == 0.5 and spec.normalize == {"kind": "fixed", "low": 0, "high": 255}
    assert spec.n_channels == 3 and spec.n_rays == 8 and spec.grid == (2, 2)
    assert spec.max_nucleus_um == 22.0
    assert spec.thresholds == {"prob": 0.55, "nms": 0.35}  # thresholds.json wins over the card
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert {spec: 1}[pickle.loads(pickle.dumps(spec))] == 1  # usable as a cache key
    assert json.dumps(spec.to_dict())


def test_resolve_shipped_name(model_dir, no_shipped):
    import shutil

    shutil.copytree(model_dir, no_shipped / "histo-he")
    spec = resolve_model(None, stain="he")
    assert spec.name == "histo-he" and spec.source == "shipped"
    assert resolve_model("histo-he").path == (no_shipped / "histo-he").resolve()


def test_default_he_model_missing_says_so(no_shipped):
    with pytest.raises(ModelError, match="shipped model 'histo-he' is missing"):
        resolve_model(None, stain="he")
    with pytest.raises(ModelError, match="no default model"):
        resolve_model(None, stain="ihc-dab")


def test_resolve_from_histo_model_dir(model_dir, no_shipped, monkeypatch, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(model_dir, cache / "cached-he")
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("cached-he")
    monkeypatch.setenv("HISTO_MODEL_DIR", str(cache))
    spec = resolve_model("cached-he")
    assert spec.source == "env" and spec.path == (cache / "cached-he").resolve()

    # a registry model copied there (no card) gets the registry's scale and normalisation
    reg = cache / "2D_versatile_he"
    reg.mkdir()
    for f in ("config.json", "weights_best.h5"):
        shutil.copy(model_dir / f, reg / f)
    spec = resolve_model("2D_versatile_he")
    assert spec.source == "env" and spec.mpp == 0.25
    assert spec.normalize == {"kind": "percentile", "low": 1, "high": 99.8}
    assert spec.thresholds == {"prob": 0.5, "nms": 0.4}  # StarDist's defaults without thresholds.json


def test_registry_offline_gives_clear_error(no_shipped, monkeypatch, tmp_path):
    import urllib.error
    import urllib.request

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ModelError) as e:
        resolve_model("2D_versatile_fluo")
    assert "could not download pretrained weights (no network?)" in str(e.value)
    assert "$HISTO_MODEL_DIR" in str(e.value) and "--model FOLDER" in str(e.value)
    assert e.value.path == "2D_versatile_fluo"
    with pytest.raises(ModelError):
        resolve_model(None, stain="fluo")


def test_registry_download_with_a_wrong_checksum_leaves_nothing(no_shipped, monkeypatch, tmp_path):
    import io
    import urllib.request

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not the model"))
    with pytest.raises(ModelError, match="does not match StarDist's checksum"):
        resolve_model("2D_versatile_fluo")
    cache = tmp_path / "keras" / "models" / "StarDist2D" / "2D_versatile_fluo"
    assert list(cache.iterdir()) == []  # neither the zip nor its temporary file


def test_registry_model_found_in_keras_cache(model_dir, no_shipped, monkeypatch, tmp_path):
    import shutil

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cached = tmp_path / "keras" / "models" / "StarDist2D" / "2D_versatile_he" / "2D_versatile_he"
    cached.mkdir(parents=True)
    for f in ("config.json", "weights_best.h5"):
        shutil.copy(model_dir / f, cached / f)
    (cached / "thresholds.json").write_text(json.dumps({"prob": 0.69, "nms": 0.3}))
    spec = resolve_model("2D_versatile_he")
    assert spec.source == "registry" and spec.name == "2D_versatile_he" and spec.path == cached.resolve()
    assert spec.mpp == 0.25 and spec.normalize["kind"] == "percentile"
    assert spec.thresholds == {"prob": 0.69, "nms": 0.3}


def test_bad_folders_are_model_errors(model_dir, tmp_path):
    import shutil

    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nothing-here"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="missing config.json, weights_best.h5"):
        resolve_model(str(empty))
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "card.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelError, match="no 'mpp'"):
        resolve_model(str(bad))
    (bad / "card.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        resolve_model(str(bad))
    assert issubclass(ModelError, HistoError)


def test_resolve_model_does_not_import_tensorflow(model_dir):
    code = (
        "import sys, histo.segment.models as m; m.resolve_model(sys.argv[1]); "
        "print('tensorflow' in sys.modules, 'stardist' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_load_model_is_weights_only_and_uses_spec_thresholds(model_dir):
    spec = resolve_model(str(model_dir))
    model = load_model(spec)
    assert model.basedir is None  # read-only: nothing written back to the folder
    assert model.thresholds.prob == pytest.approx(0.55) and model.thresholds.nms == pytest.approx(0.35)
    x = normalize_image(np.full((64, 64, 3), 200, np.uint8), spec)
    prob, dist = model.predict(x)
    assert prob.shape == (32, 32) and dist.shape == (32, 32, 8)
    again = load_model(spec).predict(x)[0]
    np.testing.assert_allclose(prob, again, atol=1e-6)


def test_load_model_errors(tmp_path):
    spec = ModelSpec(name="ghost", path=tmp_path / "ghost", mpp=0.5)
    with pytest.raises(ModelError, match="not a StarDist model folder"):
        load_model(spec)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"n_rays": 8}))
    (broken / "weights_best.h5").write_bytes(b"not hdf5")
    with pytest.raises(ModelError, match="cannot load"):
        load_model(ModelSpec(name="broken", path=broken, mpp=0.5))


def test_fixed_normalisation_is_tile_independent():
    spec = ModelSpec(name="x", path=None, mpp=0.5)
    img = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    whole = normalize_image(img, spec)
    assert whole.dtype == np.float32
    np.testing.assert_allclose(whole, img / 255.0, atol=1e-7)
    np.testing.assert_array_equal(normalize_image(img[10:50, 30:90], spec), whole[10:50, 30:90])


def test_percentile_normalisation_uses_slide_values():
    spec = ModelSpec(name="x", path=None, mpp=0.25, normalize={"kind": "percentile", "low": 1, "high": 99.8})
    rng = np.random.default_rng(1)
    slide = rng.integers(0, 256, (200, 200, 3)).astype(np.uint8)
    lo, hi = compute_percentiles(slide, spec)
    assert lo == pytest.approx(np.percentile(slide, 1)) and hi == pytest.approx(np.percentile(slide, 99.8))
    tile = slide[:50, :50]
    x = normalize_image(tile, spec, percentiles=(lo, hi))
    np.testing.assert_allclose(x, (tile.astype(np.float32) - lo) / (hi - lo), rtol=1e-6)
    # without percentiles: the image's own (single-image use)
    own = normalize_image(tile, spec)
    assert own.min() < 0.05 and own.max() > 0.95
    # tissue mask restricts the statistics
    m = np.zeros((200, 200), bool)
    m[:20] = True
    assert compute_percentiles(slide, spec, mask=m) == pytest.approx(tuple(np.percentile(slide[:20], [1, 99.8])))


def test_shipped_model_and_its_card():
    folder = REPO / "models" / "histo-he"
    spec = resolve_model(None, stain="he")
    card = json.loads((folder / "card.json").read_text())
    assert spec.source == "shipped" and spec.mpp == card["mpp"] and spec.normalize["kind"] == "fixed"
    assert card["training"]["sources"] and card["validation"]["f1"] > 0.5
    assert all(s.get("licence") for s in card["training"]["sources"])
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20e6


def test_shipped_model_segments_fresh_generated_tiles(tmp_path):
    """Regression check of the shipped model on generated tiles it never saw (other seed), at the
    model's own pixel size."""
    from stardist.matching import matching_dataset

    from histo.train.data import pairs_from_folders, read_pair
    from histo_sample import write_training_set

    spec = resolve_model("histo-he")
    write_training_set(tmp_path, 4, tile_px=int(128 / spec.mpp), seed=7, mpp=spec.mpp, per_scene=2)
    model = load_model(spec)
    Y, P = [], []
    for ip, mp in pairs_from_folders(tmp_path / "images", tmp_path / "masks"):
        img, m = read_pair(ip, mp)
        Y.append(m)
        P.append(model.predict_instances(normalize_image(img, spec), verbose=False)[0])
    s = matching_dataset(Y, P, thresh=0.5, show_progress=False)
    assert s.f1 > 0.7, s


def test_inference_precision_from_the_environment(monkeypatch):
    from histo.segment.models import inference_precision

    monkeypatch.setenv("HISTO_PRECISION", "float32")
    assert inference_precision() == "float32"
    assert inference_precision("bfloat16") == "bfloat16"
    monkeypatch.setenv("HISTO_PRECISION", "auto")
    flags = set(open("/proc/cpuinfo").read().split())
    assert inference_precision() == ("bfloat16" if {"amx_bf16", "avx512_bf16"} & flags else "float32")
    monkeypatch.setenv("HISTO_PRECISION", "fp8")
    with pytest.raises(HistoError, match="HISTO_PRECISION='fp8'"):
        inference_precision()
