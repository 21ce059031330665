"""Bars -> fixed-length windows: validation of bars and labels, windowing, per-window normalisation, file format.

Normalisation: each window is scaled by its own price range, (x - min(low)) / (max(high) - min(low)), so every
value lies in [0, 1], the OHLC relations (low <= open, close <= high) survive, and windows from any price level
or instrument look alike. A model sees shapes, not price levels.

File format (parquet, one row per window): window_id (int64), start (timestamp), then `split` ('train' | 'val')
for unlabeled windows or `bar` (int64: the index of the window's first bar in the bars file, so that distances
in bars are known: purged folds), `label` (0 consolidation, 1 retracement) and `label_name` for labeled ones, and
`values`: a fixed-size list of window * 4 float32, time-major (bar 0 open, high, low, close, bar 1 ...).

Timestamps (bars' `timestamp`, labels' `start`): ISO 8601 text or a parquet timestamp column. One with a UTC offset
(`+00:00`, `-05:00`, `Z`, or a time-zone-aware parquet column) is converted to UTC; one without is taken as it is
(as UTC). Within a file, and between bars and labels, it is all with offsets or all without: naive and aware
cannot be ordered against each other. Numbers (epoch seconds? milliseconds?) are refused, not guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moola.errors import DataError
from moola.params import CLASS_NAMES, FEATURES

PRICE_COLUMNS = list(FEATURES)


@dataclass(frozen=True)
class Windows:
    values: np.ndarray  # (n, window, 4) float32, normalised
    window_id: np.ndarray  # (n,) int64
    start: np.ndarray  # (n,) datetime64[ns]
    split: np.ndarray | None = None  # (n,) 'train' | 'val' (unlabeled windows)
    label: np.ndarray | None = None  # (n,) int64 (labeled windows)
    bar: np.ndarray | None = None  # (n,) int64: index of the first bar in the bars file (labeled windows)

    def __len__(self) -> int:
        return len(self.window_id)

    def subset(self, rows: np.ndarray) -> "Windows":
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return Windows(self.values[rows], self.window_id[rows], self.start[rows], pick(self.split), pick(self.label),
                       pick(self.bar))


# --- timestamps -------------------------------------------------------------------------------------------------

ISO_EXAMPLE = "ISO 8601, e.g. 2015-01-13 09:30:00, optionally with an offset such as -05:00 or Z"
# An offset after a time of day (a date alone, 2015-01-02, ends in digits that only look like one).
_OFFSET = re.compile(r"\d:\d{2}(?::\d{2}(?:\.\d+)?)?\s*(?:[zZ]|[+-]\d{2}(?::?\d{2})?)$")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_DAY_OR_MONTH_FIRST = re.compile(r"\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}")


def _first(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def parse_timestamps(column: pd.Series, path: str | Path, field: str) -> tuple[np.ndarray, bool]:
    """A timestamp column -> (datetime64[ns] in UTC, without a zone; whether the column carried offsets).

    Any problem is a DataError naming the file, the 1-based row and the field (rules: the module's docstring).
    """
    where = lambda i: f"{path}: row {i + 1}, field '{field}'"  # noqa: E731
    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(f"{where(_first(missing))}: missing (expected a date-time, {ISO_EXAMPLE})")
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        return column.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy().astype("datetime64[ns]"), True
    if pd.api.types.is_datetime64_dtype(column.dtype):
        return column.to_numpy().astype("datetime64[ns]"), False
    text = column.astype(str).str.strip()
    number = text.str.fullmatch(_NUMBER).to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype) or number.any():
        i = _first(number) if number.any() else 0
        raise DataError(
            f"{where(i)}: {text.iloc[i]} is a number, not a date-time (epoch seconds, milliseconds and nanoseconds "
            f"look alike, so moola does not guess); write timestamps as {ISO_EXAMPLE}"
        )
    aware = text.str.contains(_OFFSET).to_numpy(dtype=bool)
    if aware.any() and not aware.all():
        i = _first(aware != aware[0])
        has = lambda a: "has a UTC offset" if a else "has no UTC offset"  # noqa: E731
        raise DataError(
            f"{where(i)}: '{text.iloc[i]}' {has(aware[i])} but row 1 '{text.iloc[0]}' {has(aware[0])} (expected "
            "every timestamp with an offset, or none; offsets are converted to UTC)"
        )
    parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        i = _first(bad)
        value = text.iloc[i]
        hint = (
            "; write the year first (YYYY-MM-DD): day-first and month-first dates are ambiguous"
            if _DAY_OR_MONTH_FIRST.match(value)
            else ""
        )
        raise DataError(f"{where(i)}: '{value}' is not a date-time moola reads (expected {ISO_EXAMPLE}){hint}")
    return parsed.dt.tz_localize(None).to_numpy().astype("datetime64[ns]"), bool(aware[0])


def _plain(value) -> str:
    """A cell as a user wrote it: 'inf', 'NaN (empty)', or the text in quotes; never np.float64(...)."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = float(value)
        return "NaN (empty or not a number)" if np.isnan(value) else f"{value:g}"
    return repr(str(value))


# --- bars -------------------------------------------------------------------------------------------------------


def read_bars(path: str | Path) -> pd.DataFrame:
    """Read bars from .parquet or .csv and validate them (see `validate_bars`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (params.yaml data.bars names it; see docs/data-format.md)")
    _refuse_directory(path, "data.bars")
    try:
        if path.suffix == ".parquet":
            bars = pd.read_parquet(path)
        elif path.suffix == ".csv":
            bars = read_csv_file(path)
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
            f"{path}: missing column(s) {', '.join(missing)}{found_columns(bars.columns, missing)} (expected "
            "timestamp, open, high, low, close; volume optional)"
        )
    if len(bars) == 0:
        raise DataError(f"{path}: no rows (expected bars with timestamp, open, high, low, close)")
    parsed, with_offset = parse_timestamps(bars["timestamp"].reset_index(drop=True), path, "timestamp")
    stamps = pd.Series(parsed)
    prices = {}
    for col in PRICE_COLUMNS:
        values = pd.to_numeric(bars[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 1
            raise DataError(
                f"{path}: row {row}, field '{col}': {_plain(bars[col].iloc[row - 1])} (expected a finite price > 0)"
            )
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
    out = pd.DataFrame({"timestamp": parsed, **prices})
    out.attrs["timestamps_with_offset"] = with_offset  # labels must match (read_labels' bars_with_offset)
    return out


def _refuse_directory(path: Path, key: str) -> None:
    if path.is_dir():
        raise DataError(
            f"{path}: a directory, not a {path.suffix[1:] or 'data'} file (params.yaml {key} names it; expected one "
            "file; a partitioned dataset: write it as a single file)"
        )


def found_columns(columns, missing: list[str]) -> str:
    """': found <the header as written, quoted>' for a missing-column error, with a hint for stray spaces."""
    names = [str(c) for c in columns]
    found = ", ".join(repr(c) for c in names) if names else "no columns"
    spaced = [c for c in names if c != c.strip() and c.strip() in missing]
    hint = f"; {spaced[0]!r} has spaces around it: remove them" if spaced else ""
    return f" (found {found}{hint})"


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    """The row where decoding failed, and a guess at the encoding the file is in."""
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:200].count(b"\x00") > 20:
        guess, at = "UTF-16", 0
    else:
        guess = "Windows-1252 or Latin-1"
        try:
            data.decode("utf-8")
            at = exc.start
        except UnicodeDecodeError as own:
            at = own.start
    line = data[:at].count(b"\n") + 1
    where = "the header (line 1)" if line == 1 else f"row {line - 1}"
    return DataError(f"{path}: {where}: not UTF-8 (looks like {guess}, byte {at}); save it as UTF-8")


def read_csv_file(path: Path) -> pd.DataFrame:
    """pd.read_csv, with one-line errors for what a spreadsheet export gets wrong: not UTF-8, not comma-separated."""
    try:
        frame = pd.read_csv(path)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    if len(frame.columns) == 1:
        header = str(frame.columns[0])
        for sep, name in ((";", "';'"), ("\t", "tab")):
            if sep in header:
                raise DataError(
                    f"{path}: one column {header!r}: looks like {name}-separated; save it as comma-separated CSV"
                )
    return frame


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


def read_labels(
    path: str | Path, timestamps: np.ndarray, window: int, bars_with_offset: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """labels.csv (start, label) -> (start indices into the bars, labels 0/1), checked against the bars."""
    return match_labels(read_label_table(path), timestamps, window, path, bars_with_offset)


def read_label_table(path: str | Path, key: str = "data.labels") -> pd.DataFrame:
    """labels.csv as read, unchecked (match_labels checks it against the bars)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (params.yaml {key} names it; see docs/data-format.md)")
    _refuse_directory(path, key)
    try:
        return read_csv_file(path)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as csv ({type(exc).__name__}: {exc})") from None


def match_labels(
    labels: pd.DataFrame,
    timestamps: np.ndarray,
    window: int,
    path: str | Path = "labels",
    bars_with_offset: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A labels table (start, label) -> (start indices into the bars, labels 0/1). Rows are 1-based data rows.

    `bars_with_offset` (the bars' `timestamps_with_offset` attribute): the starts must agree, offsets or none.
    """
    missing = [c for c in ("start", "label") if c not in labels.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}{found_columns(labels.columns, missing)} (expected "
            "start, label)"
        )
    if len(labels) == 0:
        raise DataError(f"{path}: no rows (expected one labeled window per row)")
    index_of = pd.Index(timestamps)
    parsed, with_offset = parse_timestamps(labels["start"], path, "start")
    if bars_with_offset is not None and with_offset != bars_with_offset:
        state = lambda a: "have a UTC offset" if a else "have none"  # noqa: E731
        raise DataError(
            f"{path}: row 1, field 'start': '{labels['start'].iloc[0]}': the starts {state(with_offset)} but the "
            f"bars' timestamps {state(bars_with_offset)} (expected both files with offsets, or neither)"
        )
    starts, classes = [], []
    for row, (start, stamp, label) in enumerate(zip(labels["start"], parsed, labels["label"]), start=1):
        name = str(label).strip()
        if name not in CLASS_NAMES:
            raise DataError(
                f"{path}: row {row}, field 'label': {_plain(label)} (expected one of {', '.join(CLASS_NAMES)})"
            )
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


# --- what the rest of the pipeline needs -----------------------------------------------------------------------


def check_pipeline_can_finish(
    unlabeled: Windows, labeled: Windows, folds: int, bars_source: str, labels_source: str
) -> None:
    """Refuse at prepare, in seconds, data on which a later stage would fail hours later (after pretraining).

    Pretraining needs a training and a validation window; stratified out-of-fold fine-tuning needs both classes,
    each with at least `folds` windows.
    """
    n_train = int(np.sum(unlabeled.split == "train")) if unlabeled.split is not None else len(unlabeled)
    n_val = len(unlabeled) - n_train
    if n_train < 1 or n_val < 1:
        raise DataError(
            f"{bars_source}: yields {len(unlabeled)} unlabeled window(s) ({n_train} train, {n_val} validation); "
            "pretraining needs at least one of each (expected more bars, or a smaller data.window or data.stride "
            "in params.yaml)"
        )
    counts = np.bincount(labeled.label, minlength=len(CLASS_NAMES))
    found = ", ".join(f"{n} {name}" for name, n in zip(CLASS_NAMES, counts))
    absent = [name for name, n in zip(CLASS_NAMES, counts) if n == 0]
    if absent:
        raise DataError(
            f"{labels_source}: field 'label': no '{absent[0]}' windows (found {found}); the classifier needs both "
            f"classes, each with at least finetune.folds={folds} windows"
        )
    if counts.min() < folds:
        raise DataError(
            f"{labels_source}: field 'label': {found}, fewer than finetune.folds={folds} of each class (stratified "
            f"folds need every class in every fold); label more windows or set finetune.folds in params.yaml to at "
            f"most {int(counts.min())}"
        )


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
    if w.bar is not None:
        columns["bar"] = pa.array(w.bar, type=pa.int64())
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
        # Pages written by moola.io carry a CRC; a flipped bit is caught here instead of becoming a wrong number.
        table = pq.read_table(path, page_checksum_verification=True)
    except Exception as exc:
        if "checksum" in str(exc).lower():
            from moola.io import restore_advice

            raise DataError(
                f"{path}: damaged (a data page fails its CRC checksum); {restore_advice(path, 'prepare')}"
            ) from None
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
        bar=table.column("bar").to_numpy() if "bar" in table.column_names else None,
    )
