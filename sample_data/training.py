"""Image/mask tiles for training a StarDist nucleus model, cut from generated scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from .render import render_region
from .scene import make_scene

SCENE_PX = 4096  # each scene is 2 mm at 0.5 µm/px: big enough for follicles, lining, aggregates


def _targets(scene, rng, n: int, tile_um: float) -> list[tuple[float, float]]:
    """Tile centres (µm): structures, lining, tissue edge, random tissue and a little glass."""
    W = scene.width_um
    out = []
    structs = scene.structures
    pieces = scene.pieces
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        u = rng.random()
        if u < 0.35 and structs:
            s = structs[int(rng.integers(len(structs)))].blob
            r = np.sqrt(s.ax * s.ay)
            ang = rng.uniform(0, 2 * np.pi)
            rad = r * np.sqrt(rng.uniform(0, 1.3))
            x, y = s.cx + rad * np.cos(ang), s.cy + rad * np.sin(ang)
        elif u < 0.55 or (u < 0.7 and scene.linings):
            # near the tissue surface (lining / capsule) or a cut edge
            b = pieces[int(rng.integers(len(pieces)))]
            if scene.linings and rng.random() < 0.7:
                lin = scene.linings[int(rng.integers(len(scene.linings)))]
                b = pieces[lin.piece]
                th = lin.a0 + rng.uniform(0, lin.span)
            else:
                th = rng.uniform(0, 2 * np.pi)
            pts = b.outline(720)
            k = int((th % (2 * np.pi)) / (2 * np.pi) * 720) % 720
            x, y = pts[k] + rng.normal(0, tile_um * 0.25, 2)
        else:
            b = pieces[int(rng.integers(len(pieces)))]
            x = rng.uniform(b.cx - b.rmax, b.cx + b.rmax)
            y = rng.uniform(b.cy - b.rmax, b.cy + b.rmax)
            if b.depth(x, y) < 0 and rng.random() < 0.9:
                continue
        x = float(np.clip(x, tile_um / 2, W - tile_um / 2))
        y = float(np.clip(y, tile_um / 2, W - tile_um / 2))
        out.append((x, y))
    return out


def write_training_set(
    out_dir, n_tiles: int, tile_px: int = 256, seed: int = 0, mpp: float = 0.5, per_scene: int = 24
) -> None:
    """Write ``n_tiles`` RGB tiles to out_dir/images/NNNN.tif and instance masks to masks/NNNN.tif.

    Tiles (``tile_px``² at ``mpp`` µm/px) alternate between lymph-node and synovium scenes (a new
    scene every ``per_scene`` tiles, seeds derived from ``seed``) and sit mostly on tissue: follicles, germinal
    centres, aggregates, lining / capsule, stroma, tissue edges, a little glass (``per_scene`` tiles
    per scene, so a small set still holds both kinds). Masks are uint16,
    0 = background, nuclei numbered 1..n in each tile.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 99])
    k = 0
    s_idx = 0
    width = max(4, len(str(max(n_tiles - 1, 0))))
    while k < n_tiles:
        kind = ("lymph-node", "synovium")[s_idx % 2]
        scene = make_scene(kind, SCENE_PX, seed=int(seed) * 1000 + s_idx, mpp=mpp)
        s_idx += 1
        tile_um = tile_px * mpp
        for cx, cy in _targets(scene, rng, min(per_scene, n_tiles - k), tile_um):
            x0 = int(round(cx / mpp - tile_px / 2))
            y0 = int(round(cy / mpp - tile_px / 2))
            x0 = int(np.clip(x0, 0, scene.size - tile_px))
            y0 = int(np.clip(y0, 0, scene.size - tile_px))
            rgb, lab = render_region(scene, x0, y0, tile_px, tile_px)
            ids, inv = np.unique(lab, return_inverse=True)
            mask = inv.reshape(lab.shape).astype(np.uint16)  # 0 stays 0 (ids[0] == 0 or none)
            if ids[0] != 0:
                mask += 1
            name = f"{k:0{width}d}.tif"
            tifffile.imwrite(out / "images" / name, rgb, photometric="rgb", compression="zlib")
            tifffile.imwrite(out / "masks" / name, mask, compression="zlib")
            k += 1
            if k >= n_tiles:
                break
