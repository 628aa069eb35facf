"""Neighbourhood statistics over the cells, per slide and per region: squidpy's statistics, with the
ones that cost more than linear time in squidpy (centralities through networkx, co-occurrence and
Ripley over all pairs) recomputed here from sparse matrices and KD-trees, same numbers.

One spatial graph over all cells, in µm: a Delaunay triangulation with edges longer than
``max_edge_um`` cut, or every pair closer than ``max_edge_um`` (``graph: radius``). A region uses
that graph's edges between its own cells. For the slide (``region_id`` ``slide``) and every region
of the chosen kinds with ≥ ``min_cells`` cells: neighbourhood enrichment z-scores, the interaction
matrix (edge counts), centrality scores per cell type, Moran's I of chosen features, and, on a
seeded sample of ≤ ``max_cells`` cells (squidpy's cost was quadratic in cells, STACK.md; here it
grows with the pairs closer than the largest distance), co-occurrence ratios and Ripley's L. Matrices are
indexed by the slide's cell types in one order (NaN where a region lacks a type). Results are arrays and
DataFrames that AnnData writes to ``uns``; :func:`neighbourhood_metrics` flattens them into named metric columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sps
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import ConvexHull, cKDTree

from histo.config import Section, build
from histo.errors import WorkflowError
from histo.structures.metrics import CELL_TYPES
from histo.structures.regions import KINDS

if TYPE_CHECKING:  # anndata and squidpy are imported where used: loading a workflow must stay light
    import anndata as ad

GRAPHS = ("delaunay", "radius")
# statistics between cell types: skipped (and the reason recorded) in a region of one type, where squidpy
# raises or their value means nothing
CENTRALITIES = ("degree_centrality", "average_clustering", "closeness_centrality")  # squidpy's column names
PAIR_STATS = ("nhood_enrichment", "interaction_matrix", "centrality_scores", "co_occurrence")


@dataclass(frozen=True)
class NhoodEnrichment(Section):
    """``neighbourhood.nhood_enrichment``: squidpy's neighbourhood enrichment z-scores."""

    run: bool = True
    n_perms: int = 100  # label permutations for the z-scores

    RANGES: ClassVar = {"n_perms": (1, 100_000)}


@dataclass(frozen=True)
class InteractionMatrix(Section):
    """``neighbourhood.interaction_matrix``: graph edges between cell types."""

    run: bool = True


@dataclass(frozen=True)
class CentralityScores(Section):
    """``neighbourhood.centrality_scores``: degree, clustering and closeness per cell type
    (:func:`centrality_scores`)."""

    run: bool = True
    max_cells: int = 2_000_000  # larger regions skipped (NaN): sparse breadth-first searches, ~linear in cells
    #   (bench/neighbourhood_scale.py, quiet, 2 cores: 7.1 s summed over 50 regions for 1,000,000 cells)


@dataclass(frozen=True)
class CoOccurrence(Section):
    """``neighbourhood.co_occurrence``: KD-tree pair counts (:func:`co_occurrence`) on a seeded sample of
    ≤ ``max_cells`` per region (its size recorded)."""

    run: bool = True
    max_um: float = 200.0  # µm, the largest distance: 10, 20, … 200 µm
    step_um: float = 10.0  # µm
    max_cells: int = 20_000  # seeded sample per region

    RANGES: ClassVar = {"max_um": (0.1, 1e4), "step_um": (0.1, 1e4), "max_cells": (2, 200_000)}


@dataclass(frozen=True)
class Ripley(Section):
    """``neighbourhood.ripley``: Ripley's L per cell type (:func:`_ripley`); memory ≈ (n²/2)·(8 + n_steps)
    bytes for n cells of one type."""

    run: bool = True
    max_um: float = 100.0  # µm
    n_steps: int = 21  # distances 0 … max_um
    max_cells: int = 10_000  # seeded sample per region (size recorded)

    RANGES: ClassVar = {"max_um": (0.1, 1e4), "n_steps": (2, 1000), "max_cells": (2, 100_000)}


@dataclass(frozen=True)
class Moran(Section):
    """``neighbourhood.moran``: Moran's I on the graph; features the cells table lacks are skipped."""

    run: bool = True
    features: list[str] = field(default_factory=lambda: ["area_um2", "hematoxylin_od", "eccentricity"])


