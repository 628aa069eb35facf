"""The vector scene: tissue outlines, structures, vessels and nuclei, all in µm.

Layout (tissue pieces, follicles, germinal centres, aggregates, lining, vessels) is drawn once
from the seed. Nuclei are generated lazily per square block of ``BLOCK_UM`` µm with a per-block
seed, so a 100,000² px scene never holds all its nuclei. Nuclei are packed without overlap across
block borders: blocks are coloured 2 × 2 and a block is packed after (and around the nuclei of)
its neighbours of lower colour, so every block depends on at most 3 levels of neighbours and the
result does not depend on the order in which blocks are asked for.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.spatial import cKDTree

from .noise import point_noise
from .shapes import Blob, random_blob

_LOCK = threading.Lock()  # guards the block caches (tiles may be rendered by threads)
BLOCK_UM = 256.0
MAX_PER_BLOCK = 4095  # ids: block_index * 4096 + k (k = 1..4095)

# nucleus styles (rendering) and the cell type each one is reported as
LYM, CB, HIST, FIB, ENDO, LINING = range(6)
STYLE_TYPE = np.array(["lymphocyte", "large", "large", "stromal", "stromal", "lining"])
CELL_TYPES = ("lymphocyte", "large", "stromal", "lining")
REGIONS = np.array(["", "lining", "aggregate", "follicle", "germinal_centre"])
R_NONE, R_LINING, R_AGG, R_FOLL, R_GC = range(5)

S_NOM = 8.5  # µm: nominal spacing of packed lymphocytes, for radial layers (DOMAIN §7.3)
_LAMBDA_MAX = 0.032  # /µm²: upper bound of the total nucleus intensity anywhere


@dataclass
class Structure:
    """One structure of the truth: ``kind`` in {follicle, germinal_centre, aggregate}."""

    kind: str
    blob: Blob
    grade: int | None = None
    layers: float | None = None
    has_gc: bool | None = None
    parent: int | None = None  # index of the follicle holding a germinal centre
    pole: tuple[float, float] = (0.0, 0.0)  # unit vector towards the capsule (GC light zone)


@dataclass
class Lining:
    """Lining layer on piece ``piece`` along the ellipse-frame angle arc [a0, a0 + span)."""

    piece: int
    a0: float
    span: float
    layers: int

    @property
    def thickness(self) -> float:
        """Band depth in µm (≈ 6.5 µm per cell layer)."""
        return self.layers * 6.5 + 1.5

    def on_arc(self, theta):
        return np.mod(theta - self.a0, 2 * np.pi) < self.span


@dataclass
class Scene:
    """A synthetic slide in µm. ``size`` px square at ``mpp`` µm/px; nuclei via ``nuclei_in``."""

    kind: str
    size: int
    seed: int
    mpp: float
    pieces: list[Blob]
    structures: list[Structure]
    linings: list[Lining]
    vessels: np.ndarray  # (n, 4): cx, cy, lumen radius, wall thickness (µm)
    params: dict
    cache_blocks: int = 256
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def width_um(self) -> float:
        return self.size * self.mpp

    @property
    def height_um(self) -> float:
        return self.size * self.mpp

    @property
    def n_blocks(self) -> int:
        return int(np.ceil(self.width_um / BLOCK_UM))

    def nuclei_in(self, x0: float, y0: float, x1: float, y1: float) -> dict:
        """All nuclei whose centroid lies in [x0, x1) × [y0, y1) µm, as a dict of arrays."""
        return nuclei_in(self, x0, y0, x1, y1)

    def iter_blocks(self):
        """Yield (i, j, nuclei) for every block, row by row (j = block row)."""
        n = self.n_blocks
        for j in range(n):
            for i in range(n):
                yield i, j, block_nuclei(self, i, j)


# ----------------------------------------------------------------------------------- layout


TREATMENTS = ("belimumab",)  # the treatment effects make_scene can build in


def make_scene(
    kind: str, size: int, seed: int, mpp: float = 0.5, section: int = 0, treatment: str | None = None
) -> Scene:
    """Lay out a synthetic ``kind`` slide ("lymph-node" or "synovium") of ``size``² px at ``mpp`` µm/px.

    ``section`` > 0 is another section of the same block: the same layout (tissue, structures,
    vessels) with its nuclei and textures drawn anew, as a follow-up biopsy of one patient's node.
    ``treatment="belimumab"`` (lymph node) builds in BAFF blockade (DOMAIN §3): a third of the
    follicles gone, the rest smaller and with a thinner mantle (:func:`shrink_follicles`). The
    defaults (section 0, no treatment) give the same scene as before these options existed.
    """
    if kind not in ("lymph-node", "synovium"):
        raise ValueError(f"unknown sample kind {kind!r}: expected 'lymph-node' or 'synovium'")
    if treatment is not None and (treatment not in TREATMENTS or kind != "lymph-node"):
        raise ValueError(f"unknown treatment {treatment!r} for {kind!r}: expected one of {TREATMENTS} (lymph node)")
    size, seed, mpp, section = int(size), int(seed), float(mpp), int(section)
    kcode = 1 if kind == "lymph-node" else 2
    rng = np.random.default_rng([seed, kcode, 1])
    W = size * mpp
    params = dict(
        h_scale=float(rng.uniform(0.88, 1.12)),
        e_scale=float(rng.uniform(0.85, 1.15)),
        seed=seed * 7919 + kcode + 104_729 * section,
        section=section,
        treatment=treatment,
    )
    if kind == "lymph-node":
        pieces, structs, linings, vessels = _layout_node(rng, W, params)
    else:
        pieces, structs, linings, vessels = _layout_synovium(rng, W, params)
    if treatment == "belimumab":
        structs = shrink_follicles(structs, np.random.default_rng([seed, kcode, 2]))
    nb = int(np.ceil(W / BLOCK_UM))
    return Scene(kind, size, seed, mpp, pieces, structs, linings, vessels, params, cache_blocks=max(64, 16 * (nb + 2)))


def shrink_follicles(
    structs: list[Structure], rng, drop: float = 1 / 3, follicle_scale: float = 0.75, gc_scale: float = 0.9
) -> list[Structure]:
    """Follicles after BAFF blockade (DOMAIN §3: fewer and smaller follicles, thinner mantle, the
    germinal centre changing less): each follicle is dropped with probability ``drop`` (with its
    germinal centre; at least one follicle stays), the others shrink about their centre to
    ``follicle_scale`` of their radius and their germinal centres to ``gc_scale``, so the mantle
    (follicle − GC) thins; a GC keeps its side of the follicle, its offset scaled with the mantle."""
    follicles = [i for i, s in enumerate(structs) if s.kind == "follicle"]
    gone = set(np.asarray(follicles)[rng.random(len(follicles)) < drop].tolist())
    if follicles and len(gone) == len(follicles):
        gone.discard(follicles[int(rng.integers(len(follicles)))])
    out: list[Structure] = []
    new_index: dict[int, int] = {}
    for i, s in enumerate(structs):
        if i in gone or (s.kind == "germinal_centre" and s.parent in gone):
            continue
        b = s.blob
        if s.kind == "follicle":
            blob = replace(b, ax=b.ax * follicle_scale, ay=b.ay * follicle_scale)
            new_index[i] = len(out)
            out.append(replace(s, blob=blob))
        elif s.kind == "germinal_centre":
            f = structs[s.parent].blob
            rf, rg = np.sqrt(f.ax * f.ay), np.sqrt(b.ax * b.ay)
            k = (follicle_scale * rf - gc_scale * rg) / max(rf - rg, 1e-9)  # mantle ratio: the GC's offset
            cx, cy = f.cx + (b.cx - f.cx) * k, f.cy + (b.cy - f.cy) * k
            blob = replace(b, cx=cx, cy=cy, ax=b.ax * gc_scale, ay=b.ay * gc_scale)
            out.append(replace(s, blob=blob, parent=new_index[s.parent]))
        else:
            out.append(s)
    return out


def _grid_ok(grid: dict, cell: float, x: float, y: float, r: float, gap: float) -> bool:
    """True if a disc (x, y, r) keeps ``gap`` µm from every disc in the spatial hash ``grid``."""
    i, j = int(x // cell), int(y // cell)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            for qx, qy, qr in grid.get((i + di, j + dj), ()):
                if (x - qx) ** 2 + (y - qy) ** 2 < (r + qr + gap) ** 2:
                    return False
    return True


def _grid_add(grid: dict, cell: float, x: float, y: float, r: float) -> None:
    grid.setdefault((int(x // cell), int(y // cell)), []).append((x, y, r))


def _clear_of(structs: list, x: np.ndarray, y: np.ndarray, margin: float) -> np.ndarray:
    """Points farther than ``margin`` µm outside every structure's enclosing circle."""
    if not structs or len(x) == 0:
        return np.ones(len(x), bool)
    c = np.array([(st.blob.cx, st.blob.cy) for st in structs])
    rr = np.array([st.blob.rmax for st in structs])
    k = min(8, len(structs))
    d, idx = cKDTree(c).query(np.stack([x, y], 1), k=k)
    d, idx = d.reshape(len(x), k), idx.reshape(len(x), k)
    return (d > rr[idx] + margin).all(1)


