"""The example_market, prepare and augment stages through real commands: outputs, logs, bad input, `dvc repro`."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import make_repo, run
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
    assert f"Example market: {len(bars):,} bars" in out and len(starts) == 89
    assert list(pd.read_csv(plain_repo / "data/example/labels.csv").columns) == ["start", "label"]
    # The unlabeled windows (11,873 every 10 bars at spec) end a trading week before the first labeled one.
    assert starts.min() >= (11873 - 1) * 10 + 105 + 5 * 78


def test_example_source_logs_the_counts_and_writes_windows(plain_repo):
    stage(plain_repo, "example_market")
    out = stage(plain_repo, "prepare").stdout
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
    raw = repo / "data/raw"
    raw.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        bars.to_csv(raw / "bars.csv", index=False)
    else:
        bars.to_parquet(raw / "bars.parquet", index=False)
    labels.to_csv(raw / "labels.csv", index=False)
    set_params(repo, data={"bars": f"data/raw/bars{suffix}", "labels": "data/raw/labels.csv"})


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