@dataclass(frozen=True)
class NeighbourhoodParams(Section):
    """The ``neighbourhood:`` section of a workflow: Squidpy statistics per slide and per region
    (:func:`neighbourhood_stats`)."""

    run: bool = True
    graph: str = "delaunay"  # delaunay: its edges ≤ max_edge_um | radius: all pairs ≤ max_edge_um
    max_edge_um: float = 30.0  # µm; cuts Delaunay edges across gaps and tissue pieces
    kinds: list[str] = field(
        default_factory=lambda: ["tissue", "follicle", "aggregate", "annotation"]
    )  # region kinds analysed, besides the slide
    min_cells: int = 50  # regions with fewer cells are skipped
    seed: int = 0  # permutations, samples and simulations: same input + seed = same numbers
    nhood_enrichment: NhoodEnrichment = field(default_factory=NhoodEnrichment)
    interaction_matrix: InteractionMatrix = field(default_factory=InteractionMatrix)
    centrality_scores: CentralityScores = field(default_factory=CentralityScores)
    co_occurrence: CoOccurrence = field(default_factory=CoOccurrence)
    ripley: Ripley = field(default_factory=Ripley)
    moran: Moran = field(default_factory=Moran)

    RANGES: ClassVar = {"max_edge_um": (0.1, 1e4)}

    def validated(self, path: str) -> NeighbourhoodParams:
        """Itself; WorkflowError for an unknown ``graph`` or region kind."""
        if self.graph not in GRAPHS:
            raise WorkflowError(path, f"'neighbourhood.graph' must be one of {', '.join(GRAPHS)}, got {self.graph!r}")
        if unknown := sorted(set(self.kinds) - set(KINDS)):
            raise WorkflowError(
                path, f"'neighbourhood.kinds': unknown region kind {unknown[0]!r} (kinds: {', '.join(KINDS)})"
            )
        return self


def nhood_params(params: NeighbourhoodParams | dict | None = None) -> NeighbourhoodParams:
    """The workflow's ``neighbourhood`` section: ``params`` checked, a mapping (overrides of the
    defaults) built by :func:`histo.config.build`, None the defaults."""
    where = "<neighbourhood parameters>"
    if isinstance(params, NeighbourhoodParams):
        return params.validated(where)
    return build(NeighbourhoodParams, params or {}, "neighbourhood", where)


def cell_type_order(cells: pd.DataFrame) -> list[str]:
    """The cell types of ``cells`` in the order every matrix uses: CELL_TYPES order, then others sorted."""
    present = set(cells["cell_type"].astype(str))
    return [t for t in CELL_TYPES if t in present] + sorted(present - set(CELL_TYPES))


def cells_adata(cells: pd.DataFrame, params: NeighbourhoodParams) -> ad.AnnData:
    """AnnData of the cells (obs: ``cell_type`` categorical in :func:`cell_type_order`, the
    ``<kind>_id`` columns of ``params.kinds`` and the Moran features; ``obsm["spatial"]`` in µm)
    with the spatial graph in ``obsp``; ``params`` checked by :func:`nhood_params`."""
    obs = (
        cells[_obs_columns(cells, params)]
        .reset_index(drop=True)
        .assign(cell_type=pd.Categorical(cells["cell_type"].astype(str).to_numpy(), categories=cell_type_order(cells)))
    )
    obs.index = obs.index.astype(str)
    import anndata as ad
    import squidpy as sq

    adata = ad.AnnData(obs=obs, obsm={"spatial": cells[["x_um", "y_um"]].to_numpy(np.float64)})
    graph = sq.gr.spatial_neighbors_delaunay if params.graph == "delaunay" else sq.gr.spatial_neighbors_radius
    graph(adata, radius=float(params.max_edge_um))
    return adata


def input_columns(cells: pd.DataFrame, params: NeighbourhoodParams | dict | None = None) -> list[str]:
    """The columns of ``cells`` that :func:`neighbourhood_stats` reads: ``x_um``, ``y_um``,
    ``cell_type``, the ``<kind>_id`` columns and the Moran features."""
    return ["x_um", "y_um", "cell_type", *_obs_columns(cells, nhood_params(params))]


def _obs_columns(cells: pd.DataFrame, params: NeighbourhoodParams) -> list[str]:
    """The ``<kind>_id`` columns of ``params.kinds`` that ``cells`` has, and its Moran features."""
    return [f"{k}_id" for k in params.kinds if f"{k}_id" in cells] + _features(cells, params)


