"""Stage prepare: bars -> data/prepared/{unlabeled,labeled}_windows.parquet.

Source `example` generates the built-in seeded market (unlabeled windows first, the labeled ones from a later,
separate stretch of time); source `files` reads data/raw bars and labels (see README, "Data format").
"""

from __future__ import annotations

import numpy as np

from moola import io, market
from moola.errors import DataError, run_main
from moola.params import CLASS_NAMES, FEATURES, Params, load_params
from moola.windows import (
    Windows,
    check_pipeline_can_finish,
    chronological_split,
    cut_windows,
    normalise,
    read_bars,
    read_labels,
    unlabeled_starts,
    windows_table,
)

UNLABELED = "data/prepared/unlabeled_windows.parquet"
LABELED = "data/prepared/labeled_windows.parquet"
# Bars between the unlabeled stretch and the labeled one in the example market: a trading week.
EXAMPLE_GAP_BARS = 5 * market.BARS_PER_DAY


def example_source(p: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prices, timestamps, unlabeled starts, labeled starts, labels) from the built-in market."""
    d = p.data
    # The market is always the spec's length: scale.windows takes fewer unlabeled windows from its start, and the
    # labeled windows (from the stretch after the spec's unlabeled bars) are the same at every scale.
    spec_bars = (d.unlabeled_windows - 1) * d.stride + d.window
    # Generous room for the labeled windows: consolidations and retracements are about half of all bars.
    n_bars = spec_bars + EXAMPLE_GAP_BARS + 6 * d.labeled_windows * d.window
    m = market.generate_market(n_bars, p.seed)
    labeled, labels = market.pick_labeled_ends(
        m, spec_bars + EXAMPLE_GAP_BARS, d.labeled_windows, d.window, d.min_final_segment, p.seed
    )
    if len(labeled) < d.labeled_windows:
        raise DataError(f"example market: found only {len(labeled)} of data.labeled_windows={d.labeled_windows}")
    prices = m.bars[list(FEATURES)].to_numpy()
    starts = unlabeled_starts(spec_bars, d.window, d.stride, p.unlabeled_windows)
    return prices, m.bars["timestamp"].to_numpy(), starts, labeled, labels


def files_source(p: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = p.data
    bars = read_bars(d.bars)
    min_bars = d.window + 9 * d.stride  # ten windows: enough for a training and a validation split
    if len(bars) < min_bars:
        raise DataError(
            f"{d.bars}: {len(bars)} bars, too few (expected at least {min_bars}: ten windows of data.window="
            f"{d.window} every data.stride={d.stride} bars)"
        )
    timestamps = bars["timestamp"].to_numpy()
    labeled, labels = read_labels(d.labels, timestamps, d.window, bars.attrs.get("timestamps_with_offset"))
    starts = unlabeled_starts(len(bars), d.window, d.stride, p.unlabeled_windows)
    return bars[list(FEATURES)].to_numpy(), timestamps, starts, labeled, labels


def prepare(p: Params) -> tuple[Windows, Windows]:
    source = example_source if p.data.source == "example" else files_source
    prices, timestamps, starts, labeled_starts, labels = source(p)
    unlabeled = Windows(
        values=normalise(cut_windows(prices, starts, p.data.window)),
        window_id=np.arange(len(starts), dtype=np.int64),
        start=timestamps[starts],
        split=chronological_split(len(starts), p.data.val_fraction),
    )
    labeled = Windows(
        values=normalise(cut_windows(prices, labeled_starts, p.data.window)),
        window_id=np.arange(len(labeled_starts), dtype=np.int64),
        start=timestamps[labeled_starts],
        label=labels,
    )
    return unlabeled, labeled


def main() -> None:
    p = load_params()
    unlabeled, labeled = prepare(p)
    # Fail now, not after hours of pretraining (finetune.folds is checked, not used: it is no dep of this stage).
    bars, labels = (p.data.bars, p.data.labels) if p.data.source == "files" else ("example market (data.*)",) * 2
    check_pipeline_can_finish(unlabeled, labeled, p.finetune.folds, bars, labels)
    n_val = int(np.sum(unlabeled.split == "val"))
    counts = np.bincount(labeled.label, minlength=len(CLASS_NAMES))
    # Both files are computed before either is written: bad input never leaves one of them behind.
    io.write_parquet(UNLABELED, windows_table(unlabeled))
    io.write_parquet(LABELED, windows_table(labeled))
    print(
        f"Loaded {len(unlabeled):,} unlabeled windows ({len(unlabeled) - n_val:,} train, {n_val:,} validation; "
        f"{p.data.window} bars x {len(FEATURES)} features, source '{p.data.source}')",
        flush=True,
    )
    print(
        f"{len(labeled)} labeled windows ({counts[0]} {CLASS_NAMES[0]}, {counts[1]} {CLASS_NAMES[1]})",
        flush=True,
    )


if __name__ == "__main__":
    run_main(main)
