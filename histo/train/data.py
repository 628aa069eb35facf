"""Reading training data: image / instance-mask pairs matched by file name, their pixel sizes, and the
split into training and validation images.

Used by ``histo train`` (:mod:`histo.train.outlines`), ``histo train-classes`` (:mod:`histo.train.classes`),
``histo evaluate`` (:mod:`histo.train.evaluate`) and the benches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from histo.errors import HistoError

__all__ = [
    "IMAGE_EXT",
    "read_array",
    "list_images",
    "pairs_from_folders",
    "read_pair",
    "resample_pair",
    "load_pairs",
    "split_by_image",
    "patch_grid",
    "read_mpp_table",
    "pixel_sizes",
    "dataset_pairs",
]

#: file name endings (lower case) of images and masks
IMAGE_EXT = (".tif", ".tiff", ".png")


def read_array(path: Path | str) -> np.ndarray:
    """The pixels of a TIFF (tifffile) or another image file (scikit-image); HistoError naming the file
    if it cannot be read."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        from skimage.io import imread

        return imread(path)
    except Exception as e:  # noqa: BLE001 - reported as a user error naming the file
        raise HistoError(path, f"cannot read image: {e}") from e


def list_images(folder: Path, extensions: tuple[str, ...] = IMAGE_EXT) -> dict[str, Path]:
    """Files of ``folder`` with ``extensions`` (lower case, with the dot) by stem, sorted; hidden
    files skipped. HistoError if the folder is missing or two files share a stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HistoError(folder, "folder does not exist")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."):
            if p.stem in out:
                raise HistoError(p, f"two files share the stem '{p.stem}' ({out[p.stem].name})")
            out[p.stem] = p
    return out


def pairs_from_folders(
    images_dir: Path | str, masks_dir: Path | str, check_shapes: bool = True
) -> list[tuple[Path, Path]]:
    """Image/mask pairs matched by file stem (``.tif``/``.tiff``/``.png``), sorted by stem.

    Raises ``HistoError`` naming the file when an image has no mask, or (``check_shapes``) when
    image and mask sizes differ, the image is not RGB, or the mask is not a 2-D label image.
    Masks without an image are ignored.
    """
    images = list_images(Path(images_dir))
    masks = list_images(Path(masks_dir))
    if not images:
        raise HistoError(images_dir, "no images (.tif, .tiff, .png) in this folder")
    pairs = []
    for stem, ip in images.items():
        mp = masks.get(stem)
        if mp is None:
            raise HistoError(ip, f"no mask with the same name (stem '{stem}') in {masks_dir}")
        if check_shapes:
            _check_pair(ip, mp)
        pairs.append((ip, mp))
    return pairs


def _shape_of(path: Path) -> tuple[int, ...]:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return tuple(tf.series[0].shape)
    return read_array(path).shape


def _check_pair(ip: Path, mp: Path) -> None:
    try:
        si, sm = _shape_of(ip), _shape_of(mp)
    except HistoError:
        raise
    except Exception as e:  # noqa: BLE001
        raise HistoError(ip, f"cannot read image: {e}") from e
    if len(sm) != 2:
        raise HistoError(mp, f"mask must be a 2-D label image, got shape {sm}")
    if len(si) != 3 or si[-1] not in (3, 4):
        raise HistoError(ip, f"image must be RGB (H, W, 3), got shape {si}")
    if tuple(si[:2]) != tuple(sm):
        raise HistoError(mp, f"mask shape {sm} differs from image {ip.name} shape {si[:2]}")


def read_pair(ip: Path, mp: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image as uint8 RGB, mask as int32 labels; shape errors name the file."""
    img = read_array(ip)
    msk = read_array(mp)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if img.ndim != 3 or img.shape[-1] != 3:
        raise HistoError(ip, f"image must be RGB (H, W, 3), got shape {img.shape}")
    if msk.ndim != 2:
        raise HistoError(mp, f"mask must be a 2-D label image, got shape {msk.shape}")
    if img.shape[:2] != msk.shape:
        raise HistoError(mp, f"mask shape {msk.shape} differs from image {Path(ip).name} shape {img.shape[:2]}")
    if img.dtype != np.uint8:
        if img.dtype == np.uint16 and img.max() > 255:
            img = (img / 257.0).round()
        img = np.clip(img, 0, 255).astype(np.uint8)
    if not np.issubdtype(msk.dtype, np.integer):
        if not np.all(np.mod(msk, 1) == 0):
            raise HistoError(mp, "mask is not an integer label image")
    return np.ascontiguousarray(img), msk.astype(np.int32)


