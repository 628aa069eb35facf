"""Stain-model rendering of a scene region to RGB uint8 and int32 nucleus instance labels.

Colour follows Beer–Lambert: each pixel holds haematoxylin and eosin amounts (optical density,
natural log) and RGB = I0·exp(−(H·h + E·e + glass)), with the reference stain vectors h, e of
Macenko et al. 2009 (close to Ruifrok & Johnston 2001). Background (glass, stroma fibres, lymphoid
parenchyma, vessels, lining cytoplasm) is computed from the scene's fields; nuclei are stamped as
small soft-edged ellipses with chromatin texture, vesicular rims and nucleoli, all vectorised.
Everything is a function of the global position, so regions cut anywhere render the same pixels.
"""

from __future__ import annotations

import numpy as np

from . import scene as sc
from .noise import grid_noise, hash_id, pixel_noise, point_noise, upsample_grid

H_VEC = np.array([0.5626, 0.7201, 0.4062])
E_VEC = np.array([0.2159, 0.8012, 0.5581])
H_VEC = H_VEC / np.linalg.norm(H_VEC)
E_VEC = E_VEC / np.linalg.norm(E_VEC)
I0 = 252.0
_OD_MATRIX = np.stack([H_VEC, E_VEC, np.ones(3)]).astype(np.float32)
GLASS_OD = 0.035

# per style: H OD, E OD, chromatin texture amplitude, rim (vesicular) strength, nucleoli
_STYLE_H = np.array([2.55, 1.05, 0.85, 1.9, 1.8, 1.45], np.float32)
_STYLE_E = np.array([0.25, 0.22, 0.25, 0.22, 0.2, 0.22], np.float32)
_STYLE_TEX = np.array([0.45, 0.55, 0.35, 0.3, 0.3, 0.35], np.float32)
_STYLE_RIM = np.array([0.0, 0.75, 0.35, 0.0, 0.0, 0.15], np.float32)
_STYLE_NUCLEOLI = np.array([0, 3, 1, 0, 0, 1])
# cytoplasm around the nucleus: outer extent (in nucleus radii), H and E OD
_CYTO_EXT = np.array([1.0, 1.35, 1.65, 1.0, 1.0, 1.5], np.float32)
_CYTO_H = np.array([0.0, 0.22, 0.03, 0.0, 0.0, 0.07], np.float32)
_CYTO_E = np.array([0.0, 0.20, 0.14, 0.0, 0.0, 0.40], np.float32)


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0, 1)
    return t * t * (3 - 2 * t)


def _working_grid(x0, y0, w, h, p, step):
    """Global lattice (spacing max(p, step) µm) covering the region: lattice coords and mapping."""
    s = max(p, step)
    xs = (x0 + np.arange(w) + 0.5) * p
    ys = (y0 + np.arange(h) + 0.5) * p
    if s == p:
        return xs, ys, None
    kx0 = int(np.floor(xs[0] / s)) - 1
    ky0 = int(np.floor(ys[0] / s)) - 1
    kx1 = int(np.floor(xs[-1] / s)) + 2
    ky1 = int(np.floor(ys[-1] / s)) + 2
    gx = np.arange(kx0, kx1 + 1) * s
    gy = np.arange(ky0, ky1 + 1) * s
    return gx, gy, (xs / s - kx0, ys / s - ky0)


def _up(v, m):
    return v if m is None else upsample_grid(np.asarray(v, np.float32), m[0], m[1])


