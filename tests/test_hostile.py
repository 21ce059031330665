"""Issue 26's catalogue cases: what a careful user and a hostile tester found, each refused (or handled) in one line.

Cheap on purpose (the suite's budget): the stage and CLI entry points run in-process (`run_main(main)`, the same
code path as `python -m moola.stages.prepare` or `moola report` after the interpreter starts: exit code 2 and one
`error:` line) in a temporary folder holding params.yaml and the data files; the rest call the functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, write_raw_files
from moola import io
from moola.errors import DataError, OutputError, run_main
from moola.market import generate_market
from moola.params import load_params, parse_params

PRICES = ["open", "high", "low", "close"]
SPEC_DATA = load_params(ROOT / "params.yaml").data


def spec() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def own_files(folder: Path, bars: pd.DataFrame, labels: pd.DataFrame, test_labels: pd.DataFrame | None = None,
              suffix: str = ".csv", **data) -> Path:
    """params.yaml (the spec's, two folds, tiny scale) and data/raw files in `folder`: a user's own data."""
    raw = write_raw_files(folder, bars, labels, suffix)
    if test_labels is None:
        shutil.copy(ROOT / "data/no_test_labels.csv", folder / "data/no_test_labels.csv")
    else:
        test_labels.to_csv(raw / "test_labels.csv", index=False)
    params = spec()
    params["scale"]["windows"] = 0.006
    params["finetune"]["folds"] = 2
    params["data"].update(bars=f"data/raw/bars{suffix}", labels="data/raw/labels.csv",
                          test_labels="data/raw/test_labels.csv" if test_labels is not None
                          else "data/no_test_labels.csv", **data)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def good_files(n_bars: int = 3000):
    bars = generate_market(n_bars, seed=11).bars
    stamps = bars["timestamp"]
    labels = pd.DataFrame({"start": stamps[[0, 200, 900, 1500]].to_numpy(),
                           "label": ["consolidation", "retracement", "retracement", "consolidation"]})
    return bars, labels


def entry(folder: Path, main, monkeypatch, capsys) -> tuple[int, str, list[str]]:
    """Run a stage's or the CLI's main in `folder` as its command does: (exit code, stdout, stderr lines)."""
    monkeypatch.chdir(folder)
    code = 0
    try:
        run_main(main)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def prepare_main():
    from moola.stages import prepare

    return prepare.main


def refused(folder, main, monkeypatch, capsys) -> str:
    code, _, err = entry(folder, main, monkeypatch, capsys)
    assert code == 2 and len(err) == 1, err
    assert not (folder / "data/prepared").exists()  # nothing written
    return err[0]


# ---- 1. a held-out set of one class: refused at prepare; allowed, its undefined metrics are null with the reason


def one_class_test_labels(bars):
    return pd.DataFrame({"start": bars["timestamp"][[2200, 2500]].to_numpy(), "label": ["consolidation"] * 2})


def test_heldout_labels_of_one_class_are_refused_at_prepare(tmp_path, monkeypatch, capsys):
    bars, labels = good_files()
    own_files(tmp_path, bars, labels, one_class_test_labels(bars))
    assert refused(tmp_path, prepare_main(), monkeypatch, capsys) == (
        "error: data/raw/test_labels.csv: field 'label': held-out windows of one class only (found 2 consolidation, "
        "0 retracement): no 'retracement' window, so its recall, balanced accuracy and MCC are undefined; add "
        "held-out windows of both classes, or set data.allow_one_class_test: true in params.yaml if one class is "
        "intended")


def test_heldout_of_one_class_when_allowed_writes_null_with_the_reason_and_the_report_shows_it(tmp_path, monkeypatch,
                                                                                               capsys):
    from moola.report import heldout_lines
    from moola.finetuning import heldout_report

    labels = np.zeros(50, dtype=np.int64)
    rng = np.random.default_rng(0)
    # Class predictions of one seed: pretrained (replicates, seeds, n) from one encoder, scratch (seeds, n).
    predicted = {init: (rng.random(50) < 0.3).astype(int)[None] for init in ("pretrained", "scratch")}
    predicted["pretrained"] = predicted["pretrained"][None]
    report = heldout_report(labels, predicted, 100, 1, "auto", [1], ["exp"], folds=2)
    recall = report["pretrained"]["recall_retracement"]
    assert recall == {"point": None, "ci_low": None, "ci_high": None, "undefined":
                      "no window of class 'retracement' among the 50 scored: its recall is undefined"}
    assert report["pretrained"]["mcc"]["undefined"] == (
        "the 50 windows scored are all 'consolidation': mcc needs both classes")
    assert report["lift"]["mcc"]["contains_zero"] is None and report["lift"]["accuracy"]["point"] is not None
    io.write_json(tmp_path / "finetune.json", {"heldout": report})
    text = (tmp_path / "finetune.json").read_text()
    assert "NaN" not in text and json.loads(text)["heldout"]["pretrained"]["recall_retracement"]["point"] is None
    lines = heldout_lines(json.loads(text)["heldout"])
    assert "  undefined: no window of class 'retracement' among the 50 scored: its recall is undefined" in lines
    assert any("undefined" in line and line.startswith("  pretrained") for line in lines)
    assert any(line.startswith("  lift (") and "MCC undefined" in line for line in lines)
    assert "undefined for balanced_accuracy, mcc" in report["lift"]["verdict"]


def test_the_label_curve_on_one_class_writes_null_not_nan(tmp_path):
    from moola.label_efficiency import MODELS, CurveResult, curve_report

    rng = np.random.default_rng(1)
    result = CurveResult([20], [], {(20, m): rng.integers(0, 2, size=(1, 40)) for m in MODELS})
    per_size, table = curve_report(np.zeros(40, dtype=np.int64), result, 50, 1)
    assert per_size["20"]["pretrained"]["mcc"]["undefined"] == (
        "the 40 windows scored are all 'consolidation': mcc needs both classes")
    assert per_size["20"]["pretrained"]["accuracy"]["point"] is not None
    io.write_json(tmp_path / "label_curve.json", per_size)  # refused if any NaN were left
    assert "NaN" not in (tmp_path / "label_curve.json").read_text()


def test_nan_is_never_written_to_json(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(OutputError) as info:
        io.write_json(target, {"heldout": {"pretrained": {"recall_retracement": {"point": float("nan")}}}})
    assert str(info.value) == (
        f"{target}: could not write JSON: heldout.pretrained.recall_retracement.point is not a finite number (JSON "
        "has no NaN or infinity; an undefined metric is written as null with its reason); nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_a_stage_that_fails_leaves_none_of_its_outputs(tmp_path):
    old = tmp_path / "plots/curves.csv"
    io.write_text(old, "an older run's\n")
    with pytest.raises(OutputError):
        with io.written_together():
            io.write_parquet(tmp_path / "oof.parquet", pd.DataFrame({"a": [1, 2]}))
            io.write_text(tmp_path / "plots/curves.csv", "epoch\n1\n")
            io.write_json(tmp_path / "finetune.json", {"mcc": float("nan")})  # the write that fails, last
    # Nothing of the failed run: not the files written before the failure, not a temporary file.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["plots", "plots/curves.csv"]
    assert old.read_text() == "an older run's\n"
    with io.written_together():
        io.write_text(tmp_path / "a.txt", "1")
        assert not (tmp_path / "a.txt").exists()  # lands at the end of the block, with the others
        io.write_text(tmp_path / "b.txt", "2")
    assert (tmp_path / "a.txt").read_text() == "1" and (tmp_path / "b.txt").read_text() == "2"


# ---- 2. the example market's size rule applies only to the example market


def test_own_data_with_large_windows_is_not_held_to_the_example_markets_size():
    raw = spec()
    raw["data"].update(window=600)
    with pytest.raises(Exception, match="ask the example market for 4,780,300 bars"):
        parse_params(raw)  # the example market itself: still refused
    raw["data"].update(bars="data/raw/bars.parquet", labels="data/raw/labels.csv",
                       test_labels="data/raw/test_labels.csv")
    p = parse_params(raw)
    assert p.data.window == 600
    # The example_market stage still runs in a plain `dvc repro`: at the reference sizes, since nothing reads it.
    from moola.stages.example_market import FALLBACK_SIZES, example_sizes

    sized = example_sizes(p.data)
    assert sized.window == FALLBACK_SIZES["window"] == 105 and sized.bars == "data/raw/bars.parquet"
    assert example_sizes(dataclasses.replace(p.data, window=105)).window == 105


def test_own_data_too_short_for_its_windows_names_the_numbers(tmp_path, monkeypatch, capsys):
    bars, labels = good_files()
    own_files(tmp_path, bars, labels, window=5000)
    assert refused(tmp_path, prepare_main(), monkeypatch, capsys) == (
        "error: data/raw/bars.csv: 3000 bars, too few (expected at least 5090: ten windows of data.window=5000 every "
        "data.stride=10 bars)")


# ---- 3. outliers and degenerate windows


def test_an_absurd_bar_is_refused_naming_the_row(tmp_path, monkeypatch, capsys):
    bars, labels = good_files()
    bars.loc[1000, PRICES] = 1e300
    own_files(tmp_path, bars, labels)
    close = bars["close"].to_numpy()
    moves = np.abs(np.diff(np.log(close)))
    typical = np.median(moves[moves > 0])  # the scale: the file's median absolute log return
    assert refused(tmp_path, prepare_main(), monkeypatch, capsys) == (
        "error: data/raw/bars.csv: row 1001, field 'close': bar has open=1e+300, high=1e+300, low=1e+300, "
        f"close=1e+300: its close is x{1e300 / close[999]:.4g} the previous close, more than "
        f"data.outlier_threshold=500 times the median move ({typical:.3g} in log price, so at most "
        f"x{np.exp(500 * typical):.4g}) (expected prices near their neighbours); fix the row, or set "
        "data.drop_outliers: true in params.yaml to drop such one-bar spikes")


def test_a_tiny_low_is_refused_too():
    bars, _ = good_files()
    bars.loc[700, "low"] = 1e-300
    from moola.data_checks import check_outliers

    with pytest.raises(DataError, match=r"^data/raw/bars.csv: row 701, field 'high': bar has .*low=1e-300.*its high "
                                        r"is x.* its low, more than data.outlier_threshold=500"):
        check_outliers(bars, dataclasses.replace(SPEC_DATA, bars="data/raw/bars.csv"))


def test_outliers_dropped_when_the_user_says_so(tmp_path, monkeypatch, capsys):
    bars, labels = good_files()
    bars.loc[1000, PRICES] = 1e300
    own_files(tmp_path, bars, labels, drop_outliers=True)
    code, out, err = entry(tmp_path, prepare_main(), monkeypatch, capsys)
    assert code == 0 and err == [], err
    assert ("dropped 1 outlier bar(s) of data/raw/bars.csv (one-bar spikes beyond data.outlier_threshold=500 median "
            "moves; data.drop_outliers is true)") in out.splitlines()
    from moola.windows import read_windows

    assert read_windows(tmp_path / "data/prepared/unlabeled_windows.parquet").values.max() <= 1.0


def test_a_jump_that_stays_is_refused_even_when_dropping():
    from moola.data_checks import check_outliers

    bars, _ = good_files()
    bars.loc[1000:, PRICES] *= 1000  # an unadjusted split, say
    with pytest.raises(DataError) as info:
        check_outliers(bars, dataclasses.replace(SPEC_DATA, bars="bars.csv", drop_outliers=True))
    assert str(info.value).startswith("bars.csv: row 1001, field 'close': ") and str(info.value).endswith(
        "a jump that stays is no spike to drop: adjust the prices (a split?) or fix the file")


def test_windows_that_normalise_to_a_flat_line_are_named():
    from moola.data_checks import degenerate_warnings
    from moola.windows import normalise

    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, size=(3, 105)), axis=1))
    windows = np.stack([close, close * 1.001, close * 0.999, close], axis=-1)
    windows[1] = 100.0  # a halted market: no range at all
    windows[2, 50, 1] = 1e6  # one high holds the whole range: the rest squash to 0
    starts = np.array(["2015-01-02T09:30", "2015-01-05T09:30", "2015-01-06T09:30"], dtype="datetime64[ns]")
    assert degenerate_warnings({"unlabeled": (normalise(windows), starts)}) == [
        "warning: 2 of 3 unlabeled windows normalise to a nearly flat line (one or two bars hold nearly all of the "
        "window's price range, or it has none), the first from 2015-01-05 09:30:00; check the bars there"]
    assert degenerate_warnings({"unlabeled": (normalise(windows[:1]), starts[:1])}) == []


# ---- 4. `moola report` and `moola tour`: damaged metrics files and unknown params keys, named first


def report_folder(tmp_path: Path, params: dict | None = None) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params or spec(), sort_keys=False))
    return tmp_path


def cli(argv):
    from moola import cli as moola_cli

    return lambda: moola_cli.main(argv)


def cli_refusal(folder, argv, monkeypatch, capsys) -> list[str]:
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as exit_:
        cli(argv)()
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_report_names_a_truncated_metrics_file(tmp_path, monkeypatch, capsys):
    folder = report_folder(tmp_path)
    (folder / "metrics").mkdir()
    (folder / "metrics/finetune.json").write_text('{\n  "heldout": {\n    "windows": 2')
    assert cli_refusal(folder, ["report"], monkeypatch, capsys) == [
        "error: metrics/finetune.json: not valid JSON (Expecting ',' delimiter at line 3, column 17: cut short or "
        "damaged); re-make it with `dvc repro`, or restore the last run's copy with `dvc checkout "
        "metrics/finetune.json`"]


def test_report_names_a_metrics_file_without_the_fields_it_needs(tmp_path, monkeypatch, capsys):
    folder = report_folder(tmp_path)
    (folder / "metrics/pretrain").mkdir(parents=True)
    (folder / "metrics/pretrain/exp1_baseline.json").write_text('{"mask": "patch"}\n')
    assert cli_refusal(folder, ["report"], monkeypatch, capsys) == [
        "error: metrics/pretrain/exp1_baseline.json: no field 'epochs_run' (expected what moola's stage writes; "
        "re-make it with `dvc repro`, or restore the last run's copy with `dvc checkout "
        "metrics/pretrain/exp1_baseline.json`)"]


def test_report_and_tour_name_an_unknown_params_key_first(tmp_path, monkeypatch, capsys):
    params = spec()
    params["seeed"] = 7
    folder = report_folder(tmp_path, params)
    expected = ["error: params.yaml: unknown key 'seeed' (did you mean 'seed'? expected one of: seed, mask, scale, "
                "data, augment, pretrain, experiments, select, replicates, finetune, curve)"]
    assert cli_refusal(folder, ["report"], monkeypatch, capsys) == expected
    # The tour names it before `dvc exp run` starts (no dvc here: it would fail otherwise).
    assert cli_refusal(folder, ["tour"], monkeypatch, capsys) == expected


def test_tour_names_an_empty_params_file_before_dvc_templating(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("")
    assert cli_refusal(tmp_path, ["tour"], monkeypatch, capsys) == [
        "error: params.yaml: empty (expected moola's parameters: seed, mask, data, pretrain, experiments, ...; "
        "restore the project's file with `git checkout -- params.yaml`)"]


# ---- 5. the messages say what to do


def test_a_header_with_spaces_is_shown_as_it_is(tmp_path, monkeypatch, capsys):
    bars, labels = good_files()
    own_files(tmp_path, bars, labels)
    (tmp_path / "data/raw/labels.csv").write_text(
        "start, label\n" + "".join(f"{s},{c}\n" for s, c in zip(labels["start"], labels["label"])))
    assert refused(tmp_path, prepare_main(), monkeypatch, capsys) == (
        "error: data/raw/labels.csv: missing column(s) label (found 'start', ' label'; ' label' has spaces around "
        "it: remove them) (expected start, label)")


def test_a_parquet_that_is_a_directory(tmp_path, monkeypatch, capsys):
    bars, labels = good_files()
    own_files(tmp_path, bars, labels, suffix=".parquet")
    (tmp_path / "data/raw/bars.parquet").unlink()
    (tmp_path / "data/raw/bars.parquet").mkdir()
    assert refused(tmp_path, prepare_main(), monkeypatch, capsys) == (
        "error: data/raw/bars.parquet: a directory, not a parquet file (params.yaml data.bars names it; expected one "
        "file; a partitioned dataset: write it as a single file)")


def test_a_semicolon_separated_csv(tmp_path, monkeypatch, capsys):
    bars, labels = good_files()
    own_files(tmp_path, bars, labels)
    bars.to_csv(tmp_path / "data/raw/bars.csv", index=False, sep=";")
    assert refused(tmp_path, prepare_main(), monkeypatch, capsys) == (
        "error: data/raw/bars.csv: one column 'timestamp;open;high;low;close;volume': looks like ';'-separated; save "
        "it as comma-separated CSV")


@pytest.mark.parametrize("encoding, line", [
    ("utf-16", "error: data/raw/labels.csv: the header (line 1): not UTF-8 (looks like UTF-16, byte 0); save it as "
               "UTF-8"),
    ("cp1252", "error: data/raw/labels.csv: row 3: not UTF-8 (looks like Windows-1252 or Latin-1, byte 113); save it "
               "as UTF-8"),
])
def test_a_file_that_is_not_utf8_names_the_row(tmp_path, monkeypatch, capsys, encoding, line):
    bars, labels = good_files()
    own_files(tmp_path, bars, labels)
    rows = [f"{s},{c}" for s, c in zip(labels["start"], labels["label"])]
    rows[2] = rows[2].replace("retracement", "retracement café")  # a note someone typed in a spreadsheet
    (tmp_path / "data/raw/labels.csv").write_bytes(("start,label\n" + "\n".join(rows) + "\n").encode(encoding))
    assert refused(tmp_path, prepare_main(), monkeypatch, capsys) == line


# ---- 6. make rebuilds a venv whose python is missing or broken


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("damage", ["missing", "broken"])
def test_make_rebuilds_a_venv_whose_python_is_missing_or_broken(tmp_path, damage):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv/bin"
    bin_dir.mkdir(parents=True)
    stamp = tmp_path / ".venv/.moola-installed"
    stamp.touch()  # newer than pyproject.toml: the stamp alone says "installed"
    if damage == "broken":
        (bin_dir / "python").symlink_to("/nonexistent/python3.11")  # the system Python it pointed at is gone
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    plan = subprocess.run(["make", "--no-print-directory", "-n", "tour"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True).stdout
    assert plan.splitlines()[0] == "make: .venv/bin/python is missing or broken: rebuilding .venv"
    assert "-m venv" in plan and 'pip install --quiet -e ".[dev]"' in plan


# ---- 7. a killed `dvc repro`: its stale stage lock


def test_unlock_clears_the_stage_lock_of_a_killed_dvc_that_dvc_still_calls_busy(tmp_path):
    """A `dvc repro` killed with SIGKILL whose parent has not reaped it yet (a zombie): DVC counts it as running."""
    from moola.dvc_lock import clear_stale_rwlock

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n    outs:\n      - out.txt\n")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, env=env, check=True)
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    deadline = time.monotonic() + 10
    import psutil

    while psutil.Process(killed.pid).status() != psutil.STATUS_ZOMBIE:  # dead, not reaped (no wait() yet)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    alive = {"pid": os.getpid(), "cmd": "dvc repro other"}
    (repo / ".dvc/tmp").mkdir(exist_ok=True)
    (repo / ".dvc/tmp/rwlock").write_text(json.dumps({
        "write": {str(repo / "out.txt"): {"pid": killed.pid, "cmd": "dvc repro hello"},
                  str(repo / "other.txt"): alive}}))
    try:
        busy = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
        assert busy.returncode != 0 and "is busy, it is being blocked by" in busy.stderr + busy.stdout
        assert clear_stale_rwlock(repo) == [
            f"write lock on {repo / 'out.txt'} (PID {killed.pid}: dvc repro hello)"]
        lock = json.loads((repo / ".dvc/tmp/rwlock").read_text())
        assert lock["write"] == {str(repo / "other.txt"): alive}  # a running process keeps its lock
        subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True)
        assert (repo / "out.txt").read_text() == "hi\n"
    finally:
        killed.wait()
