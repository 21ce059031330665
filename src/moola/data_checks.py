"""Checks of a market's bars and prepared windows that formats alone cannot catch (the prepare stage runs them).

Outliers: a bar whose range (log high/low) or close-to-close move (log) is more than `data.outlier_threshold`
times the file's median absolute close-to-close log return is absurd against its neighbours (a price typed
1,000 times too large, a missing decimal point, an unadjusted split). Refused in one line naming the row, or, with
`data.drop_outliers: true`, dropped with a count when it is a one-bar spike (its move in and its move out both
absurd, or its own range absurd); a jump that stays (every bar after it on another level) cannot be dropped and is
always refused. The example market's largest bar is about 150 median moves; the default threshold is 500.

Degenerate windows: a window normalises to (x - min(low)) / (max(high) - min(low)). When one or two bars hold
nearly all of that range (or the range is zero, a halted market), the other bars' values squash together (most
of them equal, or within a sliver of [0, 1]) and the model sees a flat line. prepare says how many, and which.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moola.errors import DataError
from moola.params import CLASS_NAMES, FEATURES, PARAMS_FILE, DataParams

# A window is degenerate when the middle 90% of its values (5th to 95th percentile) span less than this fraction of
# its [0, 1] range: one or two bars own the range. A zero range (every value 0.5) is degenerate too.
DEGENERATE_MIDDLE_SPAN = 0.02


def outlier_rows(bars: pd.DataFrame, threshold: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(absurd range per bar, absurd move into each bar from the previous one, the median absolute log return).

    Both masks are per row (the first bar has no move in). No nonzero move at all: nothing is absurd."""
    close, high, low = (bars[c].to_numpy(dtype=np.float64) for c in ("close", "high", "low"))
    moves = np.abs(np.diff(np.log(close)))
    nonzero = moves[moves > 0]
    if len(nonzero) == 0:
        none = np.zeros(len(bars), dtype=bool)
        return none, none, 0.0
    typical = float(np.median(nonzero))
    limit = threshold * typical
    wide = np.log(high / low) > limit
    jump = np.concatenate([[False], moves > limit])
    return wide, jump, typical


def check_outliers(bars: pd.DataFrame, d: DataParams) -> tuple[pd.DataFrame, int]:
    """Validated bars -> (the bars, less dropped one-bar spikes; how many were dropped). Refuses (DataError naming
    the row) an absurd bar, unless data.drop_outliers is set and it is a spike that dropping removes."""
    wide, jump, typical = outlier_rows(bars, d.outlier_threshold)
    if not (wide.any() or jump.any()):
        return bars, 0
    limit = d.outlier_threshold * typical
    # A spike: the move into the bar and the move out of it are both absurd (and opposite), or its range is.
    move_out = np.concatenate([jump[1:], [False]])
    close = bars["close"].to_numpy(dtype=np.float64)
    log_close = np.log(close)
    step_in = np.concatenate([[0.0], np.diff(log_close)])
    step_out = np.concatenate([step_in[1:], [0.0]])
    spike = wide | (jump & move_out & (np.sign(step_in) == -np.sign(step_out)))
    # Rows whose only problem is the move out of a spike (the bar after it) are not outliers themselves.
    after_spike = np.concatenate([[False], spike[:-1]]) & jump & ~wide
    flagged = (wide | jump) & ~after_spike
    if d.drop_outliers and not (flagged & ~spike).any():
        kept = bars.loc[~spike].reset_index(drop=True)
        kept.attrs.update(bars.attrs)
        return kept, int(spike.sum())
    row = int(np.flatnonzero(flagged)[0])
    prices = ", ".join(f"{c}={bars[c].iloc[row]:g}" for c in FEATURES)
    if wide[row]:
        field, what = "high", f"its high is x{bars['high'].iloc[row] / bars['low'].iloc[row]:.4g} its low"
    else:
        field, what = "close", f"its close is x{np.exp(step_in[row]):.4g} the previous close"
    remedy = ("set data.drop_outliers: true in params.yaml to drop such one-bar spikes" if spike[row]
              else "a jump that stays is no spike to drop: adjust the prices (a split?) or fix the file")
    raise DataError(
        f"{d.bars}: row {row + 1}, field '{field}': bar has {prices}: {what}, more than data.outlier_threshold="
        f"{d.outlier_threshold:g} times the median move ({typical:.3g} in log price, so at most x{np.exp(limit):.4g}) "
        f"(expected prices near their neighbours); fix the row, or {remedy}"
    )


def degenerate_windows(values: np.ndarray) -> np.ndarray:
    """Per normalised window (n, window, features): whether its values squash into a flat line (module docstring)."""
    if len(values) == 0:
        return np.zeros(0, dtype=bool)
    flat = values.reshape(len(values), -1)
    low, high = np.percentile(flat, [5, 95], axis=1)
    return (high - low) < DEGENERATE_MIDDLE_SPAN


def degenerate_warnings(named: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """One warning line per set of windows with degenerate ones: {name: (values, starts)} -> lines."""
    lines = []
    for name, (values, starts) in named.items():
        bad = degenerate_windows(values)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            lines.append(
                f"warning: {int(bad.sum())} of {len(values)} {name} windows normalise to a nearly flat line (one or "
                f"two bars hold nearly all of the window's price range, or it has none), the first from "
                f"{pd.Timestamp(starts[first])}; check the bars there"
            )
    return lines


def check_test_classes(test_labels: np.ndarray, d: DataParams) -> None:
    """A held-out set of one class cannot measure balanced accuracy, MCC or one recall: refused unless
    data.allow_one_class_test says it is intended (then those metrics are written as null with the reason)."""
    if len(test_labels) == 0 or d.allow_one_class_test:
        return
    counts = np.bincount(test_labels, minlength=len(CLASS_NAMES))
    if (counts == 0).any():
        found = ", ".join(f"{n} {name}" for name, n in zip(CLASS_NAMES, counts))
        absent = CLASS_NAMES[int(np.flatnonzero(counts == 0)[0])]
        raise DataError(
            f"{d.test_labels}: field 'label': held-out windows of one class only (found {found}): no '{absent}' "
            f"window, so its recall, balanced accuracy and MCC are undefined; add held-out windows of both classes, "
            f"or set data.allow_one_class_test: true in {PARAMS_FILE} if one class is intended"
        )
