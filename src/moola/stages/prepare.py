"""Stage prepare: the bars and labels files named by params (data.bars, data.labels, data.test_labels) ->
data/prepared windows.

The files are a user's own (see README, "Data format") or the example market's, which the example_market stage
writes in the same format; dvc.yaml lists whichever files params name as this stage's deps.

Held-out windows (data.test_labels) must not overlap any window of labels.csv in time (refused); unlabeled windows
that overlap one are left out of pretraining, so that no encoder has seen a bar of a held-out window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moola import io
from moola.errors import DataError, ParamsError, run_main
from moola.params import CLASS_NAMES, FEATURES, PARAMS_FILE, DataParams, Params, load_params
from moola.windows import (
    LABEL_POOL,
    LABELED,
    TEST,
    UNLABELED,
    Windows,
    check_pipeline_can_finish,
    chronological_split,
    cut_windows,
    match_labels,
    normalise,
    overlapping,
    read_bars,
    read_label_table,
    unlabeled_starts,
    windows_table,
)

__all__ = ["LABELED", "LABEL_POOL", "TEST", "UNLABELED", "Prepared", "prepare", "main"]


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


def main() -> None:
    p = load_params()
    check_test_labels_follow_bars(p.data)
    bars = read_bars(p.data.bars)
    out = prepare(p, bars, read_label_table(p.data.labels), read_label_table(p.data.test_labels, "data.test_labels"))
    unlabeled, labeled = out.unlabeled, out.labeled
    # Fail now, not after hours of pretraining (finetune.folds is checked, not used: it is no dep of this stage).
    check_pipeline_can_finish(unlabeled, labeled, p.finetune.folds, p.data.bars, p.data.labels)
    n_val = int(np.sum(unlabeled.split == "val"))
    counts = np.bincount(labeled.label, minlength=len(CLASS_NAMES))
    # Every file is computed before any is written: bad input never leaves one of them behind.
    io.write_parquet(UNLABELED, windows_table(unlabeled))
    io.write_parquet(LABELED, windows_table(labeled))
    io.write_parquet(LABEL_POOL, windows_table(out.pool))
    io.write_parquet(TEST, windows_table(out.test))
    print(
        f"Loaded {len(unlabeled):,} unlabeled windows ({len(unlabeled) - n_val:,} train, {n_val:,} validation; "
        f"{p.data.window} bars x {len(FEATURES)} features, from {p.data.bars})",
        flush=True,
    )
    print(
        f"{len(labeled)} labeled windows ({counts[0]} {CLASS_NAMES[0]}, {counts[1]} {CLASS_NAMES[1]}): the first "
        f"{len(labeled)} of the {len(out.pool)} in {p.data.labels} (the label-efficiency curve's pool)",
        flush=True,
    )
    if len(out.test):
        test_counts = np.bincount(out.test.label, minlength=len(CLASS_NAMES))
        print(
            f"{len(out.test)} held-out windows ({test_counts[0]} {CLASS_NAMES[0]}, {test_counts[1]} "
            f"{CLASS_NAMES[1]}) from {p.data.test_labels}; {out.excluded} unlabeled windows overlapped one and were "
            "left out of pretraining",
            flush=True,
        )
    else:
        print(f"no held-out set ({p.data.test_labels} has no rows)", flush=True)


if __name__ == "__main__":
    run_main(main)
