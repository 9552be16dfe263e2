"""Metrics against brute-force references on small random data."""

import itertools

import numpy as np
import pytest

from simsearch.evaluation import metrics


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_hit_ranks_match_explicit_sorting():
    rng = np.random.default_rng(0)
    q, g = unit(rng, 37, 8), unit(rng, 23, 8)
    partner = rng.integers(0, 23, 37)
    order = np.argsort(-(q @ g.T), axis=1)
    expected = np.array([np.where(row == p)[0][0] for row, p in zip(order, partner)])
    for block in (1, 5, 100):
        np.testing.assert_array_equal(metrics.hit_ranks(q, g, partner, block=block), expected)
    rates = metrics.hit_rates_with_ci(expected, [1, 5, 23])
    assert [r.rate for r in rates] == pytest.approx([np.mean(expected < k) for k in (1, 5, 23)])
    assert rates[-1].rate == 1.0 and rates[-1].hits == 37


def test_bootstrap_ci_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small, big = rng.random(100) < 0.3, rng.random(10_000) < 0.3
    lo_s, hi_s = metrics.bootstrap_ci(small, 500)
    lo_b, hi_b = metrics.bootstrap_ci(big, 500)
    assert lo_s <= small.mean() <= hi_s and lo_b <= big.mean() <= hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 5  # ~ 1/sqrt(n)
    assert metrics.bootstrap_ci(big, 500, seed=3) == metrics.bootstrap_ci(big, 500, seed=3)


def brute_auc(scores, same):
    pos, neg = scores[same], scores[~same]
    return np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_equals_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 12, 150).astype(np.float64)  # many ties
    same = rng.random(150) < 0.4
    assert metrics.roc_auc(scores, same) == pytest.approx(brute_auc(scores, same))
    fpr, tpr, _ = metrics.roc_curve(scores, same)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auc(scores, same))  # all points kept: exact


def test_best_threshold_is_the_brute_force_optimum():
    rng = np.random.default_rng(4)
    same = rng.random(300) < 0.3
    scores = np.where(same, rng.normal(0.6, 0.2, 300), rng.normal(0.3, 0.2, 300)).round(2)
    t = metrics.best_threshold(scores, same)
    best = max(metrics.confusion(scores, same, c).balanced_accuracy for c in np.r_[np.unique(scores), 9])
    assert metrics.confusion(scores, same, t).balanced_accuracy == pytest.approx(best)


def test_confusion_counts_and_rates():
    c = metrics.confusion(np.array([0.9, 0.8, 0.2, 0.1, 0.7]), np.array([1, 0, 1, 0, 1], bool), 0.5)
    assert (c.tn, c.fp, c.fn, c.tp) == (1, 1, 1, 2)
    assert c.accuracy == 0.6 and c.precision == pytest.approx(2 / 3) and c.recall == pytest.approx(2 / 3)
    assert c.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2) / 2) and c.f1 == pytest.approx(2 / 3)
    assert metrics.ConfusionCounts(0, 0, 0, 0).precision == 0.0


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_blocked_all_pairs_equal_the_full_matrix(block):
    rng = np.random.default_rng(5)
    x, labels = unit(rng, 64, 6), rng.integers(0, 5, 64)
    i, j = np.triu_indices(64, k=1)
    scores, same = np.einsum("nd,nd->n", x[i], x[j]), labels[i] == labels[j]
    hist = metrics.all_pairs(x, labels, threshold=0.2, block=block)
    assert hist.confusion == metrics.confusion(scores, same, 0.2)
    assert hist.confusion.total == 64 * 63 // 2
    assert hist.auc() == pytest.approx(metrics.roc_auc(scores, same), abs=1e-3)
    fpr, tpr, _ = hist.roc_curve()
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