def background(scene, x0, y0, w, h, p):
    """Haematoxylin and eosin OD (h, w) of everything but nuclei, and tissue coverage.

    Compartments are evaluated on a coarse global lattice (≥ 2 µm) as E = E0 + E1·fibre and
    H = H0 + H1·fibre, the fibre texture on a finer one (≥ 1 µm), vessels at full resolution.
    """
    seed = scene.params["seed"]
    f32 = np.float32
    gx, gy, m = _working_grid(x0, y0, w, h, p, 2.0)
    xs = (x0 + np.arange(w) + 0.5) * p
    ys = (y0 + np.arange(h) + 0.5) * p
    zero = np.zeros((h, w), f32)
    if not sc._tissue_in_rect(scene, gx[0] - 10, gy[0] - 10, gx[-1] + 10, gy[-1] + 10):
        return zero, zero, zero
    GX, GY = np.meshgrid(gx, gy)
    f_all = sc.fields(scene, GX, GY)
    near = f_all["tissue"] > -6.0  # compartments only near tissue, as 1-D point arrays
    if not near.any():
        return zero, zero, zero
    X, Y = GX[near], GY[near]
    f = {k: v[near] for k, v in f_all.items()}
    # ragged tissue edge
    tissue = (
        f["tissue"] + 2.5 * (point_noise(X, Y, 9.0, seed + 31) - 0.5) + 1.0 * (point_noise(X, Y, 3.0, seed + 32) - 0.5)
    )
    cover = np.clip(0.5 + tissue / max(1.2, p), 0, 1)
    dens = point_noise(X, Y, 35.0, seed + 45)  # oedema / looseness of the stroma
    k = 0.45 + 0.75 * dens
    E0, E1 = 0.06 * k, 0.75 * k
    H0, H1 = 0.025 + 0 * k, 0.02 + 0 * k
    if scene.kind == "lymph-node":
        P = scene.params
        mott = point_noise(X, Y, 12.0, seed + 46)
        lymph = np.clip((f["surf"] - P["capsule"]) / 3.0, 0, 1) * (f["tissue"] > -5)
        el0, el1 = 0.17 + 0.08 * mott, 0 * mott
        hl0 = 0.07 + 0.04 * mott
        sinus = (f["surf"] > P["capsule"]) & (f["surf"] < P["capsule"] + P["sinus"]) & (f["foll"] < 0)
        msin = f["medulla"] & (f["foll"] < 0) & sc.medullary_sinus(scene, X, Y)
        pale = sinus | msin
        el0 = np.where(pale, 0.07, el0)
        el1 = np.where(pale, 0.12, el1)
        hl0 = np.where(pale, 0.03, hl0)
        gcw = 1 - 0.3 * _smoothstep(-4, 4, f["gc"])
        el0, hl0 = el0 * gcw, hl0 * gcw
        caps = 1 - lymph
        E0 = 0.4 * caps + el0 * lymph
        E1 = 0.5 * caps + el1 * lymph
        H0 = 0.03 * caps + hl0 * lymph
        H1 = 0.02 * caps
    else:
        aggw = _smoothstep(-10, 10, f["agg"])
        E0 = E0 * (1 - aggw) + (0.18 + 0.06 * point_noise(X, Y, 12.0, seed + 46)) * aggw
        E1 = E1 * (1 - aggw) + 0.1 * aggw
        H0 = H0 * (1 - aggw) + 0.07 * aggw
        H1 = H1 * (1 - aggw)
        lin = _smoothstep(0.0, 1.0, f["lining"].astype(f32))
        E0 = E0 * (1 - lin) + lin * (0.30 + 0.12 * point_noise(X, Y, 4.0, seed + 47))
        E1 = E1 * (1 - lin) + lin * 0.1
        H0 = H0 * (1 - lin) + lin * 0.06
        H1 = H1 * (1 - lin)

    def grid(v):
        out = np.zeros(GX.shape, f32)
        out[near] = v
        return out

    E0, E1, H0, H1, cover = (grid(v) for v in (E0, E1, H0, H1, cover))
    E1c = E1
    E0, E1, H0, H1, cover = (_up(v, m) for v in (E0, E1, H0, H1, cover))
    fx, fy, fm = _working_grid(x0, y0, w, h, p, 1.0)
    fib = np.zeros((fy.size, fx.size), f32)
    # fibres only where they show (E1 > 0): the coarse E1 brought to the fibre lattice
    if fm is None:
        need = E1 > 1e-3
    else:
        sc_ = gx[1] - gx[0]
        need = upsample_grid(np.asarray(E1c, f32), (fx - gx[0]) / sc_, (fy - gy[0]) / sc_) > 1e-3
    if need.any():
        FX, FY = np.meshgrid(fx, fy)
        fib[need] = _fibres_at(scene, FX[need], FY[need])
    fib = _up(fib, fm)
    E = E0 + E1 * fib
    H = H0 + H1 * fib
    _vessels(scene, xs, ys, H, E, seed)
    # fine grain of stain and camera noise
    grain = grid_noise(xs, ys, 1.2, seed + 50)
    E = E * (0.85 + 0.3 * grain)
    H = H * (0.85 + 0.3 * grain)
    return H * cover, E * cover, cover


