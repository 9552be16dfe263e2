"""Benchmark metrics in plain numpy: hit@k with bootstrap intervals, pair accuracy, ROC AUC, all pairs in blocks.

Scores are "higher = more alike" (cosine for encoders, P(same) for rerankers); a pair is predicted
"same" when its score is >= the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# -- find the pair ----------------------------------------------------------------------------------

def hit_ranks(queries: np.ndarray, gallery: np.ndarray, partner: np.ndarray, block: int = 1024) -> np.ndarray:
    """0-based rank of each query's partner in the gallery by inner product: (Q, d), (G, d), (Q,) -> (Q,).

    rank = number of gallery items scoring strictly higher than the partner (ties go to the partner),
    computed in query blocks so memory is O(block * G).
    """
    ranks = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), block):
        scores = queries[s:s + block] @ gallery.T  # (b, G)
        own = scores[np.arange(len(scores)), partner[s:s + block]]  # (b,)
        ranks[s:s + block] = (scores > own[:, None]).sum(axis=1)
    return ranks


@dataclass(frozen=True)
class Candidates:
    """What reranking one pair set starts from: each left image's top `depth` rights by the vector search."""

    top: np.ndarray  # (C, D) indices into the set's rights, best first (the partner of left q is right q)
    cosines: np.ndarray  # (C, D) their scores
    rank: np.ndarray  # (C,) the partner's 0-based rank in the whole vector ranking (ties go to the partner)

    @property
    def partner_column(self) -> np.ndarray:
        """(C,) where each left's partner is in its row of `top`, -1 where the vector search missed it."""
        match = self.top == np.arange(len(self.top))[:, None]
        return np.where(match.any(1), match.argmax(1), -1)


def pair_set_candidates(left: np.ndarray, right: np.ndarray, depth: int) -> Candidates:
    """left, right (C, d): one pair set's vectors, left q's partner right q -> its `Candidates`."""
    scores = left @ right.T  # (C, C)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]  # (C, D)
    return Candidates(top, np.take_along_axis(scores, top, 1), (scores > scores.diagonal()[:, None]).sum(1))


@dataclass(frozen=True)
class HitAtK:
    k: int
    rate: float
    ci_low: float
    ci_high: float
    hits: int
    n: int


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 block: int = 100) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query values; resamples drawn in blocks."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, block):
        b = min(block, n_boot - s)
        means[s:s + b] = values[rng.integers(0, len(values), (b, len(values)))].mean(axis=1)  # (b,)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def hit_rates_with_ci(ranks: np.ndarray, ks, n_boot: int = 1000, seed: int = 0) -> list[HitAtK]:
    out = []
    for k in ks:
        hit = ranks < k
        lo, hi = bootstrap_ci(hit, n_boot, seed)
        out.append(HitAtK(int(k), float(hit.mean()), lo, hi, int(hit.sum()), int(len(hit))))
    return out


# -- same / different pairs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfusionCounts:
    tn: int
    fp: int
    fn: int
    tp: int

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(self.tn + other.tn, self.fp + other.fp, self.fn + other.fn, self.tp + other.tp)

    @property
    def total(self) -> int:
        return self.tn + self.fp + self.fn + self.tp

    @property
    def accuracy(self) -> float:
        return _div(self.tp + self.tn, self.total)

    @property
    def precision(self) -> float:
        return _div(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _div(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _div(self.tn, self.tn + self.fp)

    @property
    def balanced_accuracy(self) -> float:
        return (self.recall + self.specificity) / 2

    @property
    def f1(self) -> float:
        return _div(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy,
                "precision": self.precision, "recall": self.recall, "f1": self.f1}


def _div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def confusion(scores: np.ndarray, same: np.ndarray, threshold: float) -> ConfusionCounts:
    pred = scores >= threshold
    same = same.astype(bool)
    return ConfusionCounts(tn=int(np.sum(~pred & ~same)), fp=int(np.sum(pred & ~same)),
                           fn=int(np.sum(~pred & same)), tp=int(np.sum(pred & same)))


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks, so a tie counts one half)."""
    same = same.astype(bool)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    # average rank of each run of equal scores (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks[order] = ranks_sorted
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _roc_points(pos_desc: np.ndarray, neg_desc: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative positives/negatives at each distinct threshold, descending -> (fpr, tpr, idx)."""
    tpr = np.r_[0.0, np.cumsum(pos_desc) / max(pos_desc.sum(), 1)]
    fpr = np.r_[0.0, np.cumsum(neg_desc) / max(neg_desc.sum(), 1)]
    idx = np.unique(np.linspace(0, len(tpr) - 1, min(max_points, len(tpr))).round().astype(int))
    return fpr[idx], tpr[idx], idx


def roc_curve(scores: np.ndarray, same: np.ndarray, max_points: int = 500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), from (0, 0) to (1, 1), down-sampled to at most max_points for plotting."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], same[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    pos = np.diff(np.r_[0, np.cumsum(y)[last]])
    neg = np.diff(np.r_[0, np.cumsum(~y)[last]])
    fpr, tpr, idx = _roc_points(pos, neg, max_points)
    thresholds = np.r_[np.inf, s[last]][idx]
    return fpr, tpr, thresholds


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold with the best balanced accuracy (midpoint between neighbouring distinct scores)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], same[order].astype(bool)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tpr = np.cumsum(y)[last] / n_pos  # predicting "same" for every score >= s[last[i]]
    tnr = 1 - np.cumsum(~y)[last] / n_neg
    bal = np.r_[0.5, (tpr + tnr) / 2]  # index 0: threshold above every score (all "different")
    i = int(np.argmax(bal))
    if i == 0:
        return float(s[0] + 1e-6)
    below = s[last[i - 1] + 1] if last[i - 1] + 1 < len(s) else s[last[i - 1]] - 1e-6
    return float((s[last[i - 1]] + below) / 2)


