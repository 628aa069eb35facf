"""Nucleus models: finding them (``resolve_model``), loading them (``load_model``) and preparing
pixels for them (``normalize_image``).

A model is a StarDist 2D *model folder*: ``config.json``, ``thresholds.json``, ``weights_best.h5``
and, for our own models, ``card.json`` (what scale and normalisation it expects; see
``histo.train.outlines``). ``resolve_model`` never imports TensorFlow (the napari process may call it);
only ``load_model`` does.

Where a name is looked up, in order (``resolve_model(spec)``):

1. ``spec`` is an existing folder (or contains a path separator): that model folder;
2. a model shipped with histo: ``<repo>/models/<spec>`` (e.g. ``histo-he``);
3. ``$HISTO_MODEL_DIR/<spec>`` (a folder of model folders: cached weights on offline machines);
4. a StarDist registry name (``2D_versatile_he``, ``2D_versatile_fluo``, ``2D_paper_dsb2018``):
   the folder cached by Keras/StarDist under ``$KERAS_HOME/models/StarDist2D/<name>/`` (the
   layout ``StarDist2D.from_pretrained`` writes); if absent it is downloaded (sha256-checked) into
   that same cache; offline that fails with a ``ModelError`` telling where to put the folder.

Registry models carry no card; their scale and normalisation are the defaults in
``REGISTRY`` below (a card.json placed next to a copy in ``$HISTO_MODEL_DIR`` overrides them).

Security: a model folder is read as JSON + HDF5 weights (Keras ``load_weights``); nothing is
unpickled and no code from the folder runs. Registry zips are checked against StarDist's sha256
hashes and only their known member names are extracted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError, ModelError
from histo.io.files import atomic_write, read_json

__all__ = [
    "ModelSpec",
    "resolve_model",
    "load_model",
    "normalize_image",
    "compute_percentiles",
    "shipped_models_dir",
    "DEFAULT_MODELS",
    "REGISTRY",
    "NORMALIZE_FIXED",
    "NORMALIZE_PERCENTILE",
]

NORMALIZE_FIXED = {"kind": "fixed", "low": 0, "high": 255}
NORMALIZE_PERCENTILE = {"kind": "percentile", "low": 1, "high": 99.8}

#: default model per stain kind
DEFAULT_MODELS = {"he": "histo-he", "fluo": "2D_versatile_fluo", "if": "2D_versatile_fluo"}

#: StarDist's registered 2D models (stardist 0.9.2, stardist-models release v0.1) and the scale /
#: normalisation histo assumes for them.
#: - 2D_versatile_he: trained on MoNuSeg 2018 (+ TNBC), 40× scans at ~0.25 µm/px -> mpp 0.25.
#:   (Running it at 0.5 µm/px is 4× cheaper and is what QuPath's examples do, but nuclei are then
#:   half the size the model saw in training; override with a card.json if you validate that.)
#: - 2D_versatile_fluo / 2D_paper_dsb2018: DSB 2018 images have no physical pixel size; their
#:   nuclei are ~10–30 px across, i.e. ~0.5 µm/px for 5–15 µm nuclei -> mpp 0.5 (a guess).
#: All were trained on images normalised with csbdeep's percentile normalisation (1, 99.8);
#: histo computes the percentiles once per slide (``compute_percentiles``) and applies the same
#: values to every tile, so tiles stay consistent.
REGISTRY: dict[str, dict[str, Any]] = {
    "2D_versatile_he": {
        "url": "https://github.com/stardist/stardist-models/releases/download/v0.1/python_2D_versatile_he.zip",
        "sha256": "f1696ef0631bd7e1c0e5c0d3017e2b4c6a95e284c6aab9c22fc2f08317817b28",
        "mpp": 0.25,
        "n_channels": 3,
        "stain": "he",
    },
    "2D_versatile_fluo": {
        "url": "https://github.com/stardist/stardist-models/releases/download/v0.1/python_2D_versatile_fluo.zip",
        "sha256": "4ad678d0758eed6e55625f1b5ae30771e59adb79f1239e09b9772eac8846c3dd",
        "mpp": 0.5,
        "n_channels": 1,
        "stain": "fluo",
    },
    "2D_paper_dsb2018": {
        "url": "https://github.com/stardist/stardist-models/releases/download/v0.1/python_2D_paper_dsb2018.zip",
        "sha256": "4c11cf68512341d9e8ce3d1278c64ceb8ac400582739f85fcab079a2e82840d2",
        "mpp": 0.5,
        "n_channels": 1,
        "stain": "fluo",
    },
}

#: largest expected nucleus diameter (µm) when a model's card does not say
DEFAULT_MAX_NUCLEUS_UM = 25.0
#: StarDist's defaults when a folder has no thresholds.json
DEFAULT_THRESHOLDS = {"prob": 0.5, "nms": 0.4}
_OFFLINE_MSG = (
    "could not download pretrained weights (no network?); put the model folder in "
    "$HISTO_MODEL_DIR or pass --model FOLDER"
)
_REQUIRED = ("config.json", "weights_best.h5")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline needs to know about a model, without loading it (picklable).

    name : model name (folder name, or the registry name).
    path : the model folder (for registry models: the cached folder under $KERAS_HOME once
        downloaded, so workers load it without network).
    mpp : µm/px the model expects; the pipeline reads tiles at this pixel size.
    normalize : ``{"kind": "fixed", "low": 0, "high": 255}`` -> (x - low) / (high - low), tile
        independent; or ``{"kind": "percentile", "low": 1, "high": 99.8}`` -> the slide's low/high
        percentiles (computed once per slide on a low-resolution level, all channels jointly, by
        ``compute_percentiles``) mapped to 0/1.
    n_channels : input channels (3 = RGB).
    thresholds : ``{"prob": p, "nms": t}``.
    max_nucleus_um : largest expected nucleus diameter in µm: the tile halo is at least its radius.
    source : "folder" | "shipped" | "env" | "registry".
    n_rays, grid : from config.json (grid: the network's output subsampling).
    classes : nucleus classes of the folder's classifier (``histo.segment.nucleus_classes``), or None.
    """

    name: str
    path: Path | None
    mpp: float
    normalize: dict = field(default_factory=lambda: dict(NORMALIZE_FIXED))
    n_channels: int = 3
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    max_nucleus_um: float = DEFAULT_MAX_NUCLEUS_UM
    source: str = "folder"
    n_rays: int | None = None
    grid: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None

    def __hash__(self) -> int:  # dict fields are unhashable; usable as a cache key (one model per worker)
        return hash((self.name, None if self.path is None else str(self.path), self.mpp, self.source))

    def to_dict(self) -> dict:
        """JSON-ready description (for run.json provenance)."""
        d = asdict(self)
        d["path"] = None if self.path is None else str(self.path)
        d["grid"] = None if self.grid is None else list(self.grid)
        return d