def _features(table: pd.DataFrame, params: NeighbourhoodParams) -> list[str]:
    """The Moran features that the cells table has (IF and IHC tables lack the H&E ones)."""
    return [f for f in params.moran.features if f in table.columns] if params.moran.run else []


def _sample(adata: ad.AnnData, max_cells: int, seed: int) -> ad.AnnData:
    """A seeded random subset of ≤ ``max_cells`` cells (all cells when fewer), types re-counted."""
    if adata.n_obs <= max_cells:
        return adata
    keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
    sub = adata[keep].copy()
    sub.obs["cell_type"] = sub.obs["cell_type"].cat.remove_unused_categories()
    return sub


def _square(values: np.ndarray, present: list[str], types: list[str]) -> np.ndarray:
    """A (present × present [× …]) array placed into (types × types [× …]), NaN elsewhere."""
    values = np.asarray(values, np.float64)
    out = np.full((len(types), len(types), *values.shape[2:]), np.nan)
    idx = [types.index(t) for t in present]
    out[np.ix_(idx, idx)] = values
    return out


def region_stats(adata: ad.AnnData, types: list[str], params: NeighbourhoodParams) -> dict:
    """The statistics of one region's cells (an AnnData with its graph, :func:`cells_adata`; its obs
    is modified).

    Keys (µm; matrices over ``types``): ``n_cells``; ``nhood_zscore``, ``nhood_count``;
    ``interaction`` (graph edges between types); ``centrality`` (types × degree, clustering,
    closeness: :func:`centrality_scores`; NaN above ``centrality_scores.max_cells``);
    ``co_occurrence`` (types × types × distances: P(b within d of a) / P(b), :func:`co_occurrence`),
    ``co_occurrence_um``, ``co_occurrence_n_cells`` (sample
    size); ``ripley_L`` (types × distances, per-type L whose complete spatial randomness value is d),
    ``ripley_um``, ``ripley_n_cells``; ``moran_I`` (per ``moran_features``); ``skipped``
    ({statistic: reason}, only when some were: :data:`PAIR_STATS` in a region of one cell type, Moran's
    I in a region without graph edges).
    """
    import squidpy as sq

    p, seed = params, params.seed
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.remove_unused_categories()
    present = list(adata.obs["cell_type"].cat.categories)
    out: dict = {"n_cells": int(adata.n_obs)}
    skipped = {
        s: f"needs 2 cell types, the region has {len(present)} ({', '.join(present)})"
        for s in PAIR_STATS
        if getattr(p, s).run and len(present) < 2
    }
    if p.moran.run and adata.obsp["spatial_connectivities"].nnz == 0:
        skipped["moran"] = "no graph edge between the region's cells"
    p = p.replace(**{s: getattr(p, s).replace(run=False) for s in skipped})
    if skipped:
        out["skipped"] = skipped
    if p.nhood_enrichment.run:
        z, count = sq.gr.nhood_enrichment(
            adata,
            "cell_type",
            n_perms=p.nhood_enrichment.n_perms,
            seed=seed,
            copy=True,
            n_jobs=1,
            show_progress_bar=False,
        )
        z = np.where(np.isfinite(z), z, np.nan)  # a type whose neighbours never vary under permutation
        out |= {"nhood_zscore": _square(z, present, types), "nhood_count": _square(count, present, types)}
    if p.interaction_matrix.run:
        out["interaction"] = _square(_interaction(adata), present, types)
    if p.centrality_scores.run:
        if adata.n_obs <= p.centrality_scores.max_cells:
            out["centrality"] = centrality_scores(adata).reindex(types)
        else:
            out["centrality"] = pd.DataFrame(np.nan, index=types, columns=list(CENTRALITIES))
    if p.co_occurrence.run:
        c = p.co_occurrence
        sub = _sample(adata, c.max_cells, seed)
        interval = np.arange(0.0, c.max_um + c.step_um / 2, c.step_um).astype(np.float32)  # as squidpy
        occ = co_occurrence(sub, interval)
        out |= {
            "co_occurrence": _square(occ, list(sub.obs["cell_type"].cat.categories), types),
            "co_occurrence_um": interval[1:].astype(np.float64),
            "co_occurrence_n_cells": int(sub.n_obs),
        }
    if p.ripley.run:
        out |= _ripley(_sample(adata, p.ripley.max_cells, seed), types, p.ripley)
    if p.moran.run:
        feats = _features(adata.obs, p)
        out["moran_features"] = np.asarray(feats, dtype=str)
        out["moran_I"] = _moran(adata, feats, seed) if feats else np.zeros(0)
    return out