# -- all pairs, streamed -------------------------------------------------------------------------------

class ScoreHistogram:
    """Streams (score, same) pairs: per-class score histograms for ROC/AUC, exact counts at a fixed threshold."""

    def __init__(self, threshold: float, lo: float = -1.0, hi: float = 1.0, bins: int = 20_000):
        self.threshold = threshold
        self.lo, self.hi, self.bins = lo, hi, bins
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)
        self.confusion = ConfusionCounts(0, 0, 0, 0)

    def add(self, scores: np.ndarray, same: np.ndarray) -> None:
        scores, same = scores.ravel(), same.ravel().astype(bool)
        b = np.clip(((scores - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64), 0, self.bins - 1)
        self.pos += np.bincount(b[same], minlength=self.bins)
        self.neg += np.bincount(b[~same], minlength=self.bins)
        self.confusion = self.confusion + confusion(scores, same, self.threshold)

    def auc(self) -> float:
        """AUC from the histograms; pairs in the same bin count one half (exact up to bin width)."""
        n_pos, n_neg = self.pos.sum(), self.neg.sum()
        if not n_pos or not n_neg:
            return float("nan")
        neg_below = np.cumsum(self.neg) - self.neg  # negatives in lower bins
        return float((self.pos * (neg_below + 0.5 * self.neg)).sum() / (n_pos * n_neg))

    def roc_curve(self, max_points: int = 500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fpr, tpr, idx = _roc_points(self.pos[::-1], self.neg[::-1], max_points)
        edges = np.linspace(self.hi, self.lo, self.bins + 1)
        return fpr, tpr, edges[idx]


def all_pairs_scored(n: int, labels: np.ndarray, score_block: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     threshold: float, block: int = 1024, bins_range: tuple[float, float] = (-1.0, 1.0),
                     bins: int = 20_000, on_progress=None) -> ScoreHistogram:
    """Every unordered pair i < j of n items, scored block by block: memory O(block * n) whatever n.

    on_progress(rows done, n) after every block of rows.
    """
    hist = ScoreHistogram(threshold, *bins_range, bins=bins)
    for r0 in range(0, n, block):
        rows = np.arange(r0, min(r0 + block, n))
        cols = np.arange(r0, n)
        scores = score_block(rows, cols)  # (len(rows), len(cols))
        upper = cols[None, :] > rows[:, None]  # keep j > i only
        same = labels[rows][:, None] == labels[cols][None, :]
        hist.add(scores[upper], same[upper])
        if on_progress:
            on_progress(rows[-1] + 1, n)
    return hist


def all_pairs(embeddings: np.ndarray, labels: np.ndarray, threshold: float, block: int = 1024,
              bins: int = 20_000) -> ScoreHistogram:
    """All pairs by cosine (embeddings L2-normalised): (N, d), (N,) -> histogram + exact confusion counts."""
    return all_pairs_scored(len(embeddings), labels, lambda r, c: embeddings[r] @ embeddings[c].T,
                            threshold, block, (-1.0, 1.0), bins)
