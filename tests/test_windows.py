"""Windowing, normalisation, the windows file format, and bad bars/labels."""

import numpy as np
import pandas as pd
import pytest

from moola.errors import DataError
from moola.market import generate_market
from moola.windows import (
    Windows,
    chronological_split,
    cut_windows,
    normalise,
    read_labels,
    read_windows,
    unlabeled_starts,
    validate_bars,
    windows_table,
)
from moola import io


def test_cut_windows_matches_plain_slicing():
    prices = np.arange(200 * 4, dtype=np.float64).reshape(200, 4)
    starts = unlabeled_starts(200, 20, 7, limit=1000)
    w = cut_windows(prices, starts, 20)
    assert w.shape == (len(starts), 20, 4)
    for i, s in enumerate(starts):
        assert np.array_equal(w[i], prices[s : s + 20])
    assert starts[-1] + 20 <= 200 and len(unlabeled_starts(200, 20, 7, limit=3)) == 3


def test_normalise_maps_each_window_range_to_unit_interval_and_keeps_ohlc_order():
    bars = generate_market(3000, seed=3).bars
    prices = bars[["open", "high", "low", "close"]].to_numpy()
    w = normalise(cut_windows(prices, unlabeled_starts(3000, 105, 50, 100), 105))
    assert w.dtype == np.float32
    assert np.allclose(w[..., 2].min(axis=1), 0) and np.allclose(w[..., 1].max(axis=1), 1)
    assert np.all(w[..., 2] <= w[..., 0] + 1e-6) and np.all(w[..., 0] <= w[..., 1] + 1e-6)
    # Scale-free: the same shape at ten times the price level normalises identically.
    assert np.allclose(normalise(cut_windows(prices * 10, np.array([0]), 105)), w[:1], atol=1e-6)
    flat = normalise(np.full((1, 5, 4), 3.0))
    assert np.all(flat == 0.5)


def test_chronological_split_holds_out_the_last_windows():
    split = chronological_split(10, 0.2)
    assert list(split) == ["train"] * 8 + ["val"] * 2
    assert list(chronological_split(3, 0.01)) == ["train", "train", "val"]


def test_windows_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    w = Windows(
        values=rng.random((6, 105, 4), dtype=np.float32),
        window_id=np.arange(6),
        start=np.array(pd.date_range("2024-01-02 09:30", periods=6, freq="5min")),
        label=np.array([0, 1, 0, 1, 1, 0]),
    )
    io.write_parquet(tmp_path / "w.parquet", windows_table(w))
    back = read_windows(tmp_path / "w.parquet")
    assert np.array_equal(back.values, w.values) and np.array_equal(back.label, w.label)
    assert np.array_equal(back.start, w.start) and back.split is None
    df = pd.read_parquet(tmp_path / "w.parquet")
    assert list(df["label_name"]) == ["consolidation", "retracement", "consolidation", "retracement", "retracement", "consolidation"]


def test_truncated_or_foreign_parquet_is_a_clear_error(tmp_path):
    good = tmp_path / "good.parquet"
    w = Windows(np.zeros((2, 5, 4), np.float32), np.arange(2), np.array(pd.date_range("2024-01-02", periods=2)))
    io.write_parquet(good, windows_table(w))
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated.parquet: not a readable parquet file"):
        read_windows(truncated)
    foreign = tmp_path / "foreign.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(foreign)
    with pytest.raises(DataError, match="not a moola windows file"):
        read_windows(foreign)
    with pytest.raises(DataError, match="missing.parquet: not found"):
        read_windows(tmp_path / "missing.parquet")


def bars_frame(n=50):
    return generate_market(n, seed=1).bars


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b.loc.__setitem__((4, "close"), np.nan), "row 5, field 'close'"),
        (lambda b: b.loc.__setitem__((2, "low"), -1.0), "row 3, field 'low': -1.0 (expected a price > 0)"),
        (lambda b: b.loc.__setitem__((7, "high"), b.loc[7, "low"] * 0.9), "row 8, field 'high'"),
        (lambda b: b.loc.__setitem__((9, "timestamp"), b.loc[8, "timestamp"]), "row 10, field 'timestamp': duplicate"),
        (lambda b: b.loc.__setitem__((9, "timestamp"), b.loc[3, "timestamp"]), "row 10, field 'timestamp'"),
    ],
)
def test_bad_bars_name_row_and_field(edit, message):
    b = bars_frame()
    edit(b)
    with pytest.raises(DataError) as info:
        validate_bars(b, "data/raw/bars.csv")
    assert message in str(info.value) and str(info.value).startswith("data/raw/bars.csv: ")


def test_missing_columns_are_named():
    with pytest.raises(DataError, match="missing column\\(s\\) high, low"):
        validate_bars(bars_frame().drop(columns=["high", "low"]), "bars.csv")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("2015-01-02 09:30", "sideways")], "row 1, field 'label': 'sideways' (expected one of consolidation, retracement)"),
        ([("2015-01-02 09:31", "retracement")], "row 1, field 'start': 2015-01-02 09:31 is not the timestamp of any bar"),
        ([("2015-01-02 15:55", "retracement")], "runs past the last bar"),
        ([("2015-01-02 09:30", "consolidation"), ("2015-01-02 09:35", "retracement")], "row 2, field 'start': window overlaps"),
    ],
)
def test_bad_labels_name_row_and_field(tmp_path, rows, message):
    stamps = bars_frame(78)["timestamp"].to_numpy()
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["start", "label"]).to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        read_labels(path, stamps, window=10)
    assert message in str(info.value)


def test_good_labels_map_to_bar_indices(tmp_path):
    stamps = bars_frame(78)["timestamp"].to_numpy()
    path = tmp_path / "labels.csv"
    pd.DataFrame([("2015-01-02 10:20", "retracement"), ("2015-01-02 09:30", "consolidation")],
                 columns=["start", "label"]).to_csv(path, index=False)
    starts, labels = read_labels(path, stamps, window=10)
    assert list(starts) == [10, 0] and list(labels) == [1, 0]