def centrality_scores(adata: ad.AnnData) -> pd.DataFrame:
    """Squidpy's ``centrality_scores`` per cell type (networkx's group degree centrality, average
    clustering and group closeness centrality on the unweighted graph), exact, from sparse matrices:
    one multi-source breadth-first search per type (``scipy.sparse.csgraph.dijkstra``, ``min_only``)
    instead of networkx in Python, so linear in cells. Rows: the categories of ``obs["cell_type"]``."""
    g = adata.obsp["spatial_connectivities"]
    a = sps.csr_matrix((g != 0) + (g.T != 0), dtype=np.float64)  # symmetric 0/1, as networkx sees it
    a.setdiag(0)
    a.eliminate_zeros()
    n, deg = a.shape[0], np.diff(a.indptr)
    triangles = np.asarray(a.multiply(a @ a).sum(axis=1)).ravel() / 2
    clustering = np.divide(2 * triangles, deg * (deg - 1.0), out=np.zeros(n), where=deg > 1)
    codes, types = adata.obs["cell_type"].cat.codes.to_numpy(), adata.obs["cell_type"].cat.categories
    rows = []
    for k in range(len(types)):
        group = codes == k
        others = n - int(group.sum())
        touched = (a @ group.astype(np.float64) > 0) & ~group  # outside the group, next to it
        dist = dijkstra(a, indices=np.flatnonzero(group), unweighted=True, min_only=True)[~group]
        total = dist[np.isfinite(dist)].sum()  # networkx: unreachable cells add 0, and 1 / 0 → 0
        rows.append(
            (
                touched.sum() / others if others else np.nan,
                clustering[group].mean() if group.any() else np.nan,
                others / total if total else 0.0,
            )
        )
    return pd.DataFrame(rows, index=pd.Index(types), columns=list(CENTRALITIES), dtype=np.float64)


def _interaction(adata: ad.AnnData) -> np.ndarray:
    """Squidpy's ``interaction_matrix``: graph edges from cells of type a to type b (both directions)."""
    g = adata.obsp["spatial_connectivities"].tocsr()
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    k, n = len(adata.obs["cell_type"].cat.categories), adata.n_obs
    onehot = sps.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, k))
    edges = sps.csr_matrix((np.ones(g.nnz), g.indices, g.indptr), shape=g.shape)  # every stored edge counts 1
    return (onehot.T @ edges @ onehot).toarray()


def co_occurrence(sub: ad.AnnData, interval: np.ndarray) -> np.ndarray:
    """Squidpy's ``co_occurrence`` ratios (types × types × ``interval[1:]``: P(b within d of a) / P(b),
    over ordered pairs of distinct cells within d), with the pair counts from KD-trees: only pairs
    closer than the largest d are visited, not all n² (squidpy 1.8's numba loop). Coordinates are
    rounded to float32 as squidpy does."""
    xy = sub.obsm["spatial"].astype(np.float32).astype(np.float64)
    codes, k = sub.obs["cell_type"].cat.codes.to_numpy(), len(sub.obs["cell_type"].cat.categories)
    trees = [cKDTree(xy[codes == a]) for a in range(k)]
    counts = np.zeros((k, k, len(interval) - 1))
    for a in range(k):
        for b in range(a, k):
            pairs = trees[a].count_neighbors(trees[b], interval[1:].astype(np.float64))  # d ≤ r, cumulative
            counts[a, b] = counts[b, a] = pairs - (trees[a].n if a == b else 0)  # not a cell with itself
    near = counts.sum(axis=0)  # (type b, d): pairs whose second cell is of type b
    share = near / near.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        occ = counts.transpose(1, 0, 2) / near[None, :, :] / share[:, None, :]  # [i, c] = P(i near c) / P(i)
    return np.where((share[:, None, :] != 0) & (near[None, :, :] != 0), occ, 0.0)


