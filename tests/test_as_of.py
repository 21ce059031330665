"""Held-out means later: the as-of split with an embargo (data.embargo, data.heldout), purged folds (finetune.cv)
and the walk-forward view of the held-out numbers (finetune.heldout_periods)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, make_repo, run
from sklearn.metrics import matthews_corrcoef

from moola import market
from moola.errors import DataError, ParamsError
from moola.finetuning import cv_report, cv_splitter, fold_splits, heldout_by_period, heldout_report, purged_splits
from moola.params import load_params, parse_params
from moola.preparation import prepare
from moola.windows import (
    cut_windows,
    normalise,
    overlapping,
    read_windows,
    unlabeled_starts,
    validate_bars,
    windows_table,
)

pytest_plugins = ["pipeline_runs"]


def bar_index(bars: pd.DataFrame, starts) -> np.ndarray:
    return np.searchsorted(bars["timestamp"].to_numpy(), np.asarray(starts, dtype="datetime64[ns]"))


def _params(**data):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = {"labels": "user/labels.csv", "test_labels": "user/test_labels.csv", "unlabeled_windows": 300,
            "labeled_windows": 4}
    return parse_params({**raw, "data": {**raw["data"], **base, **data}, "finetune": {**raw["finetune"], "folds": 2}})


@pytest.fixture(scope="module")
def own_files():
    """A user's own 3,000 bars: four labeled windows early, two held-out windows late (bars 2400 and 2600)."""
    bars = validate_bars(market.generate_market(3000, seed=11).bars)
    stamps = bars["timestamp"].to_numpy()
    labels = pd.DataFrame({"start": stamps[[0, 200, 900, 1500]],
                           "label": ["consolidation", "retracement", "retracement", "consolidation"]})
    test = pd.DataFrame({"start": stamps[[2400, 2600]], "label": ["consolidation", "retracement"]})
    return bars, labels, test


def _same_files(a, b) -> bool:
    """Whether two preparations would write the same four tables (columns, values, schema metadata)."""
    return all(windows_table(x).equals(windows_table(y), check_metadata=True)
               for x, y in zip((a.unlabeled, a.labeled, a.pool, a.test), (b.unlabeled, b.labeled, b.pool, b.test)))


# --- the as-of rule in prepare --------------------------------------------------------------------------------


def test_a_labeled_window_after_the_heldout_start_is_refused_in_one_line(own_files):
    bars, labels, test = own_files
    stamps = bars["timestamp"].to_numpy()
    late = pd.concat([labels, pd.DataFrame({"start": [stamps[2750]], "label": ["retracement"]})], ignore_index=True)
    with pytest.raises(DataError) as err:
        prepare(_params(), bars, late, test)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"user/labels.csv: row 5, field 'start': the labeled window from {pd.Timestamp(stamps[2750])} "
                              "does not end data.embargo=105 bars before the held-out period, which starts at "
                              f"{pd.Timestamp(stamps[2400])} (user/test_labels.csv, row 1)"), message


def test_the_embargo_counts_the_bars_between_a_labeled_window_and_the_heldout_period(own_files):
    bars, labels, _ = own_files
    stamps = bars["timestamp"].to_numpy()
    last_end = 1500 + 105  # the last labeled window covers bars 1500 ... 1604
    for embargo in (0, 105, 300):
        exactly = pd.DataFrame({"start": [stamps[last_end + embargo]], "label": ["consolidation"]})
        out = prepare(_params(embargo=embargo), bars, labels, exactly)  # `embargo` bars between: accepted
        assert len(out.test) == 1
        if embargo == 0:
            continue  # one bar earlier overlaps: the overlap check (test_heldout.py) refuses it
        one_short = pd.DataFrame({"start": [stamps[last_end + embargo - 1]], "label": ["consolidation"]})
        with pytest.raises(DataError, match=r"^user/labels.csv: row 4, field 'start'"):
            prepare(_params(embargo=embargo), bars, labels, one_short)
        # data.heldout: anywhere accepts what does not overlap.
        assert len(prepare(_params(embargo=embargo, heldout="anywhere"), bars, labels, one_short).test) == 1


