"""Bars -> fixed-length windows: validation of bars and labels, windowing, per-window normalisation, file format.

Normalisation: each window is scaled by its own price range, (x - min(low)) / (max(high) - min(low)), so every
value lies in [0, 1], the OHLC relations (low <= open, close <= high) survive, and windows from any price level
or instrument look alike. A model sees shapes, not price levels.

File format (parquet, one row per window): window_id (int64), start (timestamp), then `split` ('train' | 'val')
for unlabeled windows or `label` (0 consolidation, 1 retracement) and `label_name` for labeled ones, and
`values`: a fixed-size list of window * 4 float32, time-major (bar 0 open, high, low, close, bar 1 ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moola.errors import DataError
from moola.params import CLASS_NAMES, FEATURES

PRICE_COLUMNS = list(FEATURES)
# Where the prepare stage writes its windows (dvc.yaml names the same paths).
UNLABELED = "data/prepared/unlabeled_windows.parquet"
LABELED = "data/prepared/labeled_windows.parquet"
# The whole labels.csv (the label-efficiency curve's pool; LABELED is its first data.labeled_windows rows) and the
# held-out windows, which only the evaluation stages read.
LABEL_POOL = "data/prepared/label_pool.parquet"
TEST = "data/prepared/test_windows.parquet"


@dataclass(frozen=True)
class Windows:
    values: np.ndarray  # (n, window, 4) float32, normalised
    window_id: np.ndarray  # (n,) int64
    start: np.ndarray  # (n,) datetime64[ns]
    split: np.ndarray | None = None  # (n,) 'train' | 'val' (unlabeled windows)
    label: np.ndarray | None = None  # (n,) int64 (labeled windows)

    def __len__(self) -> int:
        return len(self.window_id)

    def subset(self, rows: np.ndarray) -> "Windows":
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return Windows(self.values[rows], self.window_id[rows], self.start[rows], pick(self.split), pick(self.label))


# --- bars -------------------------------------------------------------------------------------------------------


def read_bars(path: str | Path) -> pd.DataFrame:
    """Read bars from .parquet or .csv and validate them (see `validate_bars`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (params.yaml data.bars names it; see README, 'Data format')")
    try:
        if path.suffix == ".parquet":
            bars = pd.read_parquet(path)
        elif path.suffix == ".csv":
            bars = pd.read_csv(path)
        else:
            raise DataError(f"{path}: unknown bars format '{path.suffix}' (expected .parquet or .csv)")
    except DataError:
        raise
    except Exception as exc:  # pyarrow and pandas raise many types for a truncated or foreign file
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]} ({type(exc).__name__}: {exc})") from None
    return validate_bars(bars, path)