# ---------------------------------------------------------------- locations
def shipped_models_dir() -> Path:
    """``<repo>/models``: the models shipped with histo (next to the ``histo`` package)."""
    import histo

    return Path(histo.__file__).resolve().parents[1] / "models"


def _keras_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")))


def _registry_cache(name: str) -> Path:
    return _keras_home() / "models" / "StarDist2D" / name


def _is_model_folder(p: Path) -> bool:
    return p.is_dir() and all((p / f).is_file() for f in _REQUIRED)


def _find_cached_registry_folder(name: str) -> Path | None:
    base = _registry_cache(name)
    for cand in (base / name, base / f"{name}_extracted", base / f"{name}.zip_extracted", base):
        if _is_model_folder(cand):
            return cand
    if base.is_dir():  # any other layout a Keras version may have chosen
        for cand in sorted(base.rglob("config.json")):
            if _is_model_folder(cand.parent):
                return cand.parent
    return None


def _download_registry(name: str, timeout: float = 30.0) -> Path:
    """Download + verify + extract a registry model into the Keras cache (no TensorFlow)."""
    import urllib.request

    info = REGISTRY[name]
    base = _registry_cache(name)
    zpath = base / f"{name}.zip"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if not (zpath.is_file() and _sha256(zpath) == info["sha256"]):
            with atomic_write(zpath, unique=True) as tmp:
                with urllib.request.urlopen(info["url"], timeout=timeout) as r, open(tmp, "wb") as f:  # noqa: S310
                    shutil.copyfileobj(r, f)
                if _sha256(tmp) != info["sha256"]:
                    raise ModelError(name, f"downloaded file does not match StarDist's checksum ({info['url']})")
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - network errors of every kind
        raise ModelError(name, _OFFLINE_MSG) from e
    target = base / name
    tmpdir = Path(tempfile.mkdtemp(dir=base, prefix=".extract-"))
    try:
        with zipfile.ZipFile(zpath) as zf:
            for m in zf.infolist():
                fn = Path(m.filename).name  # flatten; ignore folders and odd paths
                if m.is_dir() or fn not in ("config.json", "thresholds.json", "weights_best.h5", "weights_last.h5"):
                    continue
                with zf.open(m) as src, open(tmpdir / fn, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not _is_model_folder(tmpdir):
            raise ModelError(zpath, "the registry archive holds no config.json + weights_best.h5")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmpdir, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return target


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- spec from a folder
def _json_object(p: Path, what: str) -> dict | None:
    """The JSON object in ``p``, None if there is no such file; ModelError if it is not a JSON object."""
    if not p.is_file():
        return None
    try:
        d = read_json(p)
    except Exception as e:  # noqa: BLE001
        raise ModelError(p, f"{what} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ModelError(p, f"{what} must hold a JSON object")
    return d


def _spec_from_folder(folder: Path, source: str, name: str | None = None) -> ModelSpec:
    """The spec of a model folder; ModelError naming the folder where a value in its JSON files is
    not a number (e.g. ``"n_rays": "many"``)."""
    try:
        return _read_spec(folder, source, name)
    except (TypeError, ValueError) as exc:
        raise ModelError(
            folder, f"a value in config.json, card.json or thresholds.json is not a number ({exc})"
        ) from None


def _read_spec(folder: Path, source: str, name: str | None) -> ModelSpec:
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise ModelError(folder, "model folder does not exist")
    missing = [f for f in _REQUIRED if not (folder / f).is_file()]
    if missing:
        raise ModelError(folder, f"not a StarDist model folder: missing {', '.join(missing)}")
    config = _json_object(folder / "config.json", "config.json") or {}
    thr = _json_object(folder / "thresholds.json", "thresholds.json")
    card = _json_object(folder / "card.json", "card.json")
    name = name or folder.name
    reg = REGISTRY.get(name, {})

    n_channels = int(config.get("n_channel_in", (card or {}).get("n_channels", reg.get("n_channels", 3))))
    if card is not None:
        if "mpp" not in card:
            raise ModelError(folder / "card.json", "card.json has no 'mpp' (µm/px the model expects)")
        mpp = float(card["mpp"])
        normalize = dict(card.get("normalize") or NORMALIZE_FIXED)
        max_um = float(card.get("max_nucleus_um", DEFAULT_MAX_NUCLEUS_UM))
        card_thr = card.get("thresholds")
    else:
        # no card: a StarDist folder from elsewhere (e.g. a copy of a registry model)
        mpp = float(reg.get("mpp", 0.5))
        normalize = dict(NORMALIZE_PERCENTILE)
        max_um = DEFAULT_MAX_NUCLEUS_UM
        card_thr = None
    if normalize.get("kind") not in ("fixed", "percentile"):
        raise ModelError(
            folder / "card.json", f"unknown normalize kind {normalize.get('kind')!r} (expected 'fixed' or 'percentile')"
        )
    thresholds = dict(DEFAULT_THRESHOLDS)
    if card_thr:
        thresholds.update({k: float(card_thr[k]) for k in ("prob", "nms") if k in card_thr})
    if thr:  # thresholds.json is what StarDist itself uses: it wins
        thresholds.update({k: float(thr[k]) for k in ("prob", "nms") if k in thr})
    grid = config.get("grid")
    return ModelSpec(
        name=name,
        path=folder,
        mpp=mpp,
        normalize=normalize,
        n_channels=n_channels,
        thresholds=thresholds,
        max_nucleus_um=max_um,
        source=source,
        n_rays=int(config["n_rays"]) if "n_rays" in config else None,
        grid=tuple(int(g) for g in grid) if grid is not None else None,
        classes=_classes(folder, card),
    )


def _classes(folder: Path, card: dict | None) -> tuple[str, ...] | None:
    """The classes of the folder's nucleus classifier, when it has one (card section and every member's file)."""
    from histo.segment.nucleus_classes import classifier_members

    section = (card or {}).get("nucleus_classes")
    if not section or not all((folder / m["file"]).is_file() for m in classifier_members(section)):
        return None
    return tuple(str(c) for c in section["classes"])


def resolve_model(spec: str | os.PathLike | None, stain: str = "he") -> ModelSpec:
    """Find a model by folder path, shipped name, ``$HISTO_MODEL_DIR`` name or registry name.

    Never imports TensorFlow (a registry model missing from the cache is downloaded, sha256-checked).

    Parameters
    ----------
    spec : str or os.PathLike, optional
        A model folder, a shipped model's name (``histo-he``), a name in ``$HISTO_MODEL_DIR`` or a
        StarDist registry name (``2D_versatile_he``); looked up in that order (module docstring).
        None or "" picks the default for ``stain``.
    stain : str
        The stain whose default model ``spec=None`` picks (``DEFAULT_MODELS``: "he" -> the shipped
        ``histo-he``; "fluo"/"if" -> ``2D_versatile_fluo``).

    Returns
    -------
    ModelSpec
        The folder, the pixel size it expects (µm/px), normalisation, channels, thresholds, largest
        nucleus (µm) and nucleus classes, from its ``card.json`` or the registry defaults.

    Raises
    ------
    ModelError
        Naming what was looked for and where, or the file of the folder that is not valid.
    """
    if spec is None or str(spec).strip() == "":
        key = str(stain).lower()
        if key not in DEFAULT_MODELS:
            raise ModelError(
                None, f"no default model for stain {stain!r}; known: {', '.join(sorted(DEFAULT_MODELS))}; pass --model"
            )
        spec = DEFAULT_MODELS[key]
    s = os.fspath(spec)
    p = Path(s).expanduser()
    looks_like_path = p.is_absolute() or os.sep in s or (os.altsep and os.altsep in s) or s.startswith(".")
    if p.is_dir():
        return _spec_from_folder(p, "folder")
    if looks_like_path:
        raise ModelError(p, "model folder does not exist")

    shipped = shipped_models_dir() / s
    if shipped.is_dir():
        return _spec_from_folder(shipped, "shipped")

    env = os.environ.get("HISTO_MODEL_DIR")
    searched = [str(shipped_models_dir())]
    if env:
        for d in env.split(os.pathsep):
            if not d:
                continue
            cand = Path(d).expanduser() / s
            searched.append(d)
            if cand.is_dir():
                return _spec_from_folder(cand, "env")

    if s == DEFAULT_MODELS["he"]:
        raise ModelError(
            shipped,
            f"the shipped model {s!r} is missing from {shipped_models_dir()} "
            "(a source checkout without models/?); pass --model FOLDER or put it in "
            "$HISTO_MODEL_DIR",
        )
    if s in REGISTRY:
        folder = _find_cached_registry_folder(s) or _download_registry(s)
        return _spec_from_folder(folder, "registry", name=s)

    raise ModelError(
        s,
        "unknown model: not a folder, not a shipped model, not in $HISTO_MODEL_DIR "
        f"(searched: {', '.join(searched)}{'' if env else '; $HISTO_MODEL_DIR unset'}), "
        f"not a StarDist registry name ({', '.join(REGISTRY)})",
    )


# ---------------------------------------------------------------- loading / normalising
def load_model(spec: ModelSpec | str | os.PathLike):
    """Load the StarDist2D model (weights only: config.json + weights_best.h5 via Keras
    ``load_weights``). Imports TensorFlow.

    Parameters
    ----------
    spec : ModelSpec or str or os.PathLike
        A resolved model, or anything :func:`resolve_model` takes.

    Returns
    -------
    stardist.models.StarDist2D
        With ``spec``'s thresholds, and read-only (``basedir`` None: it never writes into the folder).

    Raises
    ------
    ModelError
        The spec has no folder, the folder lacks ``config.json`` / ``weights_best.h5``, or the
        weights cannot be loaded.
    """
    if not isinstance(spec, ModelSpec):
        spec = resolve_model(spec)
    if spec.path is None:
        raise ModelError(spec.name, "the model spec has no folder")
    folder = Path(spec.path)
    if not _is_model_folder(folder):
        raise ModelError(folder, "not a StarDist model folder: needs config.json and weights_best.h5")
    import contextlib
    import io

    from stardist.models import StarDist2D

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
            # _find_and_load_weights picks the newest *.h5 "best" file; be explicit
            model.load_weights("weights_best.h5")
    except Exception as e:  # noqa: BLE001
        raise ModelError(folder, f"cannot load the model: {e}") from e
    model.basedir = None  # read-only: never write thresholds/weights back into the folder
    model.thresholds = {"prob": float(spec.thresholds["prob"]), "nms": float(spec.thresholds["nms"])}
    return model


PRECISIONS = ("auto", "float32", "bfloat16")


def inference_precision(mode: str | None = None) -> str:
    """``"float32"`` or ``"bfloat16"``: how StarDist's network runs here. ``mode`` or
    ``$HISTO_PRECISION`` (default ``auto``): bfloat16 where the CPU multiplies bfloat16 in hardware
    (AMX or AVX-512 BF16 in /proc/cpuinfo; TensorFlow's oneDNN mixed precision, about 4× faster per
    tile here with the same nuclei), float32 elsewhere."""
    mode = mode or os.environ.get("HISTO_PRECISION") or "auto"
    if mode not in PRECISIONS:
        raise HistoError(None, f"HISTO_PRECISION={mode!r}: use one of {', '.join(PRECISIONS)}")
    if mode != "auto":
        return mode
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "float32"
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & set(flags) else "float32"


def use_precision(precision: str) -> None:
    """Make TensorFlow graphs of this process built from now on run in ``precision`` (oneDNN's
    automatic bfloat16 mixed precision: convolutions in bfloat16, outputs float32)."""
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": precision == "bfloat16"})


def one_graph_for_all_shapes(model) -> None:
    """Make the StarDist ``model`` predict images of any size through one traced TensorFlow graph:
    Keras's own ``predict`` traces the network again, about 0.5 s, for each new tile shape (edge
    tiles, crops, the first tiles of each worker). Outputs are the same arrays."""
    import tensorflow as tf

    net = model.keras_model
    graph = tf.function(
        lambda x: net(x, training=False),
        input_signature=[tf.TensorSpec((None, None, None, net.inputs[0].shape[-1]), tf.float32)],
    )

    def predict(x, **_):  # StarDist passes Keras options (verbose=0)
        return [y.numpy() for y in graph(tf.convert_to_tensor(x, tf.float32))]

    net.predict = predict


def compute_percentiles(img: np.ndarray, spec: ModelSpec | dict, mask: np.ndarray | None = None) -> tuple[float, float]:
    """The (low, high) intensity percentiles of ``img`` for a percentile-normalised model, all
    channels jointly (csbdeep ``normalize`` with ``axis=None``, as in StarDist's examples).
    Compute it ONCE per slide on a low-resolution level (optionally only inside the tissue
    ``mask``) and pass it to ``normalize_image`` for every tile."""
    norm = spec.normalize if isinstance(spec, ModelSpec) else spec
    vals = np.asarray(img)
    if mask is not None:
        vals = vals[np.asarray(mask, bool)]
    vals = vals.reshape(-1).astype(np.float32)
    if vals.size == 0:
        raise HistoError(None, "cannot compute normalisation percentiles of an empty image/mask")
    lo, hi = np.percentile(vals, [float(norm.get("low", 1)), float(norm.get("high", 99.8))])
    return float(lo), float(hi)


def normalize_image(
    img: np.ndarray, spec: ModelSpec | dict, percentiles: tuple[float, float] | None = None
) -> np.ndarray:
    """float32 image in the model's input range.

    fixed: ``(img - low) / (high - low)`` (our models: x/255) — the same for any tile;
    percentile: ``(img - lo) / (hi - lo)`` with ``percentiles=(lo, hi)`` from
    ``compute_percentiles`` on the whole slide; without them they are computed from ``img``
    itself (fine for a single image, NOT for tiles of one slide).
    """
    norm = spec.normalize if isinstance(spec, ModelSpec) else spec
    x = np.asarray(img, dtype=np.float32)
    kind = norm.get("kind")
    if kind == "fixed":
        lo, hi = float(norm.get("low", 0)), float(norm.get("high", 255))
    elif kind == "percentile":
        lo, hi = percentiles if percentiles is not None else compute_percentiles(x, norm)
        lo, hi = float(lo), float(hi)
    else:
        raise ModelError(None, f"unknown normalize kind {kind!r}")
    scale = hi - lo
    if scale <= 1e-20:
        scale = 1e-20
    return ((x - np.float32(lo)) / np.float32(scale)).astype(np.float32, copy=False)