def test_unlabeled_windows_past_the_cut_are_left_out_and_counted(own_files):
    bars, labels, test = own_files
    out = prepare(_params(), bars, labels, test)
    every = unlabeled_starts(len(bars), 105, 10, 300)  # 290 windows cover the whole file
    at = bar_index(bars, out.unlabeled.start)
    # Every window, training and validation, ends at least data.embargo bars before the held-out period.
    assert at.max() + 105 + 105 <= 2400 and np.array_equal(at, every[every + 105 <= 2400 - 105])
    assert out.after_cut == len(every) - len(at) == 70 and out.excluded == 0
    assert set(out.unlabeled.split) == {"train", "val"}
    from moola.stages.prepare import as_of_line

    line = as_of_line(_params().data, out)
    assert "70 unlabeled windows did not and were left out of pretraining" in line and "data.embargo=105" in line


def test_anywhere_keeps_todays_windows_byte_for_byte(own_files):
    bars, labels, test = own_files
    out = prepare(_params(heldout="anywhere"), bars, labels, test)
    # Today's rule, written out: the first windows every data.stride bars, less those that overlap a held-out one.
    starts = unlabeled_starts(len(bars), 105, 10, 300)
    test_at = bar_index(bars, test["start"])
    starts = starts[~overlapping(starts, test_at, 105)]
    prices = bars[["open", "high", "low", "close"]].to_numpy()
    assert np.array_equal(out.unlabeled.values, normalise(cut_windows(prices, starts, 105)))
    assert np.array_equal(bar_index(bars, out.unlabeled.start), starts)
    assert out.excluded == 41 and out.after_cut == 0 and len(out.unlabeled) == 249


def test_the_example_market_gives_the_same_windows_under_both_rules():
    bars, labels, test = market.example_data(1337, 105, 10, 300, 40, 15, label_pool=40, test_windows=30)
    bars = validate_bars(bars)
    after = prepare(_params(unlabeled_windows=300, labeled_windows=40), bars, labels, test)
    anywhere = prepare(_params(unlabeled_windows=300, labeled_windows=40, heldout="anywhere"), bars, labels, test)
    assert after.after_cut == after.excluded == anywhere.excluded == 0
    assert _same_files(after, anywhere)


def test_the_spec_example_market_keeps_473_bars_before_its_heldout_period():
    """The example market follows the as-of rule at the spec's params: the embargo it has is 473 bars between the
    label pool's last window and the first held-out window (EXAMPLE_GAP_BARS, 390, is its guaranteed minimum), and
    70,455 between the last unlabeled window and it; so data.embargo (105) leaves every window where it was."""
    p = load_params(ROOT / "params.yaml")
    d = p.data
    bars, labels, test = market.example_data(p.seed, d.window, d.stride, d.unlabeled_windows, d.labeled_windows,
                                             d.min_final_segment, d.label_pool, d.test_windows)
    pool, held = bar_index(bars, labels["start"]), bar_index(bars, test["start"])
    unlabeled = unlabeled_starts(len(bars), d.window, d.stride, p.unlabeled_windows)
    assert len(unlabeled) == 11873 and held.min() > pool.max() > unlabeled.max()
    assert held.min() - (pool.max() + d.window) == 473 >= market.EXAMPLE_GAP_BARS >= d.embargo
    assert held.min() - (unlabeled.max() + d.window) == 70_455