def _ripley(sub: ad.AnnData, types: list[str], p: Ripley) -> dict:
    """Ripley's L per type on ``sub``, as squidpy's ``ripley(mode="L")`` (pairs closer than d, K over
    the intensity of all cells in their convex hull, no edge correction) with the pairs counted by a
    KD-tree instead of all pairwise distances, and then multiplied by n_all / n_type: the type's own
    L, = d under complete spatial randomness. Squidpy's simulation envelope is not computed (it
    reused one seeded pattern for every simulation)."""
    xy = sub.obsm["spatial"].astype(np.float64)
    n, area = len(xy), ConvexHull(xy).volume
    support = np.linspace(0, p.max_um, p.n_steps)
    r = np.nextafter(support, -np.inf)  # squidpy counts d < support; count_neighbors counts d ≤ r
    codes, present = sub.obs["cell_type"].cat.codes.to_numpy(), list(sub.obs["cell_type"].cat.categories)
    out = np.full((len(types), len(support)), np.nan)
    for k, t in enumerate(present):
        tree = cKDTree(xy[codes == k])
        pairs = np.zeros(len(support))
        pairs[support > 0] = (tree.count_neighbors(tree, r[support > 0]) - tree.n) / 2  # unordered, not itself
        out[types.index(t)] = np.sqrt(pairs * 2 / n / (n / area) / np.pi) * n / tree.n
    return {"ripley_L": out, "ripley_um": support, "ripley_n_cells": int(n)}


def _moran(adata: ad.AnnData, feats: list[str], seed: int) -> np.ndarray:
    """Moran's I of ``feats`` (obs columns) on the row-normalised graph; missing values → the median."""
    import squidpy as sq

    obs = adata.obs[feats].astype(np.float64)
    adata.obs[feats] = obs.fillna(obs.median())
    res = sq.gr.spatial_autocorr(
        adata, attr="obs", genes=feats, mode="moran", seed=seed, copy=True, n_jobs=1, show_progress_bar=False
    )
    return res["I"].reindex(feats).to_numpy(np.float64)


def _region_cells(obs: pd.DataFrame, p: NeighbourhoodParams) -> dict[str, np.ndarray]:
    """Row positions in ``obs`` of each region of ``p.kinds`` with ≥ ``min_cells`` cells, in kind
    then id order (``<kind>_id`` columns: categorical, or the text ids of a read cells.parquet)."""
    out = {}
    for kind in p.kinds:
        col = f"{kind}_id"
        if col not in obs:
            continue
        ids = pd.Categorical(obs[col])
        order = np.argsort(ids.codes, kind="stable")
        bounds = np.searchsorted(
            ids.codes[order], np.arange(len(ids.categories) + 1)
        )  # missing ids (−1) first, skipped
        for k, rid in enumerate(ids.categories):
            if bounds[k + 1] - bounds[k] >= p.min_cells:
                out[str(rid)] = order[bounds[k] : bounds[k + 1]]
    return out


def _no_graph(cells: pd.DataFrame, p: NeighbourhoodParams) -> str | None:
    """Why ``cells`` get no statistics at all (None: they do): no graph without 3 cells off one line,
    and no region can reach ``min_cells``."""
    if len(cells) < max(p.min_cells, 3):
        return f"{len(cells)} cells: fewer than " + (f"min_cells ({p.min_cells})" if p.min_cells > 3 else "3")
    xy = cells[["x_um", "y_um"]].to_numpy(np.float64)
    if np.linalg.matrix_rank(xy - xy.mean(axis=0)) < 2:
        return f"all {len(cells)} cells lie on one line: no Delaunay graph"
    return None


def region_groups(cells: pd.DataFrame, params: NeighbourhoodParams | dict | None, n_groups: int) -> list[list[str]]:
    """The region ids :func:`neighbourhood_stats` analyses, as tasks for a cluster: ``["slide"]``
    first (the report's figure needs only it), then the other regions in ≤ ``n_groups`` groups of
    about equal cell counts (largest first, each to the lightest group). Empty with too few cells."""
    p = nhood_params(params)
    if _no_graph(cells, p):
        return []
    sizes = sorted(
        ((len(idx), rid) for rid, idx in _region_cells(cells.reset_index(drop=True), p).items()), reverse=True
    )
    groups: list[list[str]] = [[] for _ in range(max(1, min(n_groups, len(sizes))))]
    load = [0] * len(groups)
    for n, rid in sizes:
        k = load.index(min(load))
        groups[k].append(rid)
        load[k] += n
    return [["slide"]] + [g for g in groups if g]


def group_stats(
    cells: pd.DataFrame, params: NeighbourhoodParams | dict | None, region_ids: list[str]
) -> dict[str, dict]:
    """:func:`region_stats` of each of ``region_ids`` (``slide``: all cells) on the graph of all
    ``cells`` (:func:`cells_adata`). Each group task builds that graph itself: a tenth of its time
    or less, and the tasks then go to whichever worker is free (a shared graph task pinned them all
    to the worker holding it)."""
    p = nhood_params(params)
    adata = cells_adata(cells, p)
    types = list(adata.obs["cell_type"].cat.categories)
    cells_of = _region_cells(adata.obs, p) if set(region_ids) - {"slide"} else {}
    return {
        rid: region_stats((adata if rid == "slide" else adata[cells_of[rid]]).copy(), types, p) for rid in region_ids
    }


