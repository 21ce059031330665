"""Preparing windows: validated bars and label tables -> unlabeled, labeled, pool and held-out windows.

Held-out windows must not overlap any labeled window in time (refused); unlabeled windows that overlap one are left
out of pretraining, so that no encoder has seen a bar of a held-out window. With data.heldout: after (the default),
the split is as-of: every labeled window must end at least data.embargo bars before the first held-out window
(refused otherwise), and unlabeled windows that do not are left out. The prepare stage reads the files and writes
what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moola import paths
from moola.errors import DataError, ParamsError
from moola.params import FEATURES, PARAMS_FILE, DataParams, Params
from moola.windows import (
    Windows,
    chronological_split,
    cut_windows,
    match_labels,
    normalise,
    overlapping,
    unlabeled_starts,
)


@dataclass(frozen=True)
class Prepared:
    unlabeled: Windows
    labeled: Windows  # the first data.labeled_windows of the pool
    pool: Windows  # every window of labels.csv, in its order
    test: Windows  # the held-out windows (none: zero rows)
    excluded: int  # unlabeled windows left out because they overlap a held-out window
    # unlabeled windows left out because they end less than data.embargo bars before the held-out period (after)
    after_cut: int = 0


def _labeled_windows(prices: np.ndarray, timestamps: np.ndarray, starts: np.ndarray, classes: np.ndarray,
                     window: int) -> Windows:
    return Windows(
        values=normalise(cut_windows(prices, starts, window)).reshape(len(starts), window, len(FEATURES)),
        window_id=np.arange(len(starts), dtype=np.int64),
        start=timestamps[starts],
        label=classes,
        bar=np.asarray(starts, dtype=np.int64),
    )


def prepare(p: Params, bars: pd.DataFrame, labels: pd.DataFrame, test_labels: pd.DataFrame | None = None) -> Prepared:
    """Validated bars (windows.validate_bars), a labels table (start, label) and an optional held-out labels table
    (None or no rows: no held-out set) -> the prepared windows.

    The unlabeled windows are the first p.unlabeled_windows starts, every data.stride bars, less those that overlap a
    held-out window."""
    d = p.data
    min_bars = d.window + 9 * d.stride  # ten windows: enough for a training and a validation split
    if len(bars) < min_bars:
        raise DataError(
            f"{d.bars}: {len(bars)} bars, too few (expected at least {min_bars}: ten windows of data.window="
            f"{d.window} every data.stride={d.stride} bars)"
        )
    check_embargo_fits(d, len(bars))
    timestamps = bars["timestamp"].to_numpy()
    prices = bars[list(FEATURES)].to_numpy()
    with_offset = bars.attrs.get("timestamps_with_offset")
    labeled_starts, classes = match_labels(labels, timestamps, d.window, d.labels, with_offset)
    if test_labels is not None and len(test_labels) > 0:
        test_starts, test_classes = match_labels(test_labels, timestamps, d.window, d.test_labels, with_offset)
    else:
        test_starts, test_classes = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    clash = overlapping(test_starts, labeled_starts, d.window)
    if clash.any():
        row = int(np.flatnonzero(clash)[0]) + 1
        raise DataError(
            f"{d.test_labels}: row {row}, field 'start': the held-out window from {timestamps[test_starts[row - 1]]} "
            f"overlaps a labeled window of {d.labels} (expected held-out windows disjoint in time from every "
            "labeled window)"
        )
    check_labeled_before_heldout(d, timestamps, labeled_starts, test_starts)
    starts = unlabeled_starts(len(bars), d.window, d.stride, p.unlabeled_windows)
    starts, after_cut = unlabeled_before_heldout(d, timestamps, starts, test_starts)
    seen_test = overlapping(starts, test_starts, d.window)
    starts = starts[~seen_test]
    unlabeled = Windows(
        values=normalise(cut_windows(prices, starts, d.window)),
        window_id=np.arange(len(starts), dtype=np.int64),
        start=timestamps[starts],
        split=chronological_split(len(starts), d.val_fraction),
    )
    pool = _labeled_windows(prices, timestamps, labeled_starts, classes, d.window)
    labeled = pool.subset(np.arange(min(len(pool), d.labeled_windows)))
    test = _labeled_windows(prices, timestamps, test_starts, test_classes, d.window)
    return Prepared(unlabeled, labeled, pool, test, int(seen_test.sum()), after_cut)


# --- the as-of split (data.heldout: after) ----------------------------------------------------------------------


def heldout_cut(d: DataParams, test_starts: np.ndarray) -> int | None:
    """The first bar no training window may reach: the held-out period's first bar less data.embargo. None without
    a held-out set, or with data.heldout: anywhere (then only overlap with a held-out window is ruled out)."""
    if d.heldout != "after" or len(test_starts) == 0:
        return None
    return int(np.min(test_starts)) - d.embargo


def _heldout_start(d: DataParams, timestamps: np.ndarray, test_starts: np.ndarray) -> str:
    first = int(np.argmin(test_starts))
    return f"{pd.Timestamp(timestamps[test_starts[first]])} ({d.test_labels}, row {first + 1})"


def check_embargo_fits(d: DataParams, n_bars: int) -> None:
    if d.embargo >= n_bars:
        raise ParamsError(
            f"{PARAMS_FILE}: data.embargo ({d.embargo} bars) is longer than the data ({d.bars}: {n_bars} bars); "
            "expected fewer bars than the bars file has"
        )


def check_labeled_before_heldout(
    d: DataParams, timestamps: np.ndarray, labeled_starts: np.ndarray, test_starts: np.ndarray
) -> None:
    """Every labeled window (fine-tuning and the curve's pool: every row of labels.csv) ends at least data.embargo
    bars before the held-out period starts; the first row that does not is refused in one line."""
    cut = heldout_cut(d, test_starts)
    if cut is None:
        return
    late = labeled_starts + d.window > cut
    if late.any():
        row = int(np.flatnonzero(late)[0]) + 1
        raise DataError(
            f"{d.labels}: row {row}, field 'start': the labeled window from "
            f"{pd.Timestamp(timestamps[labeled_starts[row - 1]])} does not end data.embargo={d.embargo} bars before "
            f"the held-out period, which starts at {_heldout_start(d, timestamps, test_starts)} (expected every "
            "labeled window earlier; data.heldout: anywhere accepts it, and every result then says it may be "
            "optimistic)"
        )


def unlabeled_before_heldout(
    d: DataParams, timestamps: np.ndarray, starts: np.ndarray, test_starts: np.ndarray
) -> tuple[np.ndarray, int]:
    """The unlabeled starts whose windows end at least data.embargo bars before the held-out period, and how many
    were left out (pretraining, training and validation alike, never sees the held-out period's bars)."""
    cut = heldout_cut(d, test_starts)
    if cut is None:
        return starts, 0
    keep = starts + d.window <= cut
    if keep.sum() < 2 <= len(starts):
        raise DataError(
            f"{d.bars}: {int(keep.sum())} unlabeled window(s) end data.embargo={d.embargo} bars before the held-out "
            f"period, which starts at {_heldout_start(d, timestamps, test_starts)}; pretraining needs at least a "
            "training and a validation window (expected more bars before it, or a smaller data.embargo)"
        )
    return starts[keep], int(np.sum(~keep))


def check_test_labels_follow_bars(d: DataParams) -> None:
    """Your own bars with the example market's held-out labels cannot match: say which param to set."""
    if d.bars != paths.EXAMPLE_BARS and d.test_labels == paths.EXAMPLE_TEST_LABELS:
        raise ParamsError(
            f"{PARAMS_FILE}: data.test_labels still names the example market's held-out windows ({d.test_labels}) "
            f"while data.bars is {d.bars}; set data.test_labels to your own held-out labels, or to "
            "data/no_test_labels.csv for none"
        )
