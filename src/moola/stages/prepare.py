"""Stage prepare: the bars and labels files named by params (data.bars, data.labels) -> data/prepared windows.

The files are a user's own (see README, "Data format") or the example market's, which the example_market stage
writes in the same format; dvc.yaml lists whichever files params name as this stage's deps.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moola import io
from moola.errors import DataError, run_main
from moola.params import CLASS_NAMES, FEATURES, Params, load_params
from moola.windows import (
    LABELED,
    UNLABELED,
    Windows,
    check_pipeline_can_finish,
    chronological_split,
    cut_windows,
    match_labels,
    normalise,
    read_bars,
    read_label_table,
    unlabeled_starts,
    windows_table,
)

__all__ = ["LABELED", "UNLABELED", "prepare", "main"]


def prepare(p: Params, bars: pd.DataFrame, labels: pd.DataFrame) -> tuple[Windows, Windows]:
    """Validated bars (windows.validate_bars) and a labels table (start, label) -> (unlabeled, labeled) windows.

    The unlabeled windows are the first p.unlabeled_windows starts, every data.stride bars."""
    d = p.data
    min_bars = d.window + 9 * d.stride  # ten windows: enough for a training and a validation split
    if len(bars) < min_bars:
        raise DataError(
            f"{d.bars}: {len(bars)} bars, too few (expected at least {min_bars}: ten windows of data.window="
            f"{d.window} every data.stride={d.stride} bars)"
        )
    timestamps = bars["timestamp"].to_numpy()
    prices = bars[list(FEATURES)].to_numpy()
    labeled_starts, classes = match_labels(
        labels, timestamps, d.window, d.labels, bars.attrs.get("timestamps_with_offset")
    )
    starts = unlabeled_starts(len(bars), d.window, d.stride, p.unlabeled_windows)
    unlabeled = Windows(
        values=normalise(cut_windows(prices, starts, d.window)),
        window_id=np.arange(len(starts), dtype=np.int64),
        start=timestamps[starts],
        split=chronological_split(len(starts), d.val_fraction),
    )
    labeled = Windows(
        values=normalise(cut_windows(prices, labeled_starts, d.window)),
        window_id=np.arange(len(labeled_starts), dtype=np.int64),
        start=timestamps[labeled_starts],
        label=classes,
    )
    return unlabeled, labeled


def main() -> None:
    p = load_params()
    bars = read_bars(p.data.bars)
    unlabeled, labeled = prepare(p, bars, read_label_table(p.data.labels))
    # Fail now, not after hours of pretraining (finetune.folds is checked, not used: it is no dep of this stage).
    check_pipeline_can_finish(unlabeled, labeled, p.finetune.folds, p.data.bars, p.data.labels)
    n_val = int(np.sum(unlabeled.split == "val"))
    counts = np.bincount(labeled.label, minlength=len(CLASS_NAMES))
    # Both files are computed before either is written: bad input never leaves one of them behind.
    io.write_parquet(UNLABELED, windows_table(unlabeled))
    io.write_parquet(LABELED, windows_table(labeled))
    print(
        f"Loaded {len(unlabeled):,} unlabeled windows ({len(unlabeled) - n_val:,} train, {n_val:,} validation; "
        f"{p.data.window} bars x {len(FEATURES)} features, from {p.data.bars})",
        flush=True,
    )
    print(
        f"{len(labeled)} labeled windows ({counts[0]} {CLASS_NAMES[0]}, {counts[1]} {CLASS_NAMES[1]})",
        flush=True,
    )


if __name__ == "__main__":
    run_main(main)