def _vessels(scene, xs, ys, H, E, seed):
    """Paint vessel walls (eosinophilic) and lumens (pale, red cells) at full resolution, in place."""
    v = scene.vessels
    if len(v) == 0:
        return
    ext = v[:, 2] + v[:, 3] + 1.0
    p = xs[1] - xs[0] if xs.size > 1 else 1.0
    sel = np.nonzero(
        (v[:, 0] + ext >= xs[0]) & (v[:, 0] - ext <= xs[-1]) & (v[:, 1] + ext >= ys[0]) & (v[:, 1] - ext <= ys[-1])
    )[0]
    for k in sel:
        vx, vy, rl, vw = v[k]
        e = ext[k]
        i0, i1 = np.searchsorted(xs, [vx - e, vx + e])
        j0, j1 = np.searchsorted(ys, [vy - e, vy + e])
        if i1 <= i0 or j1 <= j0:
            continue
        X, Y = np.meshgrid(xs[i0:i1], ys[j0:j1])
        vd = np.hypot(X - vx, Y - vy) - rl
        sw = max(0.6, p)
        wall = _smoothstep(-sw, sw, vd) * _smoothstep(vw + sw, vw - sw, vd)
        lumen = _smoothstep(sw, -sw, vd)
        tex = point_noise(X, Y, 1.5, seed + 51)
        rbc = _smoothstep(0.5, 0.68, point_noise(X, Y, 3.2, seed + 48)) * (hash_id(np.array([k]), 3)[0] > 0.3)
        Es, Hs = E[j0:j1, i0:i1], H[j0:j1, i0:i1]
        Es[:] = Es * (1 - wall) + wall * (0.45 + 0.25 * tex)
        Hs[:] = Hs * (1 - wall) + wall * 0.04
        Es[:] = Es * (1 - lumen) + lumen * (0.03 + 1.3 * rbc)
        Hs[:] = Hs * (1 - lumen) + lumen * 0.01


def _fibres_at(scene, X, Y):
    """Collagen fibre texture in [0, 1] at points (µm): wavy ridges along the local direction.

    Four fixed orientations (no shear at large coordinates) blended by the fibre direction field.
    """
    seed = scene.params["seed"]
    ang = sc.fibre_angle(scene, X, Y)
    wx = X + 7.0 * point_noise(X, Y, 30.0, seed + 41)
    wy = Y + 7.0 * point_noise(X, Y, 30.0, seed + 42)
    out = np.zeros(np.shape(X), np.float32)
    tot = np.zeros(np.shape(X), np.float32)
    for k in range(3):
        t = k * np.pi / 3
        wgt = np.maximum(np.cos(2 * (ang - t)), 0) ** 2
        m = wgt > 0.02
        c, s = np.cos(t), np.sin(t)
        u = wx[m] * c + wy[m] * s
        v = -wx[m] * s + wy[m] * c
        n = point_noise(u / 16.0, v / 1.7, 1.0, seed + 43 + k)
        n = 1 - np.abs(2 * n - 1)
        out[m] += wgt[m] * n * n
        tot[m] += wgt[m]
    fib = out / np.maximum(tot, 1e-6)
    return (fib * (0.5 + 0.5 * point_noise(X, Y, 9.0, seed + 44))).astype(np.float32)


def _chromatin(x0, y0, w, h, seed, p):
    """Chromatin texture (h, w) in about [-1, 1]: pixel noise (global pixel lattice) smoothed."""
    n = pixel_noise(x0 - 1, y0 - 1, h + 2, w + 2, seed)
    t = (n[1:-1, 1:-1] * 2 + n[:-2, 1:-1] + n[2:, 1:-1] + n[1:-1, :-2] + n[1:-1, 2:]) / 6.0
    amp = 1.0 / max(1.0, p / 0.5)
    return ((t - 0.5) * 4.5 * amp).astype(np.float32)


