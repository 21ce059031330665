"""The example_market, prepare and augment stages through real commands: outputs, logs, bad input, `dvc repro`."""

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import make_repo, run, write_raw_files
from moola.market import generate_market
from moola.windows import read_bars, read_labels, read_windows

OUTPUTS = ["data/prepared/unlabeled_windows.parquet", "data/prepared/labeled_windows.parquet"]


def stage(repo: Path, module: str, *args: str, check: bool = True):
    return run(["python", "-m", f"moola.stages.{module}", *args], repo, check=check)


def set_params(repo: Path, **sections) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in sections.items():
        params[key].update(value) if isinstance(value, dict) else params.__setitem__(key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def plain_repo(tmp_path):
    return make_repo(tmp_path / "repo", git=False)


def test_example_market_writes_files_in_the_users_format(plain_repo):
    out = stage(plain_repo, "example_market").stdout
    bars = read_bars(plain_repo / "data/example/bars.parquet")  # the checks a user's bars get
    starts, labels = read_labels(plain_repo / "data/example/labels.csv", bars["timestamp"].to_numpy(), 105)
    # The label pool (conftest.TINY: data.label_pool 120) in time order; fine-tuning takes its first 89.
    assert f"Example market: {len(bars):,} bars" in out and len(starts) == 120 and np.all(np.diff(starts) > 0)
    assert list(pd.read_csv(plain_repo / "data/example/labels.csv").columns) == ["start", "label"]
    # The unlabeled windows (11,873 every 10 bars at spec) end a trading week before the first labeled one.
    assert starts.min() >= (11873 - 1) * 10 + 105 + 5 * 78


def test_example_source_logs_the_counts_and_writes_windows(plain_repo):
    stage(plain_repo, "example_market")
    proc = stage(plain_repo, "prepare")
    out = proc.stdout
    assert "warning:" not in proc.stderr  # the example market has no outlier and no window that normalises flat
    unlabeled = read_windows(plain_repo / OUTPUTS[0])
    labeled = read_windows(plain_repo / OUTPUTS[1])
    assert f"Loaded {len(unlabeled)} unlabeled windows" in out
    counts = np.bincount(labeled.label)
    assert f"89 labeled windows ({counts[0]} consolidation, {counts[1]} retracement)" in out
    assert unlabeled.values.shape[1:] == (105, 4) and labeled.values.shape == (89, 105, 4)
    assert list(np.unique(unlabeled.split)) == ["train", "val"]
    assert unlabeled.start[unlabeled.split == "val"].min() > unlabeled.start[unlabeled.split == "train"].max()
    # Labeled windows come from a later stretch of the market than every unlabeled one, and do not overlap.
    assert labeled.start.min() > unlabeled.start.max()
    assert counts.min() > 10  # both classes are really there

    aug = stage(plain_repo, "augment", "--recipe", "warp12_x4").stdout
    n_train = int(np.sum(unlabeled.split == "train"))
    arr = np.load(plain_repo / "data/augmented/warp12_x4.npy")
    assert arr.shape == (n_train * 5, 105, 4) and f"= {n_train * 5:,} samples" in aug
    assert np.array_equal(arr[:n_train], unlabeled.values[unlabeled.split == "train"])


def write_files_source(repo: Path, bars: pd.DataFrame, labels: pd.DataFrame, suffix: str = ".csv") -> None:
    write_raw_files(repo, bars, labels, suffix)
    # Two folds: four labeled windows (two of each class) are enough for prepare's early fold check.
    set_params(repo, data={"bars": f"data/raw/bars{suffix}", "labels": "data/raw/labels.csv",
                                  "test_labels": "data/no_test_labels.csv"}, finetune={"folds": 2})


def good_files():
    bars = generate_market(3000, seed=11).bars
    stamps = bars["timestamp"]
    labels = pd.DataFrame(
        {"start": [stamps[0], stamps[200], stamps[900], stamps[1500]],
         "label": ["consolidation", "retracement", "retracement", "consolidation"]}
    )
    return bars, labels


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_files_source_reads_user_bars_and_labels(plain_repo, suffix):
    bars, labels = good_files()
    write_files_source(plain_repo, bars, labels, suffix)
    out = stage(plain_repo, "prepare").stdout
    assert "4 labeled windows (2 consolidation, 2 retracement)" in out
    labeled = read_windows(plain_repo / OUTPUTS[1])
    assert list(labeled.label) == [0, 1, 1, 0]
    assert pd.Timestamp(labeled.start[1]) == bars["timestamp"][200]


BAD_INPUTS = {
    "nan price": (lambda b, l: b.loc.__setitem__((17, "open"), np.nan), "bars.csv: row 18, field 'open'"),
    "negative price": (lambda b, l: b.loc.__setitem__((5, "close"), -3.0), "row 6, field 'close': -3.0 (expected a price > 0)"),
    "high below low": (lambda b, l: b.loc.__setitem__((9, "high"), b.loc[9, "low"] / 2), "row 10, field 'high'"),
    "unsorted": (lambda b, l: b.loc.__setitem__((30, "timestamp"), b.loc[2, "timestamp"]), "row 31, field 'timestamp'"),
    "duplicate": (lambda b, l: b.loc.__setitem__((30, "timestamp"), b.loc[29, "timestamp"]), "row 31, field 'timestamp': duplicate"),
    "missing column": (lambda b, l: b.pop("low") is None, "bars.csv: missing column(s) low"),
    "too few rows": (lambda b, l: "truncate", "bars.csv: 100 bars, too few"),
    "unknown class": (lambda b, l: l.loc.__setitem__((2, "label"), "breakout"), "labels.csv: row 3, field 'label': 'breakout'"),
    "label out of range": (lambda b, l: l.loc.__setitem__((3, "start"), b["timestamp"].iloc[-20]), "labels.csv: row 4, field 'start'"),
}


def _as_text(frame: pd.DataFrame, column: str, fmt: str, offset: str = "") -> None:
    frame[column] = pd.to_datetime(frame[column]).dt.strftime(fmt) + offset


def _naive_and_aware(b, l):
    _as_text(b, "timestamp", "%Y-%m-%d %H:%M:%S")
    b.loc[10, "timestamp"] += "+00:00"


def _epoch_seconds(frame, column):
    frame[column] = pd.to_datetime(frame[column]).astype("datetime64[s]").astype("int64")


def _labels_naive_bars_aware(b, l):
    _as_text(b, "timestamp", "%Y-%m-%dT%H:%M:%S", "-05:00")


def _yesterday(b, l):
    l["start"] = l["start"].astype(str)
    l.loc[2, "start"] = "yesterday"


def _one_class(b, l):
    l["label"] = "consolidation"


def _too_few_of_a_class(b, l):
    l["label"] = ["consolidation", "retracement", "consolidation", "consolidation"]


# Issue 16: time zones, integer timestamps, day-first dates, non-finite prices printed plainly, and what would make
# a later stage fail (one class only, fewer windows of a class than finetune.folds), refused at prepare.
BAD_INPUTS.update({
    "naive and aware timestamps mixed": (_naive_and_aware, "bars.csv: row 11, field 'timestamp': '2015-01-02 10:20:00+00:00' has a UTC offset but row 1"),
    "epoch seconds in bars (labels ISO)": (lambda b, l: _epoch_seconds(b, "timestamp"), "bars.csv: row 1, field 'timestamp': 1420191000 is a number, not a date-time"),
    "epoch seconds in labels": (lambda b, l: _epoch_seconds(l, "start"), "labels.csv: row 1, field 'start': 1420191000 is a number"),
    "day-first dates": (lambda b, l: _as_text(b, "timestamp", "%d/%m/%Y %H:%M"), "bars.csv: row 1, field 'timestamp': '02/01/2015 09:30' is not a date-time moola reads (expected ISO 8601"),
    "labels naive, bars with offsets": (_labels_naive_bars_aware, "labels.csv: row 1, field 'start': '2015-01-02 09:30:00': the starts have none but the bars' timestamps have a UTC offset"),
    "unparseable label start": (_yesterday, "labels.csv: row 3, field 'start': 'yesterday' is not a date-time"),
    "infinite price": (lambda b, l: b.loc.__setitem__((5, "high"), np.inf), "bars.csv: row 6, field 'high': inf (expected a finite price > 0)"),
    "empty price": (lambda b, l: b.loc.__setitem__((7, "low"), None), "bars.csv: row 8, field 'low': NaN (empty or not a number)"),
    "one class only": (_one_class, "labels.csv: field 'label': no 'retracement' windows (found 4 consolidation, 0 retracement)"),
    "fewer windows of a class than folds": (_too_few_of_a_class, "labels.csv: field 'label': 3 consolidation, 1 retracement, fewer than finetune.folds=2 of each class"),
})


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_output(plain_repo, case):
    # A previous good run's outputs must survive a failed run untouched.
    stage(plain_repo, "example_market")
    stage(plain_repo, "prepare")
    before = {p: (plain_repo / p).read_bytes() for p in OUTPUTS}
    bars, labels = good_files()
    edit, message = BAD_INPUTS[case]
    if edit(bars, labels) == "truncate":
        bars = bars.iloc[:100]
    write_files_source(plain_repo, bars, labels)
    proc = stage(plain_repo, "prepare", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert "np.float64" not in lines[0] and "format=" not in lines[0], lines  # pandas' advice the user cannot follow
    assert {p: (plain_repo / p).read_bytes() for p in OUTPUTS} == before
    assert not list((plain_repo / "data/prepared").glob(".*tmp"))


def test_empty_or_truncated_prepared_file_stops_augment(plain_repo):
    stage(plain_repo, "example_market")
    stage(plain_repo, "prepare")
    path = plain_repo / OUTPUTS[0]
    path.write_bytes(path.read_bytes()[:1000])
    proc = stage(plain_repo, "augment", "--recipe", "warp12_x4", check=False)
    assert proc.returncode == 2
    assert "unlabeled_windows.parquet: not a readable parquet file" in proc.stderr
    assert not (plain_repo / "data/augmented/warp12_x4.npy").exists()
    path.write_bytes(b"")
    proc = stage(plain_repo, "augment", "--recipe", "warp12_x4", check=False)
    assert proc.returncode == 2 and "not a readable parquet file" in proc.stderr


@pytest.mark.integration
def test_dvc_repro_prepare_augment_then_nothing_to_do(tiny_repo):
    out = run(["dvc", "repro", "prepare", "augment"], tiny_repo).stdout
    for name in ["example_market", "prepare", "augment@warp12_x4", "augment@warp10_x3", "augment@warp15_x5"]:
        assert f"Running stage '{name}'" in out
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    assert lock["stages"]["augment@warp10_x3"]["params"]["params.yaml"]["augment.recipes.warp10_x3"] == {
        "time_warp_sigma": 0.1, "multiplier": 3}
    n_train = int(np.sum(read_windows(tiny_repo / OUTPUTS[0]).split == "train"))
    assert np.load(tiny_repo / "data/augmented/warp15_x5.npy", mmap_mode="r").shape[0] == n_train * 6
    # Data never enters git: DVC wrote .gitignore entries for every output.
    assert "/unlabeled_windows.parquet" in (tiny_repo / "data/prepared/.gitignore").read_text()
    again = run(["dvc", "repro", "prepare", "augment"], tiny_repo).stdout
    assert "Running stage" not in again
    assert "didn't change, skipping" in again
    # Changing one recipe re-runs that recipe alone.
    set_params(tiny_repo, augment={"recipes": {**yaml.safe_load((tiny_repo / "params.yaml").read_text())["augment"]["recipes"],
                                               "warp10_x3": {"time_warp_sigma": 0.1, "multiplier": 2}}})
    changed = run(["dvc", "repro", "prepare", "augment"], tiny_repo).stdout
    assert "Running stage 'augment@warp10_x3'" in changed
    assert "Running stage 'augment@warp12_x4'" not in changed and "Running stage 'prepare'" not in changed


def _with_offsets(stamps: pd.Series, switch_row: int | None) -> tuple[pd.Series, np.ndarray]:
    """New York wall-clock stamps as text with -05:00 (-04:00 from `switch_row`: daylight saving), and their UTC."""
    hours = np.full(len(stamps), 5)
    if switch_row is not None:
        hours[switch_row:] = 4
    text = stamps.dt.strftime("%Y-%m-%dT%H:%M:%S") + pd.Series(np.where(hours == 5, "-05:00", "-04:00"))
    return text, (stamps + pd.to_timedelta(hours, unit="h")).to_numpy()


@pytest.mark.parametrize("case", ["one offset", "two offsets (daylight saving)", "utc parquet column"])
def test_timestamps_with_offsets_are_read_as_utc(plain_repo, case):
    bars, labels = good_files()
    stamps = bars["timestamp"].copy()
    rows = [0, 200, 900, 1500]
    if case == "utc parquet column":
        bars["timestamp"] = stamps.dt.tz_localize("UTC")
        labels["start"] = stamps[rows].dt.strftime("%Y-%m-%dT%H:%M:%SZ").to_numpy()
        utc, suffix = stamps.to_numpy(), ".parquet"
    else:
        text, utc = _with_offsets(stamps, 780 if "two" in case else None)
        bars["timestamp"] = text
        labels["start"] = text[rows].to_numpy()
        suffix = ".csv"
    write_files_source(plain_repo, bars, labels, suffix)
    stage(plain_repo, "prepare")
    labeled = read_windows(plain_repo / OUTPUTS[1])
    assert list(labeled.start) == list(utc[rows])
    unlabeled = read_windows(plain_repo / OUTPUTS[0])
    assert unlabeled.start[0] == utc[0] and np.all(np.diff(unlabeled.start) > np.timedelta64(0))


def one_line_refusal(proc, message: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    return lines[0]


# ---- early refusals: what would make a later stage fail, refused by the first stage (or by any stage's params load)


EARLY_REFUSALS = {
    "empty params.yaml": (lambda repo: (repo / "params.yaml").write_text("# nothing here\n"),
                          "params.yaml: empty (expected moola's parameters"),
    "experiment without its epochs": (
        lambda repo: set_params(repo, experiments={"exp6_wide": {"augment": "warp12_x4", "mask_from": "mask",
                                                                 "hidden_size": 256}}),
        "params.yaml: missing key 'experiments.exp6_wide.epochs' (an integer expected)"),
    "example market too large": (lambda repo: set_params(repo, data={"stride": 100000}),
                                 "params.yaml: data.unlabeled_windows (11873) x data.stride (100000) ask the example "
                                 "market for 1,187,361,220 bars, more than the 4,000,000"),
    "fewer labeled windows than folds": (lambda repo: set_params(repo, data={"labeled_windows": 3}),
                                         "finetune.folds (5) must not exceed data.labeled_windows (3)"),
}


@pytest.mark.parametrize("case", list(EARLY_REFUSALS))
def test_what_would_fail_later_is_refused_by_prepare_in_seconds(plain_repo, case):
    edit, message = EARLY_REFUSALS[case]
    stage(plain_repo, "example_market")  # with the good params: prepare's input files exist
    edit(plain_repo)
    proc = stage(plain_repo, "prepare", check=False)
    one_line_refusal(proc, message)
    assert not (plain_repo / "data/prepared").exists()


def test_finetune_names_a_missing_class_not_zero_folds():
    from moola.finetuning import check_folds
    from moola.errors import DataError

    with pytest.raises(DataError, match=r"labeled\.parquet: no 'retracement' windows \(6 consolidation, 0 retracement\)"):
        check_folds(np.zeros(6, dtype=np.int64), 5, "labeled.parquet")


# ---- damaged binary outputs: each later stage refuses a flipped bit in one line


def test_flipped_bit_in_a_prepared_file_stops_augment(plain_repo):
    stage(plain_repo, "example_market")
    stage(plain_repo, "prepare")
    path = plain_repo / OUTPUTS[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x08  # inside the values column's data pages
    path.write_bytes(bytes(data))
    proc = stage(plain_repo, "augment", "--recipe", "warp12_x4", check=False)
    one_line_refusal(proc, "data/prepared/unlabeled_windows.parquet: damaged (a data page fails its CRC checksum); "
                           "restore it with `dvc checkout --relink")
    assert not (plain_repo / "data/augmented").exists()


def test_flipped_bit_in_an_augmented_array_stops_pretrain(plain_repo):
    stage(plain_repo, "example_market")
    stage(plain_repo, "prepare")
    stage(plain_repo, "augment", "--recipe", "warp12_x4")
    path = plain_repo / "data/augmented/warp12_x4.npy"
    intact = np.load(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert not np.array_equal(np.load(path), intact)  # numpy alone would train on it
    proc = stage(plain_repo, "pretrain", "--experiment", "exp1_baseline", check=False)
    one_line_refusal(proc, "data/augmented/warp12_x4.npy: fails its checksum")
    assert "dvc repro -f -s augment@warp12_x4" in proc.stderr
    assert not (plain_repo / "data/pretrained").exists()


# ---- disk full: a write the system refuses is one line naming the file and what it was, with nothing left behind


@contextmanager
def small_filesystem(folder: Path, size: str = "64k"):
    """A tmpfs of `size` mounted on `folder` (root only); skips the test where one cannot be made."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a small filesystem needs `mount -t tmpfs`, which needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


DISK_FULL = {
    "prepare": (["prepare"], "data/prepared", "data/prepared/unlabeled_windows.parquet: could not write a parquet table of 71 rows: No space left on device [errno 28]; nothing was written (free space on that disk"),
    "augment": (["augment", "--recipe", "warp12_x4"], "data/augmented", "data/augmented/warp12_x4.npy: could not write a float32 array of shape (285, 105, 4)"),
    "pretrain": (["pretrain", "--experiment", "exp1_baseline"], "data/pretrained", "data/pretrained/exp1_baseline_encoder.pt: could not write an encoder checkpoint"),
}


@pytest.mark.parametrize("case", list(DISK_FULL))
def test_disk_full_is_one_line_and_leaves_nothing(plain_repo, case):
    args, folder, message = DISK_FULL[case]
    stage(plain_repo, "example_market")
    if case != "prepare":
        stage(plain_repo, "prepare")
    if case == "pretrain":
        stage(plain_repo, "augment", "--recipe", "warp12_x4")
    with small_filesystem(plain_repo / folder):
        proc = stage(plain_repo, *args, check=False)
        line = one_line_refusal(proc, message)
        assert "No space left on device [errno 28]" in line
        assert os.listdir(plain_repo / folder) == []  # no output, no temporary file


EXP6 = {"exp6_wide": {"epochs": 75, "augment": "warp12_x4", "mask_from": "mask", "hidden_size": 256}}


@pytest.mark.integration
def test_an_experiment_added_to_params_yaml_alone_is_a_stage_and_feeds_select(tiny_repo):
    """One edit adds an experiment: dvc.yaml iterates params.yaml's experiments, and select depends on the folders
    of their outputs (checked in DVC's own graph, nothing run)."""
    set_params(tiny_repo, experiments=EXP6)
    stages = run(["dvc", "stage", "list", "--name-only"], tiny_repo).stdout.split()
    assert "pretrain@exp6_wide" in stages and "finetune_ablation@exp6_wide" in stages
    dag = run(["dvc", "dag", "--dot", "select"], tiny_repo).stdout
    assert '"pretrain@exp6_wide" -> "select"' in dag


@pytest.mark.integration
def test_dvc_repro_stops_at_the_first_stage_for_an_experiment_described_in_part(tiny_repo):
    set_params(tiny_repo, experiments={"exp6_wide": {**EXP6["exp6_wide"], "mask": "block"}})
    proc = run(["dvc", "repro"], tiny_repo, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and "experiments.exp6_wide.mask_from must be 'experiments.exp6_wide.mask'" in errors[0]
    # The first stage to run (example_market) loads params.yaml and stops there.
    assert "Running stage 'example_market'" in out and "Running stage 'prepare'" not in out
    assert "Traceback" not in out and not (tiny_repo / "data/example").exists()
    assert not (tiny_repo / "data/prepared").exists()
