"""Preparing windows: validated bars and label tables -> unlabeled, labeled, pool and held-out windows.

Held-out windows must not overlap any labeled window in time (refused); unlabeled windows that overlap one are left
out of pretraining, so that no encoder has seen a bar of a held-out window. The prepare stage reads the files and
writes what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

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


def _labeled_windows(prices: np.ndarray, timestamps: np.ndarray, starts: np.ndarray, classes: np.ndarray,
                     window: int) -> Windows:
    return Windows(
        values=normalise(cut_windows(prices, starts, window)).reshape(len(starts), window, len(FEATURES)),
        window_id=np.arange(len(starts), dtype=np.int64),
        start=timestamps[starts],
        label=classes,
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
    starts = unlabeled_starts(len(bars), d.window, d.stride, p.unlabeled_windows)
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
    return Prepared(unlabeled, labeled, pool, test, int(seen_test.sum()))


def check_test_labels_follow_bars(d: DataParams) -> None:
    """Your own bars with the example market's held-out labels cannot match: say which param to set."""
    example = DataParams()
    if d.bars != example.bars and d.test_labels == example.test_labels:
        raise ParamsError(
            f"{PARAMS_FILE}: data.test_labels still names the example market's held-out windows ({d.test_labels}) "
            f"while data.bars is {d.bars}; set data.test_labels to your own held-out labels, or to "
            "data/no_test_labels.csv for none"
        )