@pytest.mark.parametrize("edit, message", [
    ({"data": {"embargo": -1}}, "params.yaml: data.embargo must be at least 0, got -1"),
    ({"data": {"embargo": 391}}, "params.yaml: data.embargo (391 bars) is longer than the example market's gap"),
    ({"data": {"heldout": "before"}}, "params.yaml: data.heldout must be one of 'after', 'anywhere', got 'before'"),
    ({"finetune": {"cv": "kfold"}}, "params.yaml: finetune.cv must be one of 'stratified', 'purged', got 'kfold'"),
    ({"finetune": {"heldout_periods": 0}}, "params.yaml: finetune.heldout_periods must be greater than 0, got 0"),
])
def test_bad_as_of_params_are_refused_at_load_naming_the_key(edit, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in edit.items():
        raw[section].update(values)
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_embargo_longer_than_own_data_is_refused_naming_the_key(own_files):
    bars, labels, test = own_files
    with pytest.raises(ParamsError) as info:
        prepare(_params(bars="user/bars.csv", embargo=3000), bars, labels, test)
    assert str(info.value) == ("params.yaml: data.embargo (3000 bars) is longer than the data (user/bars.csv: 3000 "
                               "bars); expected fewer bars than the bars file has")


# --- purged folds ----------------------------------------------------------------------------------------------


def test_purged_folds_never_train_within_embargo_bars_of_a_test_window():
    """A property over random timelines: windows in random file order, random gaps, window, embargo and folds."""
    rng = np.random.default_rng(2026)
    for _ in range(300):
        n = int(rng.integers(6, 90))
        window = int(rng.integers(5, 120))
        embargo = int(rng.integers(0, 3 * window))
        gaps = rng.integers(0, 3 * window, n)  # bars between consecutive windows (labeled windows never overlap)
        bars = rng.permutation(np.cumsum(window + gaps) - window)
        folds = int(rng.integers(2, min(n, 8) + 1))
        splits = purged_splits(bars, folds, window, embargo)
        assert all(np.array_equal(a, b) and np.array_equal(c, d)
                   for (a, c), (b, d) in zip(splits, purged_splits(bars, folds, window, embargo)))
        rank = np.argsort(np.argsort(bars))  # each window's place in time
        assert np.array_equal(np.sort(np.concatenate([test for _, test in splits])), np.arange(n))
        for train, test in splits:
            assert np.ptp(rank[test]) == len(test) - 1  # a test fold is consecutive in time
            between = np.abs(bars[:, None] - bars[test][None, :]) - window  # bars between each window and each test one
            allowed = np.setdiff1d(np.flatnonzero((between >= embargo).all(axis=1)), test)
            assert np.array_equal(train, allowed)  # never within `embargo` bars, and nothing else dropped


def test_cv_dispatch_report_and_a_fold_without_a_class_refused():
    labels = np.array([0, 1] * 10)
    assert cv_splitter("stratified", None, 105, 105, "labeled.parquet") is fold_splits
    bars = np.arange(20) * 200  # 95 bars between neighbours: an embargo of 105 purges each test block's neighbours
    split = cv_splitter("purged", bars, 105, 105, "labeled.parquet")
    splits = split(labels, 5, 1337)
    report = cv_report("purged", splits, 105)
    assert report["scheme"] == "purged" and report["purged_windows"] == [1, 2, 2, 2, 1]
    assert report["training_windows"] == [15, 14, 14, 14, 15]
    assert cv_report("stratified", fold_splits(labels, 5, 1), 105)["description"] == "stratified 5-fold, shuffled by seed"
    with pytest.raises(DataError, match=r"^labeled.parquet: column 'bar' missing"):
        cv_splitter("purged", None, 105, 105, "labeled.parquet")
    grouped = np.array([0] * 10 + [1] * 10)  # time-ordered halves: each training set holds one class
    with pytest.raises(DataError) as info:
        split(grouped, 2, 1337)
    assert str(info.value).startswith("labeled.parquet: purged fold 1 of 2 (finetune.cv: purged, data.embargo=105) "
                                      "leaves 9 training windows, none 'consolidation'")


# --- walk-forward --------------------------------------------------------------------------------------------


def test_walk_forward_splits_the_heldout_windows_into_consecutive_periods():
    rng = np.random.default_rng(5)
    n = 101
    in_time = np.sort(rng.choice(10**6, n, replace=False)).astype("datetime64[m]").astype("datetime64[ns]")
    labels_in_time = rng.integers(0, 2, n)
    # Pretrained is right on the first 51 windows in time and wrong on the other 50; scratch is right throughout.
    pretrained_in_time = np.where(np.arange(n) < 51, labels_in_time, 1 - labels_in_time)
    file_order = rng.permutation(n)  # the held-out file need not be in time order
    labels, starts = labels_in_time[file_order], in_time[file_order]
    # Class predictions: pretrained (replicates, seeds, n) from one encoder and one seed, scratch (seeds, n).
    proba = {"pretrained": pretrained_in_time[file_order][None, None], "scratch": labels[None]}
    kw = {"resamples": 200, "seed": 7, "block": 1, "seeds": [7], "replicates": ["r"], "folds": 1}
    first, second = heldout_by_period(labels, proba, starts, 2, **kw)
    assert (first["windows"], second["windows"]) == (51, 50)
    assert (first["first_start"], first["last_start"]) == tuple(np.datetime_as_string(in_time[[0, 50]], unit="s"))
    assert second["first_start"] == np.datetime_as_string(in_time[51], unit="s")
    assert first["pretrained"]["accuracy"]["point"] == 1.0 and second["pretrained"]["accuracy"]["point"] == 0.0
    assert second["lift"]["accuracy"]["point"] == -1.0 and first["lift"]["accuracy"]["point"] == 0.0
    assert sum(first["class_counts"].values()) == 51
    three = heldout_by_period(labels, {"pretrained": proba["pretrained"]}, starts, 3, **kw)
    assert [e["windows"] for e in three] == [34, 34, 33] and "lift" not in three[0]
    mcc = matthews_corrcoef(labels_in_time[:34], pretrained_in_time[:34])
    assert three[0]["pretrained"]["mcc"]["point"] == pytest.approx(mcc, abs=1e-6)
    # One period is the whole held-out set: the same points as the held-out table.
    (whole,) = heldout_by_period(labels, proba, starts, 1, **kw)
    table = heldout_report(labels, proba, **kw)
    assert whole["pretrained"]["accuracy"]["point"] == table["pretrained"]["accuracy"]["point"]
    assert whole["lift"]["mcc"]["point"] == table["lift"]["mcc"]["point"]


# --- through the real stages ----------------------------------------------------------------------------------


def _set(repo: Path, **sections) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_prepare_logs_the_cut_and_refuses_a_late_label_in_one_line(tmp_path, own_files):
    repo = make_repo(tmp_path / "repo", git=False)
    bars, labels, test = own_files
    raw = repo / "data/raw"
    raw.mkdir(parents=True)
    bars.to_csv(raw / "bars.csv", index=False)
    labels.to_csv(raw / "labels.csv", index=False)
    test.to_csv(raw / "test_labels.csv", index=False)
    _set(repo, scale={"windows": 1.0}, finetune={"folds": 2},
         data={"bars": "data/raw/bars.csv", "labels": "data/raw/labels.csv", "test_labels": "data/raw/test_labels.csv",
               "unlabeled_windows": 300})
    out = run(["python", "-m", "moola.stages.prepare"], repo).stdout
    assert "Loaded 220 unlabeled windows" in out
    assert (f"as-of split (data.heldout: after): the held-out period starts at {bars['timestamp'][2400]}; every "
            "labeled window ends at least data.embargo=105 bars before it; 70 unlabeled windows did not and were left "
            "out of pretraining") in out, out
    assert read_windows(repo / "data/prepared/labeled_windows.parquet").bar.tolist() == [0, 200, 900, 1500]
    before = (repo / "data/prepared/unlabeled_windows.parquet").read_bytes()
    late = labels.copy()
    late.loc[3, "start"] = bars["timestamp"][2250]  # ends 45 bars before the held-out period
    late.to_csv(raw / "labels.csv", index=False)
    proc = run(["python", "-m", "moola.stages.prepare"], repo, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: data/raw/labels.csv: row 4, field 'start': the labeled window from "
                               f"{bars['timestamp'][2250]} does not end data.embargo=105 bars before the held-out "
                               f"period, which starts at {bars['timestamp'][2400]} (data/raw/test_labels.csv, row 1)"), lines[0]
    assert (repo / "data/prepared/unlabeled_windows.parquet").read_bytes() == before


def test_reference_run_reports_the_scheme_and_the_periods_without_a_warning(reference_run):
    repo = reference_run.repo
    report = json.loads((repo / "metrics/finetune.json").read_text())
    assert report["cv"] == {"scheme": "stratified", "description": "stratified 2-fold, shuffled by seed"}
    periods = report["heldout"]["by_period"]
    assert [e["windows"] for e in periods] == [150, 150] and "warning" not in report["heldout"]
    assert periods[0]["last_start"] < periods[1]["first_start"]
    table = run(["python", "-m", "moola.cli", "report"], repo).stdout
    assert "WARNING" not in table and "by period (walk-forward" in table
    assert "Fine-tuning, out of fold (stratified 2-fold, shuffled by seed; mean over seeds" in table


def test_purged_folds_and_anywhere_through_finetune_and_the_report(reference_run, tmp_path):
    """A copy of the reference run, fine-tuned again with finetune.cv: purged, data.heldout: anywhere and three
    periods: the metrics and `moola report` name the scheme, carry the warning and split the held-out numbers."""
    repo = tmp_path / "repo"
    shutil.copytree(reference_run.repo, repo, symlinks=True)
    _set(repo, finetune={"heldout_periods": 301})
    proc = run(["python", "-m", "moola.stages.finetune"], repo, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: params.yaml: finetune.heldout_periods (301) exceeds the 300 held-out windows of "
        "data/prepared/test_windows.parquet; expected at most 300"]
    _set(repo, data={"heldout": "anywhere"}, finetune={"cv": "purged", "heldout_periods": 3})
    out = run(["python", "-m", "moola.stages.finetune"], repo).stdout
    assert "out-of-fold folds: time-ordered 2-fold, training windows within 105 bars of a test window purged" in out
    report = json.loads((repo / "metrics/finetune.json").read_text())
    labeled = read_windows(repo / "data/prepared/labeled_windows.parquet")
    expected = purged_splits(labeled.bar, 2, 105, 105)
    assert report["cv"]["scheme"] == "purged" and report["cv"]["embargo"] == 105
    assert report["cv"]["training_windows"] == [len(train) for train, _ in expected]
    assert sum(report["cv"]["purged_windows"]) > 0
    oof = pd.read_parquet(repo / "data/finetune/oof_predictions.parquet")
    first_fold = oof[(oof["init"] == "pretrained") & (oof["fold"] == 0)]
    assert sorted(first_fold["replicate"].unique()) == ["seed101", "seed102"]
    for _, rows in first_fold.groupby("replicate"):  # every replicate's fine-tuning on the same purged folds
        assert np.array_equal(np.sort(rows["window_id"].to_numpy()), labeled.window_id[expected[0][1]])
    heldout = report["heldout"]
    assert heldout["warning"].startswith("data.heldout is 'anywhere'") and "optimistic" in heldout["warning"]
    assert [e["windows"] for e in heldout["by_period"]] == [100, 100, 100]
    table = run(["python", "-m", "moola.cli", "report"], repo).stdout
    assert f"WARNING: {heldout['warning']}" in table.splitlines()
    assert "Fine-tuning, out of fold (time-ordered 2-fold, training windows within 105 bars of a test window purged;" in table
    # The period rows: after the section's two header lines, up to the blank line that ends it (other tables, the
    # budget curve's epochs among them, have rows that start with a small number too).
    periods = table[table.index("  by period (walk-forward"):].split("\n\n")[0].splitlines()[2:]
    rows = [line.split() for line in periods]
    assert [r[:2] for r in rows] == [["1", "100"], ["2", "100"], ["3", "100"]]
    acc = heldout["by_period"][2]["pretrained"]["accuracy"]
    assert f"{100 * acc['point']:5.1f}% [{100 * acc['ci_low']:4.1f}, {100 * acc['ci_high']:4.1f}]".strip() in " ".join(rows[2])
