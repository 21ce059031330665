"""A seeded, built-in example market: 5-minute OHLC bars with regimes, clustered volatility and fat tails.

The price follows a regime chain. An *impulse* trends; it is followed by a *consolidation* (the price ranges around
a level) or a *retracement* (a counter-move that gives back part of the impulse); then a new impulse starts.
Volatility is GARCH(1,1) with Student-t shocks (clusters, fat tails) times an intraday U-shape, so the regimes
are visible to a model only through noise, as in a real market. The parameters below were set to look like an
intraday equity series and were not tuned on any downstream result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moola.errors import DataError
from moola.params import EXAMPLE_GAP_BARS, EXAMPLE_MAX_BARS, example_bar_counts

IMPULSE, CONSOLIDATION, RETRACEMENT = 0, 1, 2
REGIME_NAMES = {IMPULSE: "impulse", CONSOLIDATION: "consolidation", RETRACEMENT: "retracement"}

BARS_PER_DAY = 78  # 09:30 to 16:00 in 5-minute bars
BAR_MINUTES = 5
FIRST_DAY = "2015-01-02"

# Volatility: per-bar GARCH(1,1) on log returns, unconditional sd ~ 0.12% per 5-minute bar.
GARCH_OMEGA, GARCH_ALPHA, GARCH_BETA = 1.44e-6 * 0.02, 0.08, 0.90
STUDENT_T_DOF = 5.0
OVERNIGHT_GAP_SD = 0.004

# Regime chain. Drifts are in units of the current bar volatility.
IMPULSE_BARS = (20, 70)
IMPULSE_DRIFT = (0.1, 0.45)
CONSOLIDATION_BARS = (20, 80)
CONSOLIDATION_PULL = (0.04, 0.15)  # mean reversion towards the range's centre, per bar
CONSOLIDATION_DRIFT = 0.1  # a range can lean slightly: |drift| up to this
RETRACEMENT_BARS = (15, 60)
RETRACEMENT_GIVEBACK = (0.2, 0.65)  # fraction of the previous impulse's move
P_RETRACEMENT = 0.45  # after an impulse; otherwise a consolidation
P_CONTINUATION = 0.5  # a new impulse goes the previous impulse's way

# The names that labels.csv gives pick_labeled_ends' labels 0 and 1 (the example files' gaps: EXAMPLE_GAP_BARS).
LABEL_NAMES = (REGIME_NAMES[CONSOLIDATION], REGIME_NAMES[RETRACEMENT])


@dataclass(frozen=True)
class Market:
    bars: pd.DataFrame  # timestamp, open, high, low, close, volume
    regime: np.ndarray  # (n,) int8: IMPULSE | CONSOLIDATION | RETRACEMENT
    segment_start: np.ndarray  # (n,) int64: index of the first bar of the bar's regime segment


def session_timestamps(n_bars: int, first_day: str = FIRST_DAY) -> pd.DatetimeIndex:
    """Timestamps of `n_bars` consecutive 5-minute bars of weekday sessions, 09:30 to 15:55 (bar open times)."""
    n_days = -(-n_bars // BARS_PER_DAY)
    days = pd.bdate_range(first_day, periods=n_days)
    offsets = pd.to_timedelta(np.arange(BARS_PER_DAY) * BAR_MINUTES + 9 * 60 + 30, unit="min")
    stamps = (days.values[:, None] + offsets.values[None, :]).ravel()[:n_bars]
    return pd.DatetimeIndex(stamps)


def _intraday_shape() -> np.ndarray:
    """Volatility is higher at the open and the close of the session (the usual U shape)."""
    x = np.linspace(-1.0, 1.0, BARS_PER_DAY)
    shape = 0.75 + 0.6 * x**2
    return shape / np.sqrt(np.mean(shape**2))


def _regime_path(n_bars: int, rng: np.random.Generator):
    """Per bar: regime, segment start and end (exclusive), and the regime's parameters."""
    regime = np.empty(n_bars, dtype=np.int8)
    seg_start = np.empty(n_bars, dtype=np.int64)
    seg_end = np.empty(n_bars, dtype=np.int64)
    strength = np.empty(n_bars)  # impulse: signed drift; consolidation: pull; retracement: give-back fraction
    lean = np.zeros(n_bars)  # consolidation: signed drift
    t, direction, current = 0, 1.0, IMPULSE
    while t < n_bars:
        if current == IMPULSE:
            length = rng.integers(*IMPULSE_BARS, endpoint=True)
            direction = direction if rng.random() < P_CONTINUATION else -direction
            value = direction * rng.uniform(*IMPULSE_DRIFT)
            following = RETRACEMENT if rng.random() < P_RETRACEMENT else CONSOLIDATION
        elif current == CONSOLIDATION:
            length = rng.integers(*CONSOLIDATION_BARS, endpoint=True)
            value = rng.uniform(*CONSOLIDATION_PULL)
            lean[t : t + length] = rng.uniform(-CONSOLIDATION_DRIFT, CONSOLIDATION_DRIFT)
            following = IMPULSE
        else:
            length = rng.integers(*RETRACEMENT_BARS, endpoint=True)
            value = rng.uniform(*RETRACEMENT_GIVEBACK)
            following = IMPULSE
        end = min(n_bars, t + length)
        regime[t:end] = current
        seg_start[t:end] = t
        seg_end[t:end] = end
        strength[t:end] = value
        t, current = end, following
    return regime, seg_start, seg_end, strength, lean