def _stamp_group(nuc, idx, cxp, cyp, p, w, h, tex, acc, lab):
    """Stamp nuclei ``idx`` (sorted by id) into the accumulators ``acc`` (flat arrays, in place).

    acc = [nucleus H, nucleus E, nucleus coverage, cytoplasm H, cytoplasm E, cytoplasm coverage].
    """
    H_s, E_s, A_s, CH_s, CE_s, CA_s = acc
    a = nuc["a"][idx] / p
    b = nuc["b"][idx] / p
    soft = np.float32(max(1.0, 0.6 / p))
    style = nuc["style"][idx]
    ext = _CYTO_EXT[style]
    half = int(np.ceil((a * ext).max() + 0.5 * soft + 0.5))
    S = 2 * half + 1
    cx, cy = cxp[idx], cyp[idx]
    ox = np.floor(cx).astype(np.int64) - half
    oy = np.floor(cy).astype(np.int64) - half
    ar = np.arange(S)
    px = ox[:, None] + ar[None, :]  # (N, S) column index of each stamp pixel
    py = oy[:, None] + ar[None, :]
    dx = (px + 0.5 - cx[:, None]).astype(np.float32)[:, None, :]
    dy = (py + 0.5 - cy[:, None]).astype(np.float32)[:, :, None]
    th = nuc["theta"][idx]
    co = np.cos(th)[:, None, None].astype(np.float32)
    si = np.sin(th)[:, None, None].astype(np.float32)
    a3, b3 = a[:, None, None].astype(np.float32), b[:, None, None].astype(np.float32)
    uu = dx * co + dy * si
    vv = dy * co - dx * si
    ua, vb = uu / a3, vv / b3
    d = np.sqrt(ua * ua + vb * vb)
    g = np.sqrt((ua / a3) ** 2 + (vb / b3) ** 2) / np.maximum(d, 1e-6)
    sd = (1 - d) / np.maximum(g, 1e-6)
    alpha = np.clip(0.5 + sd / soft, 0, 1)
    # keep the total coverage equal to the nucleus area when it is tiny (low-resolution levels)
    area = np.pi * a * b
    tot = alpha.sum((1, 2))
    alpha *= np.minimum(1.0, area / np.maximum(tot, 1e-6)).astype(np.float32)[:, None, None]
    ids = nuc["id"][idx]
    j1 = 0.85 + 0.3 * hash_id(ids, 1)
    hod = (_STYLE_H[style] * j1)[:, None, None]
    rim = _STYLE_RIM[style][:, None, None]
    prof = (1 - rim) + rim * 1.5 * _smoothstep(0.55, 1.0, d) - 0.1 * (style == sc.LYM)[:, None, None] * d * d
    inside_x = (px >= 0) & (px < w)
    inside_y = (py >= 0) & (py < h)
    valid = inside_y[:, :, None] & inside_x[:, None, :]
    flat = np.clip(py, 0, h - 1)[:, :, None] * w + np.clip(px, 0, w - 1)[:, None, :]
    t = tex[flat] * _STYLE_TEX[style][:, None, None]
    Hn = hod * prof * (1 + t)
    # nucleoli: 1-3 dark dots, mostly peripheral in centroblasts
    nn = _STYLE_NUCLEOLI[style]
    if nn.max() > 0:
        sig2 = np.float32((0.5 / p) ** 2 * 2)
        for k in range(3):
            has = (nn > k) & ((k == 0) | (hash_id(ids, 10 + k) < 0.55))
            if not has.any():
                continue
            ang = 2 * np.pi * hash_id(ids, 20 + k)
            rr = np.where(style == sc.CB, 0.55 + 0.25 * hash_id(ids, 30 + k), 0.15 * hash_id(ids, 30 + k))
            nu = (rr * np.cos(ang))[:, None, None] * a3
            nv = (rr * np.sin(ang))[:, None, None] * b3
            amp = np.where(has, np.where(style == sc.CB, 2.4, 1.0), 0).astype(np.float32)[:, None, None]
            Hn = Hn + amp * np.exp(-((uu - nu) ** 2 + (vv - nv) ** 2) / sig2)
    En = _STYLE_E[style][:, None, None] * (1 + 0.5 * t)
    al = alpha * valid
    m = al > 0
    fi = flat[m]
    wgt = al[m]
    npx = w * h
    A_s += np.bincount(fi, wgt, npx)
    H_s += np.bincount(fi, (wgt * Hn[m]), npx)
    E_s += np.bincount(fi, (wgt * En[m]), npx)
    if ext.max() > 1:
        e3 = ext[:, None, None]
        cw = _smoothstep(e3 + 0.12, e3 - 0.12, d) * (1 - alpha) * (e3 > 1) * valid
        ch = _CYTO_H[style][:, None, None] * (1 + 0.5 * t)
        # tingible bodies: dark apoptotic debris in some macrophages
        in_gc = nuc["region"][idx] == sc.R_GC
        tb = ((style == sc.HIST) & in_gc & (hash_id(ids, 40) < 0.7)).astype(np.float32)[:, None, None]
        if tb.any():
            for k in range(3):
                ang = 2 * np.pi * hash_id(ids, 41 + k)
                rr = 1.25 + 0.4 * hash_id(ids, 44 + k)
                nu = (rr * np.cos(ang))[:, None, None] * a3
                nv = (rr * np.sin(ang))[:, None, None] * b3
                ch = ch + tb * 3.0 * np.exp(-((uu - nu) ** 2 + (vv - nv) ** 2) / np.float32((0.6 / p) ** 2 * 2))
        mc = cw > 0
        fc = flat[mc]
        wc = cw[mc]
        CA_s += np.bincount(fc, wc, npx)
        CH_s += np.bincount(fc, wc * ch[mc], npx)
        CE_s += np.bincount(fc, wc * np.broadcast_to(_CYTO_E[style][:, None, None], cw.shape)[mc], npx)
    core = (d < 1) & valid
    lab[flat[core]] = np.broadcast_to(ids[:, None, None], core.shape)[core]


