"""The example market looks like a market: valid bars, clustered volatility, fat tails, regimes."""

import numpy as np
import pytest

from moola import market


@pytest.fixture(scope="module")
def m():
    return market.generate_market(60_000, seed=1337)


def test_same_seed_same_market_other_seed_other_market(m):
    again = market.generate_market(60_000, seed=1337)
    assert again.bars.equals(m.bars) and np.array_equal(again.regime, m.regime)
    other = market.generate_market(60_000, seed=7)
    assert not np.allclose(other.bars["close"].to_numpy(), m.bars["close"].to_numpy())


def test_bars_are_valid_and_positive(m):
    b = m.bars
    assert (b[["open", "high", "low", "close"]] > 0).all().all()
    assert (b["low"] <= b[["open", "close"]].min(axis=1)).all()
    assert (b["high"] >= b[["open", "close"]].max(axis=1)).all()
    assert b["timestamp"].is_monotonic_increasing and b["timestamp"].is_unique
    assert set(b["timestamp"].dt.day_of_week.unique()) <= {0, 1, 2, 3, 4}  # weekdays only
    assert b["timestamp"].dt.time.min().strftime("%H:%M") == "09:30"


def test_returns_have_fat_tails_and_volatility_clusters(m):
    r = np.diff(np.log(m.bars["close"].to_numpy()))
    r = r - r.mean()
    excess_kurtosis = np.mean(r**4) / np.mean(r**2) ** 2 - 3
    assert excess_kurtosis > 3  # a Gaussian has 0
    a = np.abs(r)
    acf_abs = np.corrcoef(a[:-5], a[5:])[0, 1]
    acf_raw = np.corrcoef(r[:-5], r[5:])[0, 1]
    # Magnitudes cluster strongly; signs barely predict (the regimes add a little trend persistence).
    assert acf_abs > 0.1 and abs(acf_raw) < 0.1 and acf_abs > 3 * abs(acf_raw)


def test_all_three_regimes_occur_and_retracements_give_back(m):
    shares = np.bincount(m.regime, minlength=3) / len(m.regime)
    assert all(shares > 0.1)
    logp = np.log(m.bars["close"].to_numpy())
    starts = np.flatnonzero(np.diff(m.segment_start, prepend=-1))
    moves = []
    for prev, seg, nxt in zip(starts[:-2], starts[1:-1], starts[2:]):
        if m.regime[prev] == market.IMPULSE and m.regime[seg] == market.RETRACEMENT:
            impulse = logp[seg - 1] - logp[prev]
            retrace = logp[nxt - 1] - logp[seg - 1]
            moves.append(np.sign(impulse) != np.sign(retrace))
    assert len(moves) > 50 and np.mean(moves) > 0.7  # most retracements run against their impulse


def test_labeled_windows_do_not_overlap_and_end_in_their_regime(m):
    starts, labels = market.pick_labeled_ends(m, 30_000, 40, 105, 15, seed=1337)
    assert len(starts) == 40 and set(np.unique(labels)) == {0, 1}
    assert np.all(starts >= 30_000) and np.all(np.diff(starts) >= 105)
    ends = starts + 104
    regime_at_end = m.regime[ends]
    assert np.array_equal(regime_at_end, np.where(labels == 0, market.CONSOLIDATION, market.RETRACEMENT))
    assert np.all(ends - m.segment_start[ends] + 1 >= 15)


def test_a_market_too_large_for_memory_is_refused_before_any_allocation():
    from moola.errors import DataError
    from moola.params import EXAMPLE_MAX_BARS

    with pytest.raises(DataError, match=f"example market: {EXAMPLE_MAX_BARS + 1:,} bars requested, more than"):
        market.generate_market(EXAMPLE_MAX_BARS + 1, seed=0)
