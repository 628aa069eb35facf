import numpy as np

from histo.train.matching import match_points


def test_maximum_matching_prefers_more_pairs_then_shorter():
    # greedy nearest would pair (2,0)-(1.5,0) and leave (0,0) unmatched; the maximum matching pairs both
    m = match_points(np.array([[0, 0], [2, 0]]), np.array([[1.5, 0], [3.9, 0]]), 2.5)
    assert m.tp == 2 and sorted(zip(m.pred_idx, m.true_idx)) == [(0, 0), (1, 1)]


def test_scores_on_known_errors():
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 2000, (3000, 2))
    pred = np.vstack([true[:2700] + rng.normal(0, 0.3, (2700, 2)), [[5000, 5000]] * 1])
    m = match_points(pred, true, 3.0)
    assert m.tp == 2700 and abs(m.recall - 0.9) < 1e-9 and abs(m.precision - 2700 / 2701) < 1e-9


def test_empty_inputs():
    assert match_points(np.zeros((0, 2)), np.zeros((0, 2)), 1).f1 == 1.0
    assert match_points(np.zeros((0, 2)), np.ones((3, 2)), 1).f1 == 0.0
    assert match_points(np.array([[0, 0]]), np.array([[10, 10]]), 3).tp == 0