def _stamp_nuclei(scene, x0, y0, w, h, p):
    """Nuclear and cytoplasmic OD accumulators (6 flat float64 arrays) and labels for a region."""
    npx = w * h
    acc = [np.zeros(npx) for _ in range(6)]  # float64 (np.bincount); cast once by the caller
    lab = np.zeros(npx, np.int32)
    M = 20.0 + 2 * p
    nuc = sc.nuclei_in(scene, x0 * p - M, y0 * p - M, (x0 + w) * p + M, (y0 + h) * p + M)
    if nuc["x"].size:
        order = np.argsort(nuc["id"], kind="stable")
        nuc = {k: v[order] for k, v in nuc.items()}
        cxp = nuc["x"] / p - x0
        cyp = nuc["y"] / p - y0
        tex = _chromatin(x0, y0, w, h, scene.params["seed"] + 77, p).ravel()
        soft = max(1.0, 0.6 / p)
        # alpha > 0 up to soft/2 px outside the outline; pixel centres reach half - 0.5 px from cx
        half = np.ceil(nuc["a"] * _CYTO_EXT[nuc["style"]] / p + 0.5 * soft + 0.5).astype(int)
        # stamps of equal size together; a pixel's label goes to the last nucleus stamped there
        for hv in np.unique(half):
            idx = np.nonzero(half == hv)[0]
            for c0 in range(0, idx.size, 4000):
                _stamp_group(nuc, idx[c0 : c0 + 4000], cxp, cyp, p, w, h, tex, acc, lab)
    return [v.astype(np.float32).reshape(h, w) for v in acc], lab.reshape(h, w)


def render_region(scene, x0: int, y0: int, w: int, h: int, downsample: float = 1.0):
    """RGB uint8 (h, w, 3) and int32 instance labels (h, w) of a region of a pyramid level.

    (x0, y0) is the top-left pixel in the level whose pixels are ``downsample`` × level-0 pixels
    (level-0 pixel = ``scene.mpp`` µm). Label ids are the scene's nucleus ids (stable, > 0);
    a label covers the pixels whose centre lies inside the nucleus ellipse.
    """
    return _render(scene, x0, y0, w, h, downsample, True)


