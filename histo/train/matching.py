"""Matching detected nuclei to reference nuclei by centroid distance (µm)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import bmat
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class PointMatch:
    """One-to-one matches between ``pred`` and ``true`` points within a distance."""

    pred_idx: np.ndarray
    true_idx: np.ndarray
    n_pred: int
    n_true: int

    @property
    def tp(self) -> int:
        return len(self.pred_idx)

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else float(self.n_true == 0)

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else float(self.n_pred == 0)

    @property
    def f1(self) -> float:
        total = self.n_pred + self.n_true
        return 2 * self.tp / total if total else 1.0


def match_points(pred: np.ndarray, true: np.ndarray, max_dist: float) -> PointMatch:
    """Maximum one-to-one matching of points (n, 2) within ``max_dist``; among maximum matchings,
    the one with the smallest total distance.

    Candidate pairs come from a KD-tree; each connected group of candidates is solved exactly as an
    assignment problem, so the result does not depend on the order of the points.
    """
    pred, true = np.asarray(pred, float).reshape(-1, 2), np.asarray(true, float).reshape(-1, 2)
    empty = np.array([], dtype=int)
    if not len(pred) or not len(true):
        return PointMatch(empty, empty, len(pred), len(true))
    pairs = cKDTree(pred).sparse_distance_matrix(cKDTree(true), max_dist, output_type="coo_matrix")
    n_groups, group = connected_components(bmat([[None, pairs], [pairs.T, None]]), directed=False)
    edge_group = group[: len(pred)][pairs.row]
    order = np.argsort(edge_group, kind="stable")
    bounds = np.searchsorted(edge_group[order], np.arange(n_groups + 1))
    matched_pred, matched_true = [empty], [empty]
    for g in range(n_groups):
        edges = order[bounds[g] : bounds[g + 1]]
        if not len(edges):
            continue
        rows, r_inv = np.unique(pairs.row[edges], return_inverse=True)
        cols, c_inv = np.unique(pairs.col[edges], return_inverse=True)
        # every candidate pair is worth more than any distance, so the number of matches comes first
        cost = np.zeros((len(rows), len(cols)))
        cost[r_inv, c_inv] = pairs.data[edges] - 2 * max_dist - 1.0
        ri, ci = linear_sum_assignment(cost)
        ok = cost[ri, ci] < 0
        matched_pred.append(rows[ri[ok]])
        matched_true.append(cols[ci[ok]])
    return PointMatch(np.concatenate(matched_pred), np.concatenate(matched_true), len(pred), len(true))