def stats_result(cells: pd.DataFrame, params: NeighbourhoodParams | dict | None, groups: list[dict[str, dict]]) -> dict:
    """The result of :func:`neighbourhood_stats` from the :func:`group_stats` of its :func:`region_groups`."""
    regions = {rid: stats for g in groups for rid, stats in g.items()}
    p = nhood_params(params)
    order = ["slide", *_region_cells(cells.reset_index(drop=True), p)] if regions else []
    regions = {rid: dict(regions[rid]) for rid in order}
    skipped = {rid: r.pop("skipped") for rid, r in regions.items() if "skipped" in r}
    if not regions and (why := _no_graph(cells, p)):
        skipped["slide"] = {"all": why}
    return {"cell_types": cell_type_order(cells), "params": _plain(p.as_dict()), "regions": regions, "skipped": skipped}


def neighbourhood_stats(cells: pd.DataFrame, params: NeighbourhoodParams | dict | None = None) -> dict:
    """Statistics for the slide and each region of ``params.kinds`` with ≥ ``min_cells`` cells.

    ``cells``: ``x_um``, ``y_um``, ``cell_type`` and the ``<kind>_id`` columns of
    :func:`histo.structures.regions.assign_cells`. Returns ``{"cell_types": [...], "params": {...},
    "regions": {region_id: region_stats}, "skipped": {region_id: {statistic: reason}}}``, storable in
    AnnData ``uns``; a slide or region of one cell type or a handful of cells skips what it cannot
    compute and says why in ``skipped``, it never fails. Same input and seed give
    the same numbers. On a cluster the same comes from a :func:`group_stats` task per
    :func:`region_groups` group and :func:`stats_result`.
    """
    groups = region_groups(cells, params, 1)
    return stats_result(cells, params, [group_stats(cells, params, sum(groups, []))] if groups else [])


def _plain(p: dict) -> dict:
    """Parameters (``NeighbourhoodParams.as_dict()``) as AnnData writes them in ``uns`` (lists as
    string / number arrays)."""
    return {k: _plain(v) if isinstance(v, dict) else np.asarray(v) if isinstance(v, list) else v for k, v in p.items()}


def neighbourhood_metrics(result: dict) -> pd.DataFrame:
    """One row per analysed region (``region_id``): ``nhood_n_cells``; ``nhood_z_<a>__<b>`` for type
    pairs a ≤ b; ``co_occurrence_<a>_<d>um`` (same-type ratio within the first distance d) and
    ``co_occurrence_n_cells``; ``ripley_max_l_minus_d_um_<a>`` (max over d of L(d) − d, µm:
    > 0 clustered) and ``ripley_n_cells``; ``<score>_<a>`` centrality per type; ``moran_i_<feature>``."""
    types = result["cell_types"]
    rows = {}
    for rid, r in result["regions"].items():
        row = {"nhood_n_cells": r["n_cells"]}
        if "nhood_zscore" in r:
            row |= {
                f"nhood_z_{a}__{b}": r["nhood_zscore"][i, j]
                for i, a in enumerate(types)
                for j, b in enumerate(types)
                if j >= i
            }
        if "co_occurrence" in r:
            d = r["co_occurrence_um"][0]
            row |= {f"co_occurrence_{a}_{d:g}um": r["co_occurrence"][i, i, 0] for i, a in enumerate(types)}
            row["co_occurrence_n_cells"] = r["co_occurrence_n_cells"]
        if "ripley_L" in r:
            best = pd.DataFrame(r["ripley_L"] - r["ripley_um"][None, :]).max(axis=1).to_numpy()  # NaN: type absent
            row |= {f"ripley_max_l_minus_d_um_{a}": best[i] for i, a in enumerate(types)}
            row["ripley_n_cells"] = r["ripley_n_cells"]
        if "centrality" in r:
            row |= {f"{score}_{a}": v for score, col in r["centrality"].items() for a, v in col.items()}
        if "moran_I" in r:
            row |= {f"moran_i_{f}": v for f, v in zip(r["moran_features"], r["moran_I"])}
        rows[rid] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("region_id").reset_index()