def _market_rng(seed: int, stream: int) -> np.random.Generator:
    """The generator of one market stream."""
    # Stream 0 keeps the key the example market has always had, so its bars do not change.
    key = [seed, 0x6D6F6F6C61] if stream == 0 else [seed, 0x6D6F6F6C61, stream]  # "moola"
    return np.random.default_rng(key)


@dataclass(frozen=True)
class _BarNoise:
    """Per-bar randomness of the price path, and the intraday volatility shape it is scaled by."""

    shocks: np.ndarray  # Student-t shocks with unit variance
    intraday: np.ndarray  # the session's U-shape at each bar
    gaps: np.ndarray  # overnight gap at the first bar of a session, 0 elsewhere
    wick_up: np.ndarray  # high above max(open, close), in bar volatilities
    wick_down: np.ndarray  # low below min(open, close), in bar volatilities


def _bar_noise(n_bars: int, phase: int, rng: np.random.Generator) -> _BarNoise:
    """Draw the bars' shocks, gaps and wicks (in this order: the market's bytes depend on it); `phase` is the
    session bar that the first bar falls on."""
    shocks = rng.standard_t(STUDENT_T_DOF, n_bars) / np.sqrt(STUDENT_T_DOF / (STUDENT_T_DOF - 2.0))
    intraday = np.tile(_intraday_shape(), -(-(n_bars + phase) // BARS_PER_DAY))[phase : phase + n_bars]
    new_day = ((np.arange(n_bars) + phase) % BARS_PER_DAY) == 0
    gaps = rng.normal(0.0, OVERNIGHT_GAP_SD, n_bars) * new_day
    wick_up = np.abs(rng.normal(0.0, 0.6, n_bars))
    wick_down = np.abs(rng.normal(0.0, 0.6, n_bars))
    return _BarNoise(shocks=shocks, intraday=intraday, gaps=gaps, wick_up=wick_up, wick_down=wick_down)


def _log_price_path(path: tuple, noise: _BarNoise, start_price: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Walk the regime path (`_regime_path`'s tuple) bar by bar under GARCH volatility: (log open, log close,
    bar volatility)."""
    regime, seg_start, seg_end, strength, lean = path
    shocks, intraday, gaps = noise.shocks, noise.intraday, noise.gaps
    n_bars = len(regime)
    log_close = np.empty(n_bars)
    log_open = np.empty(n_bars)
    bar_sd = np.empty(n_bars)
    variance = GARCH_OMEGA / (1.0 - GARCH_ALPHA - GARCH_BETA)
    last_shock, level = 0.0, np.log(start_price)
    anchor, impulse_start_level, pace = level, level, 0.0
    for t in range(n_bars):
        # GARCH is sequential by nature: the variance depends on yesterday's shock.
        variance = GARCH_OMEGA + GARCH_ALPHA * last_shock**2 + GARCH_BETA * variance
        sd = np.sqrt(variance) * intraday[t]
        open_ = level + gaps[t]
        if seg_start[t] == t:  # a new segment starts here
            if regime[t] == IMPULSE:
                impulse_start_level = open_
            else:
                anchor = open_
                # A retracement walks back its share of the impulse at a steady pace over its length.
                pace = -strength[t] * (open_ - impulse_start_level) / (seg_end[t] - t)
        if regime[t] == IMPULSE:
            drift = strength[t] * sd
        elif regime[t] == CONSOLIDATION:
            drift = -strength[t] * (open_ - anchor) + lean[t] * sd
        else:
            drift = pace
        ret = drift + sd * shocks[t]
        log_open[t], log_close[t], bar_sd[t] = open_, open_ + ret, sd
        # Volatility reacts to surprises, not to the regime's own drift.
        last_shock, level = sd * shocks[t] + gaps[t], open_ + ret
    return log_open, log_close, bar_sd


def _ohlcv_bars(
    log_open: np.ndarray, log_close: np.ndarray, bar_sd: np.ndarray, noise: _BarNoise, rng: np.random.Generator
) -> pd.DataFrame:
    """The bars table: wicks around the bodies, and a volume that follows volatility (the market's last draw)."""
    n_bars = len(log_open)
    high = np.maximum(log_open, log_close) + noise.wick_up * bar_sd
    low = np.minimum(log_open, log_close) - noise.wick_down * bar_sd
    volume = np.round(
        1e5 * noise.intraday * (1.0 + np.abs(noise.shocks)) * rng.lognormal(0.0, 0.3, n_bars)
    ).astype(np.int64)
    return pd.DataFrame(
        {
            "timestamp": session_timestamps(n_bars),
            "open": np.exp(log_open),
            "high": np.exp(high),
            "low": np.exp(low),
            "close": np.exp(log_close),
            "volume": volume,
        }
    )


def generate_market(
    n_bars: int, seed: int, start_price: float = 100.0, stream: int = 0, first_bar_of_day: int = 0
) -> Market:
    """Generate `n_bars` bars. Pure: the same arguments always give the same market.

    `stream` > 0 draws an independent market (a continuation: see `extend_market`); `first_bar_of_day` is the
    session bar (0..77) that the first bar falls on, so that a continuation keeps the intraday pattern."""
    if n_bars > EXAMPLE_MAX_BARS:  # params.py refuses such params at load; this guards every other caller
        raise DataError(
            f"example market: {n_bars:,} bars requested, more than the {EXAMPLE_MAX_BARS:,} it generates in memory"
        )
    rng = _market_rng(seed, stream)
    # The draws' order is part of the market: regime chain, then bar noise, then volume.
    path = _regime_path(n_bars, rng)
    noise = _bar_noise(n_bars, first_bar_of_day, rng)
    log_open, log_close, bar_sd = _log_price_path(path, noise, start_price)
    bars = _ohlcv_bars(log_open, log_close, bar_sd, noise, rng)
    regime, seg_start = path[0], path[1]
    return Market(bars=bars, regime=regime, segment_start=seg_start)


def extend_market(market: Market, n_more: int, seed: int) -> Market:
    """`market` followed by `n_more` bars of an independent stream that starts at its last close.

    Generating a longer market from scratch would redraw every bar (the regime chain consumes a data-dependent
    number of draws before the shocks are drawn), so a continuation keeps the first bars exactly as they were."""
    n_before = len(market.bars)
    last_close = float(market.bars["close"].iloc[-1])
    more = generate_market(n_more, seed, start_price=last_close, stream=1, first_bar_of_day=n_before % BARS_PER_DAY)
    stamps = session_timestamps(n_before + n_more)
    bars = pd.concat([market.bars, more.bars.assign(timestamp=stamps[n_before:])], ignore_index=True)
    return Market(
        bars=bars,
        regime=np.concatenate([market.regime, more.regime]),
        segment_start=np.concatenate([market.segment_start, more.segment_start + n_before]),
    )


LABEL_KEY, TEST_KEY = 0x6C6162656C, 0x74657374  # "label", "test"


def pick_labeled_ends(
    market: Market, first_bar: int, n_windows: int, window: int, min_final_segment: int, seed: int,
    key: int = LABEL_KEY,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose `n_windows` non-overlapping windows from `first_bar` on, each ending inside a consolidation or a
    retracement with at least `min_final_segment` of its bars visible. The end is drawn uniformly within the
    segment, so the model cannot rely on where the segment starts. Returns (start indices, labels 0/1)."""
    rng = np.random.default_rng([seed, key])
    regime, seg_start = market.regime, market.segment_start
    n = len(regime)
    starts, labels = [], []
    next_free = first_bar
    boundaries = np.flatnonzero(np.diff(seg_start, prepend=-1))
    seg_ends = np.append(boundaries[1:], n) - 1  # last bar of each segment
    for b, seg_end in zip(boundaries, seg_ends):
        if len(starts) == n_windows:
            break
        if regime[b] == IMPULSE or seg_end < first_bar:
            continue
        lo = max(b + min_final_segment - 1, next_free + window - 1)
        if lo > seg_end:
            continue
        end = int(rng.integers(lo, seg_end, endpoint=True))
        starts.append(end - window + 1)
        labels.append(0 if regime[b] == CONSOLIDATION else 1)
        next_free = end + 1
    return np.asarray(starts, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def example_data(
    seed: int,
    window: int,
    stride: int,
    unlabeled_windows: int,
    labeled_windows: int,
    min_final_segment: int,
    label_pool: int = 0,
    test_windows: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The example market as a user would supply their own: (bars, labels, test labels).

    bars: timestamp, open, high, low, close, volume. labels and test labels: start (timestamp of a window's first
    bar), label (consolidation | retracement). The market has the spec's length whatever the scale: its first
    `(unlabeled_windows - 1) * stride + window` bars hold the unlabeled windows (prepare takes the first ones), and
    the labeled windows come from a later stretch, a trading week after it, so they never overlap an unlabeled one.
    labels holds max(labeled_windows, label_pool) windows in time order: its first `labeled_windows` are the
    fine-tuning set, the rest extend the pool of the label-efficiency curve. The test windows come from a stretch
    a trading week after the pool's last window, picked the same way with their own random stream.

    The first bars and the first `labeled_windows` labeled windows do not depend on label_pool or test_windows:
    the extra bars are a continuation (`extend_market`) appended after the market this function has always made.
    """
    spec_bars = (unlabeled_windows - 1) * stride + window
    n_bars, n_more = example_bar_counts(window, stride, unlabeled_windows, labeled_windows, label_pool, test_windows)
    market = generate_market(n_bars, seed)
    pool = max(label_pool, labeled_windows)
    if n_more > 0:
        market = extend_market(market, n_more, seed)
    starts, labels = pick_labeled_ends(
        market, spec_bars + EXAMPLE_GAP_BARS, pool, window, min_final_segment, seed
    )
    if len(starts) < pool:
        raise DataError(f"example market: found only {len(starts)} of {pool} labeled windows")
    stamps = market.bars["timestamp"].to_numpy()
    label_table = pd.DataFrame({"start": stamps[starts], "label": [LABEL_NAMES[i] for i in labels]})
    test_table = pd.DataFrame({"start": np.array([], dtype=stamps.dtype), "label": []})
    if test_windows > 0:
        first_test_bar = int(starts[-1]) + window + EXAMPLE_GAP_BARS
        test_starts, test_labels = pick_labeled_ends(
            market, first_test_bar, test_windows, window, min_final_segment, seed, key=TEST_KEY
        )
        if len(test_starts) < test_windows:
            raise DataError(f"example market: found only {len(test_starts)} of data.test_windows={test_windows}")
        test_table = pd.DataFrame({"start": stamps[test_starts], "label": [LABEL_NAMES[i] for i in test_labels]})
    return market.bars, label_table, test_table