STAT_DOWNSAMPLE = 8  # from here on (≥ 4 µm/px at 0.5 µm/px) the writer paints nuclei statistically


def render_tile(scene, x0: int, y0: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
    """RGB uint8 (h, w, 3) for the slide writer.

    Below ``STAT_DOWNSAMPLE`` it equals ``render_region``; at coarser levels nuclei (≤ 1.5 px) are
    painted as their expected optical density from the scene's nucleus intensities, so the overview
    levels need no nuclei generated (same mean colour, no labels).
    """
    return _render(scene, x0, y0, w, h, downsample, downsample < STAT_DOWNSAMPLE)[0]


# mean nucleus area (µm²) and mean H profile factor per style, for the statistical overview levels
_STYLE_AREA = np.array([28.0, 72.5, 67.5, 30.0, 30.0, 37.5], np.float32)
_STYLE_PROF = np.array([0.95, 0.66, 0.83, 1.0, 1.0, 0.93], np.float32)


def _expected_nuclei(scene, x0, y0, w, h, p):
    """Expected nuclear / cytoplasmic OD and coverage per pixel (no individual nuclei)."""
    zero = np.zeros((h, w), np.float32)
    xs = (x0 + np.arange(w) + 0.5) * p
    ys = (y0 + np.arange(h) + 0.5) * p
    if not sc._tissue_in_rect(scene, xs[0] - 10, ys[0] - 10, xs[-1] + 10, ys[-1] + 10):
        return [zero] * 6
    X, Y = np.meshgrid(xs, ys)
    f = sc.fields(scene, X.ravel(), Y.ravel())
    near = f["tissue"] > 0
    out = [np.zeros(w * h, np.float32) for _ in range(6)]
    if near.any():
        fn = {k: v[near] for k, v in f.items()}
        lam, _ = sc.intensities(scene, X.ravel()[near], Y.ravel()[near], fn)
        lam = lam / (1 + 40.0 * lam.sum(1, keepdims=True))  # packing: realised < asked in dense areas
        la = (lam * _STYLE_AREA).astype(np.float32)
        cyto = la * (_CYTO_EXT**2 - 1)
        vals = [la @ (_STYLE_H * _STYLE_PROF), la @ _STYLE_E, la.sum(1), cyto @ _CYTO_H, cyto @ _CYTO_E, cyto.sum(1)]
        for o, v in zip(out, vals):
            o[near] = v
    speck = 0.7 + 0.6 * pixel_noise(x0, y0, h, w, scene.params["seed"] + 93).ravel()
    for k in (0, 1, 2):
        out[k] *= speck
    return [o.reshape(h, w) for o in out]


def _render(scene, x0, y0, w, h, downsample, exact):
    x0, y0, w, h = int(x0), int(y0), int(w), int(h)
    p = scene.mpp * float(downsample)
    Hb, Eb, cover = background(scene, x0, y0, w, h, p)
    if exact:
        (Hn, En, An, Hc, Ec, Ac), lab = _stamp_nuclei(scene, x0, y0, w, h, p)
    else:
        (Hn, En, An, Hc, Ec, Ac), lab = _expected_nuclei(scene, x0, y0, w, h, p), None
    Ac = np.minimum(Ac, 1) * cover
    Hb = Hb * (1 - Ac) + Hc
    Eb = Eb * (1 - Ac) + Ec
    keep = np.clip(1 - An, 0, 1)
    H = (Hb * keep + Hn) * np.float32(scene.params["h_scale"])
    E = (Eb * keep + En) * np.float32(scene.params["e_scale"])
    seed = scene.params["seed"]
    glass = GLASS_OD + 0.018 * (grid_noise((x0 + np.arange(w)) * p, (y0 + np.arange(h)) * p, 150.0, seed + 90) - 0.5)
    g = glass + (pixel_noise(x0, y0, h, w, seed + 91) - 0.5) * 0.02
    od = np.stack([H, E, g], -1) @ _OD_MATRIX  # (h, w, 3) optical density per channel
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= np.float32(I0)
    od += np.float32(0.5)
    return np.clip(od, 0, 255).astype(np.uint8), lab