def resample_pair(img: np.ndarray, mask: np.ndarray, image_mpp: float, model_mpp: float):
    """Resample an image (anti-aliased, order 1) and its mask (nearest) from ``image_mpp`` to
    ``model_mpp``. Both get exactly the same output shape, so they stay aligned."""
    if image_mpp <= 0 or model_mpp <= 0:
        raise ValueError("pixel sizes must be positive")
    f = image_mpp / model_mpp
    if abs(f - 1.0) < 1e-3:
        return img, mask
    from skimage.transform import resize

    shape = (max(1, int(round(img.shape[0] * f))), max(1, int(round(img.shape[1] * f))))
    ri = resize(img, shape + img.shape[2:], order=1, anti_aliasing=f < 1, preserve_range=True)
    ri = np.clip(np.round(ri), 0, 255).astype(np.uint8)
    rm = resize(mask, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return ri, rm


def split_by_image(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of image indices into (train, validation); at least one of each."""
    if n < 2:
        raise HistoError(None, f"training needs at least 2 images (1 for validation), got {n}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n).tolist()
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def patch_grid(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], patch: int, max_patches: int | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every image and its mask cut into ``patch`` × ``patch`` crops that together cover it: a grid
    from the top-left corner, the last row and column aligned to the far edge (they overlap their
    neighbours when the side is not a multiple of ``patch``). Beyond ``max_patches`` crops, that many
    evenly spaced ones of the list are kept. No randomness: the same images give the same crops in
    every call. HistoError if an image is smaller than ``patch`` along a side."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for img, mask in zip(images, masks):
        if min(mask.shape[:2]) < patch:
            raise HistoError(None, f"a validation image of {mask.shape[:2]} px is smaller than the patch of {patch} px")
        starts = [sorted({*range(0, side - patch + 1, patch), side - patch}) for side in mask.shape[:2]]
        for y0 in starts[0]:
            for x0 in starts[1]:
                xs.append(img[y0 : y0 + patch, x0 : x0 + patch])
                ys.append(mask[y0 : y0 + patch, x0 : x0 + patch])
    if max_patches is not None and len(xs) > max_patches:
        keep = np.unique(np.linspace(0, len(xs) - 1, max(1, max_patches)).round().astype(int))
        xs, ys = [xs[i] for i in keep], [ys[i] for i in keep]
    return xs, ys


def load_pairs(
    images: Sequence[Path | str], masks: Sequence[Path | str], image_mpp: Sequence[float] | float, mpp: float
) -> tuple[list[Path], list[np.ndarray], list[np.ndarray]]:
    """Read image / mask pairs and resample them from ``image_mpp`` to ``mpp``.

    Parameters
    ----------
    images, masks : sequences of str or Path
        Paired files, in the same order.
    image_mpp : float or sequence of float
        Pixel size of the files, µm/px: one for all or one per image.
    mpp : float
        Pixel size to resample to, µm/px.

    Returns
    -------
    paths : list of Path
        The images.
    X : list of numpy.ndarray
        uint8 RGB images at ``mpp``.
    Y : list of numpy.ndarray
        int32 instance labels at ``mpp``, aligned with ``X``.
    """
    images = [Path(p) for p in images]
    masks = [Path(p) for p in masks]
    if len(images) != len(masks):
        raise HistoError(None, f"{len(images)} images but {len(masks)} masks")
    if isinstance(image_mpp, (int, float)):
        image_mpp = [float(image_mpp)] * len(images)
    image_mpp = [float(m) for m in image_mpp]
    if len(image_mpp) != len(images):
        raise HistoError(None, f"{len(images)} images but {len(image_mpp)} pixel sizes")
    X, Y = [], []
    for ip, mp, m in zip(images, masks, image_mpp):
        img, msk = read_pair(ip, mp)
        img, msk = resample_pair(img, msk, m, mpp)
        X.append(img)
        Y.append(msk)
    return images, X, Y


def read_mpp_table(path: Path | str) -> dict[str, float]:
    """File stem -> µm/px from a CSV with columns ``image`` (file name or stem) and ``mpp``."""
    import pandas as pd

    path = Path(path)
    try:
        t = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001
        raise HistoError(path, f"cannot read the pixel-size table: {e}") from e
    if not {"image", "mpp"} <= set(t.columns):
        raise HistoError(path, f"pixel-size table needs columns 'image' and 'mpp', has {list(t.columns)}")
    out = {}
    for name, m in zip(t["image"].astype(str), pd.to_numeric(t["mpp"], errors="coerce")):
        if not (m > 0):
            raise HistoError(path, f"image {name!r}: pixel size must be a positive number")
        out[Path(name).stem] = float(m)
    return out


def pixel_sizes(spec: float | str | Path, where: str | Path | None = None) -> Callable[[str], float | None]:
    """µm/px by file stem: ``spec`` is one positive number for every image, or a CSV
    (:func:`read_mpp_table`), whose lookup gives None for a stem it lacks. ``where`` names the
    folder in the error for a non-positive number."""
    try:
        one = float(spec)
    except (TypeError, ValueError):
        return read_mpp_table(spec).get
    if one <= 0:
        raise HistoError(where, f"pixel size must be positive, got {one}")
    return lambda stem: one


def dataset_pairs(images_dir, masks_dir, image_mpp: float | str | Path) -> list[tuple[Path, Path, float]]:
    """(image, mask, µm/px) for one folder pair; ``image_mpp`` is one number for the folder or a
    CSV file (``read_mpp_table``) giving each image its own."""
    pairs = pairs_from_folders(images_dir, masks_dir)
    mpp_of = pixel_sizes(image_mpp, images_dir)
    missing = [i for i, _ in pairs if mpp_of(i.stem) is None]
    if missing:
        raise HistoError(missing[0], f"no pixel size for this image in {image_mpp} ({len(missing)} missing)")
    return [(i, m, mpp_of(i.stem)) for i, m in pairs]