def _poly_area_mm2(blob: Blob) -> float:
    return blob.polygon(128).area / 1e6


def _layout_node(rng, W, params):
    L = W
    cx, cy = W * rng.uniform(0.47, 0.53), W * rng.uniform(0.47, 0.53)
    ax, ay = W * rng.uniform(0.40, 0.45), W * rng.uniform(0.30, 0.38)
    harm = tuple((k, rng.normal(0, 0.025 / k**0.8), rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    rot = rng.uniform(-0.35, 0.35)
    cut = None
    if rng.random() < 0.6:  # core-needle / knife edge through the cortex
        phi = rng.uniform(0, 2 * np.pi)
        n = np.array([np.cos(phi), np.sin(phi)])
        reach = abs(ax * np.cos(phi - rot)) + abs(ay * np.sin(phi - rot))
        d = rng.uniform(0.72, 0.88) * reach
        cut = (float(n[0]), float(n[1]), float(n[0] * cx + n[1] * cy + d))
    node = Blob(float(cx), float(cy), float(ax), float(ay), float(rot), harm, cut)
    params.update(
        capsule=float(rng.uniform(12, 24)),
        sinus=float(rng.uniform(8, 14)),
        medulla=float(rng.uniform(0.30, 0.42)),
    )
    rmin = float(np.clip(0.05 * L, 45, 100))
    rmax = float(np.clip(0.12 * L, 70, 450))
    perim = 2 * np.pi * np.sqrt((ax**2 + ay**2) / 2)
    n_target = int(np.clip(perim / (2.6 * (rmin + rmax) / 2), 3, 600))
    follicles: list[Structure] = []
    top = params["capsule"] + params["sinus"]
    grid: dict = {}
    cell = 2.6 * rmax + 20
    for _ in range(40 * n_target):
        if len(follicles) >= n_target:
            break
        r = rng.uniform(rmin, rmax)
        th = rng.uniform(-np.pi, np.pi)
        deep = r * rng.uniform(0.85, 1.1) + (rng.uniform(0, 0.9 * r) if rng.random() < 0.3 else 0)
        scale = np.hypot(ax * np.cos(th), ay * np.sin(th))
        rn = node.radius_n(np.array([th]))[0] - (top + deep) / scale
        if rn <= 0.2:
            continue
        u, v = rn * np.cos(th) * ax, rn * np.sin(th) * ay
        c, s = np.cos(rot), np.sin(rot)
        fx, fy = cx + u * c - v * s, cy + u * s + v * c
        if node.depth(fx, fy) < -0.35 * r:
            continue
        if not _grid_ok(grid, cell, fx, fy, 1.25 * r, 20):
            continue
        blob = random_blob(rng, fx, fy, r, aspect=rng.uniform(1.0, 1.3), rough=0.05, kmax=5)
        _grid_add(grid, cell, fx, fy, blob.rmax)
        out = np.array([fx - cx, fy - cy])
        out /= max(np.linalg.norm(out), 1e-9)
        follicles.append(Structure("follicle", blob, has_gc=False, pole=(float(out[0]), float(out[1]))))
    # germinal centres
    structs: list[Structure] = []
    n_f = len(follicles)
    want = rng.random(n_f) < 0.65
    if n_f and not want.any():
        want[int(rng.integers(n_f))] = True
    if n_f >= 3 and want.all():
        want[int(rng.integers(n_f))] = False
    for i, f in enumerate(follicles):
        rf = np.sqrt(f.blob.ax * f.blob.ay)
        structs.append(f)
        if not want[i]:
            continue
        rg = min(rf * rng.uniform(0.5, 0.68), rf - 20)
        if rg < 25:
            continue
        off = (rf - rg) * rng.uniform(0.2, 0.45)
        gx, gy = f.blob.cx - f.pole[0] * off, f.blob.cy - f.pole[1] * off
        g = random_blob(rng, gx, gy, rg, aspect=rng.uniform(1.0, 1.2), rough=0.04, kmax=4)
        f.has_gc = True
        structs.append(Structure("germinal_centre", g, parent=len(structs) - 1, pole=f.pole))
    # vessels: HEVs in the paracortex, larger ones in the medulla
    area = _poly_area_mm2(node) * 1e6
    nv = rng.poisson(area * 45e-6)
    vx = rng.uniform(cx - ax * 1.2, cx + ax * 1.2, nv * 2)
    vy = rng.uniform(cy - ax * 1.2, cy + ax * 1.2, nv * 2)
    keep = node.depth(vx, vy) > top + 25
    keep &= _clear_of(structs, vx, vy, 12)
    vx, vy = vx[keep][:nv], vy[keep][:nv]
    rho = _norm_radius(node, vx, vy)
    med = rho < params["medulla"]
    rl = np.where(med, rng.uniform(7, 18, vx.size), rng.uniform(3.5, 7, vx.size))
    wall = np.where(med, rng.uniform(3, 6, vx.size), rng.uniform(3.5, 5, vx.size))
    vessels = _non_overlapping(np.stack([vx, vy, rl, wall], 1))
    return [node], structs, [], vessels


def _norm_radius(blob: Blob, x, y):
    """ρ/r(θ): 0 at the centre, 1 on the curved outline."""
    u, v = blob._local(x, y)
    rho = np.hypot(u, v)
    inv = 1.0 / np.maximum(rho, 1e-12)
    return rho / blob._radius_cs(np.where(rho > 0, u * inv, 1.0), v * inv)


def _non_overlapping(v: np.ndarray) -> np.ndarray:
    if len(v) < 2:
        return v.reshape(-1, 4)
    keep = np.ones(len(v), bool)
    tree = cKDTree(v[:, :2])
    for i, j in tree.query_pairs(2 * (v[:, 2] + v[:, 3]).max() + 6, output_type="ndarray"):
        if keep[i] and keep[j]:
            if np.hypot(*(v[i, :2] - v[j, :2])) < v[i, 2] + v[i, 3] + v[j, 2] + v[j, 3] + 6:
                keep[j] = False
    return v[keep]


def _layout_synovium(rng, W, params):
    L = W
    n_pieces = int(rng.integers(1, 4)) if L >= 1500 else 1
    # one piece per cell of the slide split into strips
    vertical = rng.random() < 0.5
    pieces: list[Blob] = []
    for k in range(n_pieces):
        cw, ch = (L / n_pieces, L) if vertical else (L, L / n_pieces)
        ccx = (k + 0.5) * cw if vertical else L / 2
        ccy = L / 2 if vertical else (k + 0.5) * ch
        long_, short = max(cw, ch), min(cw, ch)
        rot = (np.pi / 2 if ch > cw else 0.0) + rng.uniform(-0.3, 0.3)
        ax = 0.40 * long_ * rng.uniform(0.8, 1.0)
        ay = min(0.40 * short * rng.uniform(0.75, 1.0), ax)
        r = np.sqrt(ax * ay)
        b = random_blob(
            rng,
            ccx + rng.normal(0, 0.03 * cw),
            ccy + rng.normal(0, 0.03 * ch),
            r,
            aspect=ax / ay,
            rot=rot,
            rough=0.06,
            kmax=7,
        )
        villi = tuple((k2, rng.normal(0, 0.012), rng.uniform(0, 2 * np.pi)) for k2 in range(9, 16, 2))
        pieces.append(Blob(b.cx, b.cy, b.ax, b.ay, b.rot, b.harm + villi))
    layers = int(rng.integers(1, 7))
    params.update(
        cellularity=float(rng.uniform(0.0014, 0.0032)),
        infiltrate=float(rng.uniform(0.5, 1.5)),
        layers=layers,
    )
    linings = []
    out = []
    for pi, b in enumerate(pieces):
        phi = rng.uniform(0, 2 * np.pi)  # ellipse-frame angle of the lining's middle
        span = rng.uniform(0.45, 0.7) * 2 * np.pi
        if rng.random() < 0.7:  # a cut edge opposite the lining
            th = phi + np.pi
            r = b.radius_n(np.array([th]))[0]
            u, v = r * np.cos(th) * b.ax, r * np.sin(th) * b.ay
            c, s = np.cos(b.rot), np.sin(b.rot)
            px, py = u * c - v * s, u * s + v * c
            n = np.array([px, py]) / np.hypot(px, py)
            d = rng.uniform(0.6, 0.8) * np.hypot(px, py)
            b = Blob(
                b.cx, b.cy, b.ax, b.ay, b.rot, b.harm, (float(n[0]), float(n[1]), float(n[0] * b.cx + n[1] * b.cy + d))
            )
            span = min(span, 0.5 * 2 * np.pi)
        out.append(b)
        lay = int(np.clip(layers + (rng.integers(-1, 2) if len(pieces) > 1 else 0), 1, 6))
        linings.append(Lining(pi, float(np.mod(phi - span / 2, 2 * np.pi)), float(span), lay))
    pieces = out
    # aggregates, graded by radial cell layers (DOMAIN §2, §7.3): G1 2-5, G2 6-10, G3 > 10
    area_mm2 = sum(_poly_area_mm2(p) for p in pieces)
    inf = params["infiltrate"]
    wanted = (
        [3] * max(1, rng.poisson(0.35 * area_mm2 * inf))
        + [2] * (1 + rng.poisson(1.2 * area_mm2 * inf))
        + [1] * (1 + rng.poisson(4.0 * area_mm2 * inf))
    )
    layer_range = {1: (3.0, 4.5), 2: (7.0, 9.0), 3: (12.5, 16.5)}
    structs: list[Structure] = []
    vessels = []
    areas = np.array([_poly_area_mm2(p) for p in pieces])
    grid: dict = {}
    cell = 2 * 16.5 * S_NOM * 1.4 + 40
    for grade in (3, 2, 1):
        n_want = wanted.count(grade)
        if n_want == 0:
            continue
        m = 40 * n_want + 100
        pi = rng.choice(len(pieces), m, p=areas / areas.sum())
        lay = rng.uniform(*layer_range[grade], m)
        r = lay * S_NOM
        u = rng.uniform(-1, 1, (m, 2))
        x = np.empty(m)
        y = np.empty(m)
        ok = np.zeros(m, bool)
        for k, b in enumerate(pieces):
            sel = pi == k
            x[sel] = b.cx + u[sel, 0] * b.rmax
            y[sel] = b.cy + u[sel, 1] * b.rmax
            ok[sel] = b.depth(x[sel], y[sel]) >= r[sel] + linings[k].thickness + 15
        placed = 0
        for k in np.nonzero(ok)[0]:
            if placed >= n_want:
                break
            if not _grid_ok(grid, cell, x[k], y[k], 1.35 * r[k], 40):
                continue
            blob = random_blob(rng, x[k], y[k], r[k], aspect=rng.uniform(1.0, 1.35), rough=0.06, kmax=5)
            _grid_add(grid, cell, x[k], y[k], blob.rmax)
            structs.append(Structure("aggregate", blob, grade=grade, layers=round(float(lay[k]), 1)))
            vessels.append(
                (
                    x[k] + rng.normal(0, 0.2 * r[k]),
                    y[k] + rng.normal(0, 0.2 * r[k]),
                    rng.uniform(5, 12),
                    rng.uniform(3, 6),
                )
            )
            placed += 1
    # vessels: denser under the lining
    for pi, b in enumerate(pieces):
        area = _poly_area_mm2(b) * 1e6
        n = rng.poisson(area * 160e-6)
        x = rng.uniform(b.cx - b.rmax, b.cx + b.rmax, n)
        y = rng.uniform(b.cy - b.rmax, b.cy + b.rmax, n)
        d = b.depth(x, y)
        t = linings[pi].thickness
        p = np.where(d > t + 12, np.where(d < t + 120, 0.6, 0.25), 0.0)
        keep = rng.random(n) < p
        keep &= _clear_of(structs, x, y, 5)
        k = int(keep.sum())
        rl = np.exp(rng.normal(np.log(6.5), 0.5, k)).clip(3, 30)
        wall = rl * rng.uniform(0.15, 0.5, k) + rng.uniform(1.5, 3, k)
        vessels += list(zip(x[keep], y[keep], rl, wall))
    vessels = _non_overlapping(np.array(vessels, np.float64).reshape(-1, 4))
    return pieces, structs, linings, vessels


# ----------------------------------------------------------------------------------- fields


def _select(items_bbox: np.ndarray, x, y, pad: float) -> np.ndarray:
    """Indices of items whose bbox (n, 4) intersects the points' bbox grown by ``pad`` µm."""
    if len(items_bbox) == 0:
        return np.zeros(0, int)
    x0, x1 = np.min(x) - pad, np.max(x) + pad
    y0, y1 = np.min(y) - pad, np.max(y) + pad
    b = items_bbox
    return np.nonzero((b[:, 0] <= x1) & (b[:, 2] >= x0) & (b[:, 1] <= y1) & (b[:, 3] >= y0))[0]


def _bboxes(scene: Scene, what: str) -> np.ndarray:
    key = "_bbox_" + what
    if key not in scene.params:
        if what == "pieces":
            bb = [p.bbox() for p in scene.pieces]
        elif what == "vessels":
            v = scene.vessels
            r = v[:, 2] + v[:, 3]
            bb = np.stack([v[:, 0] - r, v[:, 1] - r, v[:, 0] + r, v[:, 1] + r], 1) if len(v) else []
        else:
            bb = [s.blob.bbox() for s in scene.structures]
        scene.params[key] = np.asarray(bb, np.float64).reshape(-1, 4)
    return scene.params[key]


def fields(scene: Scene, x: np.ndarray, y: np.ndarray) -> dict:
    """Compartment fields at points (any equal shapes, µm) shared by nuclei and background.

    Keys: ``tissue`` depth in the tissue (µm, > 0 inside), ``surf`` depth below the nearest real
    (uncut) surface, ``lining`` (bool), ``foll`` / ``gc`` / ``agg``
    depth in the nearest such structure (µm, -inf far away), ``gc_t`` light-zone coordinate (-1..1),
    ``vdist`` distance to the nearest vessel lumen edge (µm, < 0 in the lumen), ``vwall`` its wall
    thickness, ``vang`` the vessel tangent angle, ``medulla`` (bool, lymph node).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    shp = np.broadcast(x, y).shape
    x, y = np.broadcast_to(x, shp), np.broadcast_to(y, shp)
    ninf = np.full(shp, -np.inf)
    f = dict(
        tissue=ninf.copy(),
        surf=np.full(shp, np.inf),
        lining=np.zeros(shp, bool),
        foll=ninf.copy(),
        gc=ninf.copy(),
        gc_t=np.zeros(shp),
        agg=ninf.copy(),
        vdist=np.full(shp, np.inf),
        vwall=np.zeros(shp),
        vang=np.zeros(shp),
        medulla=np.zeros(shp, bool),
    )
    if x.size == 0:
        return f
    for pi in _select(_bboxes(scene, "pieces"), x, y, 50):
        b = scene.pieces[pi]
        sd = b.surface_depth(x, y)
        cd = b.cut_depth(x, y)
        d = np.minimum(sd, cd)
        better = d > f["tissue"]
        f["tissue"] = np.where(better, d, f["tissue"])
        real = better & (sd <= cd)
        f["surf"] = np.where(better, np.where(sd <= cd, sd, np.inf), f["surf"])
        for lin in scene.linings:
            if lin.piece == pi:
                th = b.angle(x, y)
                f["lining"] |= real & lin.on_arc(th) & (sd < lin.thickness) & (sd > -2)
        if scene.kind == "lymph-node":
            f["medulla"] |= better & (_norm_radius(b, x, y) < scene.params["medulla"])
    bbs = _bboxes(scene, "structs")
    for si in _select(bbs, x, y, 30):
        s = scene.structures[si]
        bx0, by0, bx1, by1 = bbs[si]
        sel = (x >= bx0 - 30) & (x <= bx1 + 30) & (y >= by0 - 30) & (y <= by1 + 30)
        if not sel.any():
            continue
        xs_, ys_ = x[sel], y[sel]
        d = s.blob.depth(xs_, ys_)
        if s.kind == "follicle":
            f["foll"][sel] = np.maximum(f["foll"][sel], d)
        elif s.kind == "aggregate":
            f["agg"][sel] = np.maximum(f["agg"][sel], d)
        else:
            cur = f["gc"][sel]
            inside = d > cur
            f["gc"][sel] = np.where(inside, d, cur)
            r = np.sqrt(s.blob.ax * s.blob.ay)
            t = ((xs_ - s.blob.cx) * s.pole[0] + (ys_ - s.blob.cy) * s.pole[1]) / r
            f["gc_t"][sel] = np.where(inside, t, f["gc_t"][sel])
    vbb = _bboxes(scene, "vessels")
    for vi in _select(vbb, x, y, 30):
        vx, vy, rl, wall = scene.vessels[vi]
        bx0, by0, bx1, by1 = vbb[vi]
        sel = (x >= bx0 - 30) & (x <= bx1 + 30) & (y >= by0 - 30) & (y <= by1 + 30)
        if not sel.any():
            continue
        xs_, ys_ = x[sel], y[sel]
        dist = np.hypot(xs_ - vx, ys_ - vy) - rl
        cur = f["vdist"][sel]
        closer = dist < cur
        f["vdist"][sel] = np.where(closer, dist, cur)
        f["vwall"][sel] = np.where(closer, wall, f["vwall"][sel])
        f["vang"][sel] = np.where(closer, np.arctan2(ys_ - vy, xs_ - vx) + np.pi / 2, f["vang"][sel])
    return f


def medullary_sinus(scene: Scene, x, y):
    """True where the lymph-node medulla has a sinus (pale, few cells) rather than a cord."""
    sd = scene.params["seed"]
    u = 0.8 * np.asarray(x) + 0.6 * np.asarray(y)  # rotated lattice: no axis-aligned blocks
    v = -0.6 * np.asarray(x) + 0.8 * np.asarray(y)
    n = 0.65 * point_noise(x, y, 45.0, sd + 3) + 0.35 * point_noise(u, v, 17.0, sd + 4)
    return n < 0.44


def fibre_angle(scene: Scene, x, y):
    """Local collagen fibre direction (rad), a slowly varying field."""
    s = scene.params["seed"]
    return np.pi * 2.0 * point_noise(x, y, 220.0, s + 17) + 1.3 * point_noise(x, y, 60.0, s + 18)


def intensities(scene: Scene, x, y, f: dict | None = None):
    """Nucleus intensity per style (n, 6) in nuclei/µm² at points, and the fields used."""
    if f is None:
        f = fields(scene, x, y)
    n = np.shape(x)[0]
    lam = np.zeros((n, 6))
    inside = f["tissue"] > 0
    seed = scene.params["seed"]
    vd, vw = f["vdist"], f["vwall"]
    lumen = vd < 0
    endo = (vd >= 0) & (vd < 2.5)
    media = (vd >= 2.5) & (vd < vw)
    if scene.kind == "lymph-node":
        P = scene.params
        s = f["surf"]
        caps = s < P["capsule"]
        sinus = ~caps & (s < P["capsule"] + P["sinus"])
        foll = f["foll"] > 0
        gc = f["gc"] > 0
        med = f["medulla"] & ~foll
        msinus = med & medullary_sinus(scene, x, y)
        # paracortex (default), mottled by pale histiocytes
        lam[:, LYM] = 0.012
        lam[:, HIST] = 0.0006
        lam[:, CB] = 0.00015
        lam[:, FIB] = 0.0002
        lam[med, LYM] = 0.009
        lam[msinus, LYM] = 0.0012
        lam[msinus, HIST] = 0.0009
        mantle = foll & ~gc
        lam[mantle, LYM] = 0.026
        lam[mantle, HIST] = 0.0
        lam[mantle, CB] = 0.0001
        # GC: dark zone (centroblasts) away from the capsule, light zone (centrocytes) towards it
        light = np.clip(0.5 + 0.6 * f["gc_t"], 0, 1)
        lam[gc, CB] = (0.0056 - 0.0026 * light)[gc]
        lam[gc, LYM] = (0.0038 + 0.0032 * light)[gc]
        lam[gc, HIST] = 0.00045
        lam[sinus & ~foll] = 0
        lam[sinus & ~foll, LYM] = 0.0015
        lam[sinus & ~foll, HIST] = 0.0007
        lam[caps] = 0
        lam[caps, FIB] = 0.0035
    else:
        P = scene.params
        s = f["surf"]
        cell = P["cellularity"] * (0.5 + point_noise(x, y, 70.0, seed + 5))
        lam[:, FIB] = cell
        lam[:, LYM] = 0.00015 * P["infiltrate"]
        lam[:, HIST] = 0.00015
        sub = (s < 80) & ~f["lining"]
        lam[sub, FIB] *= 1.3
        lam[sub, HIST] = 0.0003
        lam[sub, LYM] += 0.0003 * P["infiltrate"]
        peri = (vd > 0) & (vd < 25)
        lam[peri, LYM] += 0.0012 * P["infiltrate"]
        a = f["agg"]
        halo = (a > -30) & (a <= 0)
        lam[halo, LYM] += 0.0035 * (1 + a[halo] / 30)
        agg = a > 0
        lam[agg, LYM] = 0.0128 + 0.002 * np.clip(a[agg] / 40, 0, 1)
        lam[agg, CB] = 0.0002
        lam[agg, HIST] = 0.00015
        lam[agg, FIB] = 0.0001
        lin = f["lining"]
        lam[lin] = 0
        lam[lin, LINING] = 0.0125
        lam[lin, LYM] = 0.0003
    lam[media] = 0
    lam[media & (vw > 4), FIB] = 0.012
    lam[endo] = 0
    lam[endo, ENDO] = 0.028
    lam[lumen] = 0
    lam[~inside] = 0
    return lam, f


# ----------------------------------------------------------------------------------- nuclei


def _sizes(rng, style: np.ndarray):
    """Semi-axes a ≥ b (µm) per style (areas from DOMAIN.md §3)."""
    n = style.size
    area = np.empty(n)
    ratio = np.empty(n)
    m = style == LYM
    area[m] = np.clip(rng.normal(28.0, 2.6, m.sum()), 21, 36)
    ratio[m] = rng.uniform(1.0, 1.15, m.sum())
    m = style == CB
    area[m] = rng.uniform(55, 90, m.sum())
    ratio[m] = rng.uniform(1.0, 1.3, m.sum())
    m = style == HIST
    area[m] = rng.uniform(50, 85, m.sum())
    ratio[m] = rng.uniform(1.15, 1.6, m.sum())
    m = style == LINING
    area[m] = rng.uniform(30, 45, m.sum())
    ratio[m] = rng.uniform(1.3, 1.7, m.sum())
    m = (style == FIB) | (style == ENDO)
    length = rng.uniform(8, 14, m.sum())
    r = rng.uniform(2.5, 4.0, m.sum())
    a = length / 2
    area[m] = np.pi * a * (a / r)
    ratio[m] = r
    a = np.sqrt(area * ratio / np.pi)
    b = a / ratio
    return a, b


def _reff(style, a, b):
    return np.where((style == FIB) | (style == ENDO), 0.5 * (a + b), np.sqrt(a * b))


def surface_tangent(scene: Scene, x, y):
    """Direction (rad) of the nearest piece outline at points, from the depth gradient."""
    best = np.full(np.shape(x), -np.inf)
    out = np.zeros(np.shape(x))
    for b in scene.pieces:
        d = b.surface_depth(x, y)
        gx = b.surface_depth(x + 0.5, y) - b.surface_depth(x - 0.5, y)
        gy = b.surface_depth(x, y + 0.5) - b.surface_depth(x, y - 0.5)
        better = d > best
        best = np.where(better, d, best)
        out = np.where(better, np.arctan2(gy, gx) + np.pi / 2, out)
    return out


def _orient(scene, x, y, style, f, rng):
    th = rng.uniform(0, np.pi, x.size)
    m = (style == FIB) | (style == LINING)
    if m.any():
        th[m] = fibre_angle(scene, x[m], y[m])
        near = m & ((f["surf"] < 40) | f["lining"])
        if near.any():
            th[near] = surface_tangent(scene, x[near], y[near]) + rng.normal(0, 0.15, near.sum())
    m = (style == ENDO) | ((style == FIB) & (f["vdist"] < f["vwall"] + 2))
    th[m] = f["vang"][m] + rng.normal(0, 0.1, m.sum())
    return th


def _conflicts(px, py, pr, qx, qy, qr, tol):
    """For each p, True if it overlaps a q: centre distance < tol·(r_p + r_q)."""
    if len(qx) == 0 or len(px) == 0:
        return np.zeros(len(px), bool)
    tree = cKDTree(np.stack([qx, qy], 1))
    k = min(8, len(qx))
    d, idx = tree.query(np.stack([px, py], 1), k=k, distance_upper_bound=tol * (pr.max() + qr.max()))
    d = d.reshape(len(px), k)
    idx = idx.reshape(len(px), k)
    ok = np.isfinite(d)
    rq = np.where(ok, qr[np.minimum(idx, len(qr) - 1)], 0)
    return (ok & (d < tol * (pr[:, None] + rq))).any(1)


def _empty():
    return dict(
        id=np.zeros(0, np.int32),
        x=np.zeros(0),
        y=np.zeros(0),
        a=np.zeros(0, np.float32),
        b=np.zeros(0, np.float32),
        theta=np.zeros(0, np.float32),
        style=np.zeros(0, np.int8),
        region=np.zeros(0, np.int8),
    )


def _tissue_in_rect(scene, x0, y0, x1, y1) -> bool:
    bb = _bboxes(scene, "pieces")
    return bool(((bb[:, 0] <= x1) & (bb[:, 2] >= x0) & (bb[:, 1] <= y1) & (bb[:, 3] >= y0)).any())


def block_nuclei(scene: Scene, i: int, j: int) -> dict:
    """Nuclei whose centroid lies in block (i, j) (µm square of side BLOCK_UM), cached (LRU)."""
    key = (i, j)
    c = scene._cache
    with _LOCK:
        if key in c:
            c.move_to_end(key)
            return c[key]
    out = _make_block(scene, i, j)  # deterministic: two threads may both make it, harmlessly
    with _LOCK:
        c[key] = out
        while len(c) > scene.cache_blocks:
            c.popitem(last=False)
    return out


TOL = 0.9  # allowed overlap: centres at least 0.9 × (r1 + r2) apart
ROUNDS = 12
MARGIN = 20.0  # µm: neighbours' nuclei within this distance of a block constrain it


def _make_block(scene: Scene, i: int, j: int) -> dict:
    B = BLOCK_UM
    n = scene.n_blocks
    x0, y0 = i * B, j * B
    x1, y1 = min(x0 + B, scene.width_um), min(y0 + B, scene.height_um)
    if not _tissue_in_rect(scene, x0 - MARGIN, y0 - MARGIN, x1 + MARGIN, y1 + MARGIN):
        return _empty()
    colour = (i & 1) + 2 * (j & 1)
    ex, ey, er = [], [], []
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            ni, nj = i + di, j + dj
            if (di or dj) and 0 <= ni < n and 0 <= nj < n and (ni & 1) + 2 * (nj & 1) < colour:
                nb = block_nuclei(scene, ni, nj)
                m = (
                    (nb["x"] > x0 - MARGIN)
                    & (nb["x"] < x1 + MARGIN)
                    & (nb["y"] > y0 - MARGIN)
                    & (nb["y"] < y1 + MARGIN)
                )
                ex.append(nb["x"][m])
                ey.append(nb["y"][m])
                er.append(_reff(nb["style"][m], nb["a"][m], nb["b"][m]))
    ex = np.concatenate(ex) if ex else np.zeros(0)
    ey = np.concatenate(ey) if ey else np.zeros(0)
    er = np.concatenate(er) if er else np.zeros(0)
    kcode = 1 if scene.kind == "lymph-node" else 2
    rng = np.random.default_rng([scene.seed, kcode, 2, i, j])
    area = (x1 - x0) * (y1 - y0)
    m = rng.poisson(_LAMBDA_MAX * area)
    cx = rng.uniform(x0, x1, m)
    cy = rng.uniform(y0, y1, m)
    lam, _ = intensities(scene, cx, cy)
    lam_all = lam
    tot = lam.sum(1)
    lam = lam / np.maximum(1.0, tot / _LAMBDA_MAX)[:, None]
    cum = np.cumsum(lam, 1) / _LAMBDA_MAX
    u = rng.random(m)
    style = (u[:, None] >= cum).sum(1)
    keep = style < 6
    cx, cy, style = cx[keep], cy[keep], style[keep].astype(np.int8)
    lam_s = lam_all[keep, style]  # intensity of each candidate's own style where it stands
    a, b = _sizes(rng, style)
    r = _reff(style, a, b)
    prio = r + rng.random(style.size)  # large nuclei first (like random sequential adsorption)
    order = np.argsort(-prio, kind="stable")
    cx, cy, style, a, b, r = cx[order], cy[order], style[order], a[order], b[order], r[order]
    lam_s = lam_s[order]
    acc = np.zeros(cx.size, bool)
    ax_, ay_, ar_ = ex, ey, er
    pend = np.arange(cx.size)
    for rnd in range(ROUNDS):
        if pend.size == 0:
            break
        px, py, pr = cx[pend], cy[pend], r[pend]
        bad = _conflicts(px, py, pr, ax_, ay_, ar_, TOL)
        # conflicts inside the round: the earlier (higher-priority) candidate wins
        if pend.size > 1:
            tree = cKDTree(np.stack([px, py], 1))
            pairs = tree.query_pairs(TOL * 2 * pr.max(), output_type="ndarray")
            if len(pairs):
                p0, p1 = pairs.min(1), pairs.max(1)
                d = np.hypot(px[p0] - px[p1], py[p0] - py[p1])
                hit = d < TOL * (pr[p0] + pr[p1])
                hit &= ~bad[p0]
                bad[p1[hit]] = True
                # a second pass lets a loser's loser back in only next round (kept simple)
        good = pend[~bad]
        acc[good] = True
        ax_ = np.concatenate([ax_, cx[good]])
        ay_ = np.concatenate([ay_, cy[good]])
        ar_ = np.concatenate([ar_, r[good]])
        pend = pend[bad]
        if rnd == ROUNDS - 1 or pend.size == 0:
            break
        # move the rejected ones a little, keeping them where their style belongs
        nx = np.clip(cx[pend] + rng.normal(0, 3.0, pend.size), x0, np.nextafter(x1, x0))
        ny = np.clip(cy[pend] + rng.normal(0, 3.0, pend.size), y0, np.nextafter(y1, y0))
        lam_new, _ = intensities(scene, nx, ny)
        st = style[pend].astype(int)
        new = lam_new[np.arange(pend.size), st]
        ratio = new / np.maximum(lam_s[pend], 1e-12)
        move = rng.random(pend.size) < ratio
        cx[pend[move]] = nx[move]
        cy[pend[move]] = ny[move]
        lam_s[pend[move]] = new[move]
    idx = np.nonzero(acc)[0][:MAX_PER_BLOCK]
    x, y, style, a, b = cx[idx], cy[idx], style[idx], a[idx], b[idx]
    f = fields(scene, x, y)
    theta = _orient(scene, x, y, style, f, rng)
    region = np.zeros(x.size, np.int8)
    region[f["lining"]] = R_LINING
    region[f["agg"] > 0] = R_AGG
    region[f["foll"] > 0] = R_FOLL
    region[f["gc"] > 0] = R_GC
    base = (j * n + i) * (MAX_PER_BLOCK + 1)
    return dict(
        id=(base + 1 + np.arange(x.size)).astype(np.int32),
        x=x,
        y=y,
        a=a.astype(np.float32),
        b=b.astype(np.float32),
        theta=np.mod(theta, np.pi).astype(np.float32),
        style=style,
        region=region,
    )


def nuclei_in(scene: Scene, x0: float, y0: float, x1: float, y1: float) -> dict:
    """Nuclei with centroid in [x0, x1) × [y0, y1) µm, concatenated from the blocks there."""
    B = BLOCK_UM
    n = scene.n_blocks
    i0, i1 = max(0, int(np.floor(x0 / B))), min(n - 1, int(np.floor(x1 / B)))
    j0, j1 = max(0, int(np.floor(y0 / B))), min(n - 1, int(np.floor(y1 / B)))
    parts = []
    for j in range(j0, j1 + 1):
        for i in range(i0, i1 + 1):
            nb = block_nuclei(scene, i, j)
            if nb["x"].size:
                parts.append(nb)
    if not parts:
        return _empty()
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    m = (out["x"] >= x0) & (out["x"] < x1) & (out["y"] >= y0) & (out["y"] < y1)
    return {k: v[m] for k, v in out.items()}


def cell_type(style: np.ndarray) -> np.ndarray:
    """Truth cell type words for style codes."""
    return STYLE_TYPE[style]
