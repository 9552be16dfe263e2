"""Tuning to a recall target: the smallest parameter whose recall reaches it with 95% confidence over the queries."""

import numpy as np
import pytest

from simsearch.retrieval import tuning

Q = 200
EXACT = np.arange(10)[None].repeat(Q, 0)  # (Q, 10): every query's exact top-10 is ids 0..9
QUERIES = np.zeros((Q, 4), dtype=np.float32)


def _searcher(rate):
    """A searcher whose query q finds round(10 * rate(value)[q]) of its exact top-10 at parameter `value`."""
    state = {}

    def search(queries, k):
        hits = np.rint(10 * rate(state["value"])).astype(int)  # (Q,)
        return None, np.where(np.arange(10)[None] < hits[:, None], np.arange(10)[None], -1)  # (Q, 10)

    return search, lambda value: state.__setitem__("value", value)


def test_a_mean_on_the_target_with_spread_is_not_enough():
    half = np.r_[np.ones(Q // 2), np.full(Q // 2, 0.9)]  # mean 0.95, but half the queries at 0.9
    search, set_param = _searcher(lambda v: half if v == 2 else np.full(Q, 0.5 if v < 2 else 1.0))
    set_param(2)
    assert tuning.recall_at_k(search(QUERIES, 10)[1], EXACT) == pytest.approx(0.95)  # the old rule took 2
    value, recall = tuning.tune(search, set_param, [1, 2, 4], QUERIES, EXACT, 0.95)
    assert (value, recall) == (3, 1.0)  # 2 reaches 0.95 only on average; bisection finds 3 between 2 and 4


def test_uniform_recall_needs_no_margin_and_an_unreachable_target_gives_the_last_rung_still_improving():
    search, set_param = _searcher(lambda v: np.full(Q, min(1.0, v / 10)))
    assert tuning.tune(search, set_param, [1, 2, 4, 8, 16], QUERIES, EXACT, 0.8) == (8, 0.8)
    assert tuning.tune(search, set_param, [1, 2, 4], QUERIES, EXACT, 0.9) == (4, 0.4)


def test_an_unreachable_target_on_a_plateau_gives_the_cheapest_rung_near_its_top():
    """Compressed codes cap the recall: past 8 more lists buy nothing, so 8 is kept, not the full scan (and it is
    the parameter left set)."""
    plateau = {1: 0.5, 2: 0.7, 4: 0.8, 8: 0.9, 16: 0.9, 32: 0.9, 64: 0.9}
    search, set_param = _searcher(lambda v: np.full(Q, plateau[v]))
    assert tuning.tune(search, set_param, list(plateau), QUERIES, EXACT, 0.95) == (8, pytest.approx(0.9))
    assert search(QUERIES, 10)[1][0].tolist().count(-1) == 1  # left set to 8: 9 of 10 found