def validate_bars(bars: pd.DataFrame, path: str | Path = "bars") -> pd.DataFrame:
    """Check columns, types and bar validity; return timestamp + OHLC, sorted as given. Rows are 1-based data rows."""
    missing = [c for c in ["timestamp", *PRICE_COLUMNS] if c not in bars.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (expected timestamp, open, high, low, close; volume optional)"
        )
    if len(bars) == 0:
        raise DataError(f"{path}: no rows (expected bars with timestamp, open, high, low, close)")
    try:
        stamps = pd.to_datetime(bars["timestamp"], utc=False)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: field 'timestamp' is not a date-time column ({exc})") from None
    if stamps.isna().any():
        row = int(np.flatnonzero(stamps.isna().to_numpy())[0]) + 1
        raise DataError(f"{path}: row {row}, field 'timestamp': missing (expected a date-time)")
    prices = {}
    for col in PRICE_COLUMNS:
        values = pd.to_numeric(bars[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 1
            raise DataError(f"{path}: row {row}, field '{col}': {bars[col].iloc[row - 1]!r} (expected a finite number)")
        nonpositive = values <= 0
        if nonpositive.any():
            row = int(np.flatnonzero(nonpositive)[0]) + 1
            raise DataError(f"{path}: row {row}, field '{col}': {values[row - 1]} (expected a price > 0)")
        prices[col] = values
    o, h, l, c = (prices[k] for k in PRICE_COLUMNS)
    checks = [
        (h < l, "high", "high >= low"),
        (o > h, "open", "open <= high"),
        (o < l, "open", "open >= low"),
        (c > h, "close", "close <= high"),
        (c < l, "close", "close >= low"),
    ]
    for bad, field, expected in checks:
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 1
            raise DataError(f"{path}: row {row}, field '{field}': bar has {_bar_text(prices, row - 1)} (expected {expected})")
    ts = stamps.to_numpy()
    step = np.diff(ts)
    if (step == np.timedelta64(0)).any():
        row = int(np.flatnonzero(step == np.timedelta64(0))[0]) + 2
        raise DataError(f"{path}: row {row}, field 'timestamp': duplicate of the previous row ({stamps.iloc[row - 1]})")
    if (step < np.timedelta64(0)).any():
        row = int(np.flatnonzero(step < np.timedelta64(0))[0]) + 2
        raise DataError(
            f"{path}: row {row}, field 'timestamp': {stamps.iloc[row - 1]} is before the previous row "
            "(expected timestamps sorted ascending)"
        )
    return pd.DataFrame({"timestamp": stamps.to_numpy(), **prices})


def _bar_text(prices: dict, i: int) -> str:
    return ", ".join(f"{k}={prices[k][i]:g}" for k in PRICE_COLUMNS)


# --- windows ----------------------------------------------------------------------------------------------------


def normalise(windows: np.ndarray) -> np.ndarray:
    """Per-window min-max over the window's range: (x - min(low)) / (max(high) - min(low)), as float32."""
    low = windows[..., FEATURES.index("low")].min(axis=1, keepdims=True)[..., None]
    high = windows[..., FEATURES.index("high")].max(axis=1, keepdims=True)[..., None]
    # A window with no range at all (a halted market) maps to the middle instead of dividing by zero.
    span = high - low
    scaled = np.where(span > 0, (windows - low) / np.where(span > 0, span, 1.0), 0.5)
    return scaled.astype(np.float32)


def cut_windows(prices: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """prices (n_bars, 4) -> windows (len(starts), window, 4), without a Python loop (a strided view, then a gather)."""
    view = np.lib.stride_tricks.sliding_window_view(prices, window, axis=0)  # (n_bars - window + 1, 4, window)
    return np.ascontiguousarray(view[starts].transpose(0, 2, 1))


def unlabeled_starts(n_bars: int, window: int, stride: int, limit: int) -> np.ndarray:
    """Start indices every `stride` bars, at most `limit` of them (the first ones)."""
    available = (n_bars - window) // stride + 1 if n_bars >= window else 0
    return np.arange(min(available, limit), dtype=np.int64) * stride


def chronological_split(n: int, val_fraction: float) -> np.ndarray:
    """The last `val_fraction` of the windows (in time order) validate; at least one of each."""
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    split = np.full(n, "train", dtype=object)
    split[n - n_val :] = "val"
    return split


def read_labels(path: str | Path, timestamps: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """labels.csv (start, label) -> (start indices into the bars, labels 0/1), checked against the bars."""
    return match_labels(read_label_table(path), timestamps, window, path)


def read_label_table(path: str | Path, key: str = "data.labels") -> pd.DataFrame:
    """labels.csv as read, unchecked (match_labels checks it against the bars)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (params.yaml {key} names it; see README, 'Data format')")
    try:
        return pd.read_csv(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as csv ({type(exc).__name__}: {exc})") from None


def match_labels(
    labels: pd.DataFrame, timestamps: np.ndarray, window: int, path: str | Path = "labels"
) -> tuple[np.ndarray, np.ndarray]:
    """A labels table (start, label) -> (start indices into the bars, labels 0/1). Rows are 1-based data rows."""
    missing = [c for c in ("start", "label") if c not in labels.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected start, label)")
    if len(labels) == 0:
        raise DataError(f"{path}: no rows (expected one labeled window per row)")
    index_of = pd.Index(timestamps)
    starts, classes = [], []
    for row, (start, label) in enumerate(zip(labels["start"], labels["label"]), start=1):
        name = str(label).strip()
        if name not in CLASS_NAMES:
            raise DataError(
                f"{path}: row {row}, field 'label': {label!r} (expected one of {', '.join(CLASS_NAMES)})"
            )
        try:
            stamp = pd.Timestamp(start)
        except (ValueError, TypeError):
            raise DataError(f"{path}: row {row}, field 'start': {start!r} (expected a date-time)") from None
        if stamp not in index_of:
            raise DataError(f"{path}: row {row}, field 'start': {start} is not the timestamp of any bar")
        i = int(index_of.get_loc(stamp))
        if i + window > len(timestamps):
            raise DataError(
                f"{path}: row {row}, field 'start': the window of {window} bars from {start} runs past the last bar "
                f"({len(timestamps) - i} bars left)"
            )
        starts.append(i)
        classes.append(CLASS_NAMES.index(name))
    starts_arr = np.asarray(starts, dtype=np.int64)
    order = np.argsort(starts_arr, kind="stable")
    overlap = np.diff(starts_arr[order]) < window
    if overlap.any():
        row = int(order[np.flatnonzero(overlap)[0] + 1]) + 1
        raise DataError(
            f"{path}: row {row}, field 'start': window overlaps another labeled window "
            f"(expected starts at least {window} bars apart, so that folds cannot leak)"
        )
    return starts_arr, np.asarray(classes, dtype=np.int64)


def overlapping(starts: np.ndarray, others: np.ndarray, window: int) -> np.ndarray:
    """Per start in `starts`: whether its window (window bars from it) shares a bar with any window in `others`."""
    if len(others) == 0:
        return np.zeros(len(starts), dtype=bool)
    ordered = np.sort(others)
    # The nearest other start at or after s, and the nearest before it: windows overlap when closer than `window`.
    after = np.searchsorted(ordered, starts, side="left")
    next_gap = np.where(after < len(ordered), ordered[np.minimum(after, len(ordered) - 1)] - starts, window)
    prev_gap = np.where(after > 0, starts - ordered[np.maximum(after - 1, 0)], window)
    return (next_gap < window) | (prev_gap < window)


# --- file format ------------------------------------------------------------------------------------------------


def windows_table(w: Windows) -> pa.Table:
    n, length, features = w.values.shape
    flat = pa.array(np.ascontiguousarray(w.values, dtype=np.float32).reshape(-1), type=pa.float32())
    columns = {
        "window_id": pa.array(w.window_id, type=pa.int64()),
        "start": pa.array(w.start.astype("datetime64[ns]"), type=pa.timestamp("ns")),
    }
    if w.split is not None:
        columns["split"] = pa.array(w.split.astype(str), type=pa.string())
    if w.label is not None:
        columns["label"] = pa.array(w.label, type=pa.int64())
        columns["label_name"] = pa.array([CLASS_NAMES[i] for i in w.label], type=pa.string())
    columns["values"] = pa.FixedSizeListArray.from_arrays(flat, length * features)
    meta = {b"moola.window": str(length).encode(), b"moola.features": ",".join(FEATURES).encode()}
    return pa.table(columns).replace_schema_metadata(meta)


def read_windows(path: str | Path) -> Windows:
    """Read a prepared windows file; a missing, truncated or foreign file is a one-line DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (run `dvc repro prepare` first)")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    meta = table.schema.metadata or {}
    if b"moola.window" not in meta or "values" not in table.column_names or "window_id" not in table.column_names:
        raise DataError(f"{path}: not a moola windows file (expected columns window_id, start, values)")
    length = int(meta[b"moola.window"])
    values_col = table.column("values").combine_chunks()
    values = values_col.values.to_numpy(zero_copy_only=False).reshape(len(table), length, len(FEATURES))
    return Windows(
        values=values.astype(np.float32, copy=False),
        window_id=table.column("window_id").to_numpy(),
        start=table.column("start").to_numpy().astype("datetime64[ns]"),
        split=np.asarray(table.column("split").to_pylist(), dtype=object) if "split" in table.column_names else None,
        label=table.column("label").to_numpy() if "label" in table.column_names else None,
    )
