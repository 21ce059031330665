"""The held-out test set: disjoint in time from every training window, read only by the evaluation stages, and
reported with intervals. The pipeline checks read the shared reference run (tests/pipeline_runs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, run

from moola import evaluation, label_efficiency, market
from moola.errors import DataError
from moola.params import parse_params
from moola.preparation import prepare
from moola.windows import overlapping, read_windows, validate_bars

pytest_plugins = ["pipeline_runs"]

# The only stages that may read the held-out windows: they evaluate, after training.
EVALUATION_STAGES = {"finetune", "label_curve", "budget_curve"}
# conftest.TINY: the answer fine-tunes from two pretraining replicates.
REPLICATES = ["seed101", "seed102"]
TEST_FILE = "data/prepared/test_windows.parquet"


def bar_index(bars: pd.DataFrame, starts: np.ndarray) -> np.ndarray:
    return np.searchsorted(bars["timestamp"].to_numpy(), np.asarray(starts, dtype="datetime64[ns]"))


def test_example_market_keeps_its_first_bars_and_labeled_windows():
    """The pool and the test set are a continuation: the bars and the 89 labeled windows are what they were."""
    args = (1337, 105, 10, 2000, 89, 15)
    bars, labels, test = market.example_data(*args)
    bars_x, labels_x, test_x = market.example_data(*args, label_pool=300, test_windows=400)
    assert len(test) == 0 and len(test_x) == 400 and len(labels_x) == 300
    pd.testing.assert_frame_equal(bars_x.iloc[: len(bars)], bars)
    pd.testing.assert_frame_equal(labels_x.iloc[:89], labels)


def test_reference_run_heldout_windows_overlap_no_training_window(reference_run):
    repo = reference_run.repo
    bars = pd.read_parquet(repo / "data/example/bars.parquet")
    unlabeled, pool, test = (read_windows(repo / f"data/prepared/{name}.parquet")
                             for name in ("unlabeled_windows", "label_pool", "test_windows"))
    window = unlabeled.values.shape[1]
    assert len(test) == 300 and len(pool) == 120  # conftest.TINY's data.test_windows and data.label_pool
    test_at = bar_index(bars, test.start)
    for training in (unlabeled, pool):
        assert not overlapping(test_at, bar_index(bars, training.start), window).any()
    # Later in time than every training window, with a trading week between.
    assert test_at.min() >= bar_index(bars, pool.start).max() + window + market.EXAMPLE_GAP_BARS
    labeled = read_windows(repo / "data/prepared/labeled_windows.parquet")
    assert np.array_equal(labeled.start, pool.start[:89]) and np.array_equal(labeled.label, pool.label[:89])


def test_only_evaluation_stages_depend_on_the_heldout_windows(reference_run):
    lock = yaml.safe_load((reference_run.repo / "dvc.lock").read_text())["stages"]
    readers = {name for name, stage in lock.items() if any(d["path"] == TEST_FILE for d in stage.get("deps", []))}
    assert readers == EVALUATION_STAGES & set(lock)
    assert {"finetune", "budget_curve"} <= readers
    # The raw held-out labels reach the pipeline only through prepare.
    raw = {name for name, stage in lock.items()
           if any(d["path"] == "data/example/test_labels.csv" for d in stage.get("deps", []))}
    assert raw == {"prepare"}
    # dvc.yaml says the same before resolution (foreach stages included).
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in declared.items():
        deps = (stage.get("do") or stage).get("deps", [])
        assert (TEST_FILE in deps) == (name in EVALUATION_STAGES), name


def _check_interval(m: dict) -> None:
    assert set(m) == {"point", "ci_low", "ci_high", "covers"}
    assert m["ci_low"] <= m["point"] <= m["ci_high"]
    # conftest.TINY: 300 held-out windows in blocks of round(300 ** (1/3)), one seed, two pretraining replicates
    # (every model's interval is drawn on the same resamples, the lifts' pairs too).
    assert m["covers"] == ["held-out windows (blocks of 7)", "pretraining replicates (2)"]


def test_reference_run_heldout_section_is_well_formed(reference_run):
    report = json.loads((reference_run.repo / "metrics/finetune.json").read_text())
    heldout = report["heldout"]
    assert heldout["windows"] == 300 and sum(heldout["class_counts"].values()) == 300
    assert (heldout["block"], heldout["seeds"], heldout["replicates"]) == (7, [1337], REPLICATES)
    for init in ("pretrained", "scratch", "scratch_same_schedule", "logreg", "majority"):
        assert set(heldout[init]) == set(evaluation.BOOTSTRAP_METRICS)
        for metric in heldout[init].values():
            _check_interval(metric)
    for name, other in (("lift", "scratch"), ("lift_same_schedule", "scratch_same_schedule")):
        for metric in evaluation.HELDOUT_LIFT_METRICS:
            lift = heldout[name][metric]
            assert lift["contains_zero"] == (lift["ci_low"] <= 0 <= lift["ci_high"])
            assert lift["point"] == pytest.approx(
                heldout["pretrained"][metric]["point"] - heldout[other][metric]["point"], abs=2e-6)
            assert lift["width_vs_independent_windows"] is None or lift["width_vs_independent_windows"] > 0
        verdict = heldout[name]["verdict"]
        assert verdict.startswith(f"pretrained - {other}: ")
        assert ("(intervals over held-out windows (blocks of 7) and pretraining replicates (2); not over the "
                "fine-tuning seed (1))") in verdict
        assert "noise" not in verdict
    # Each (replicate, seed) pair's lift, listed and plotted with the pooled interval; the pooled point is their
    # mean (scratch has no replicate: each replicate's pair takes the same scratch run).
    for name in ("lift", "lift_same_schedule"):
        pairs = [pair for pair in heldout["pairs"] if pair["lift"] == name]
        assert [(pair["replicate"], pair["seed"]) for pair in pairs] == [(r, 1337) for r in REPLICATES]
        for metric in evaluation.HELDOUT_LIFT_METRICS:
            mean = np.mean([pair[metric] for pair in pairs])
            assert mean == pytest.approx(heldout[name][metric]["point"], abs=2e-6), (name, metric)
    plot = pd.read_csv(reference_run.repo / "plots/finetune/lift_per_seed.csv")
    assert len(plot) == len(heldout["pairs"]) == 2 * len(REPLICATES)
    row = plot[plot["lift"] == "lift_same_schedule"].iloc[0]
    pooled = heldout["lift_same_schedule"]["mcc"]
    assert (row["mcc_pooled"], row["mcc_low"], row["mcc_high"]) == pytest.approx(
        (pooled["point"], pooled["ci_low"], pooled["ci_high"]), abs=1e-6)
    assert report["lift_same_schedule"]["accuracy"]["covers"][0] == "out-of-fold windows (blocks of 4)"
    assert report["criteria_scored"].startswith("out of fold")
    # Every row's interval holds its point. (No bound on its width here: the pretrained row's also spans the two
    # tiny replicates, whose classifiers differ by tens of points at this scale.)
    for init in ("pretrained", "scratch", "scratch_same_schedule"):
        acc = heldout[init]["accuracy"]
        assert acc["ci_low"] <= acc["point"] <= acc["ci_high"] and acc["ci_high"] > acc["ci_low"], init
    # The out-of-fold section is still there.
    assert "accuracy" in report["lift"] and "mean" in report["pretrained"]["accuracy"]
    assert "mean" in report["scratch_same_schedule"]["accuracy"]


def test_reference_run_label_curve_is_well_formed_and_plotted(reference_run):
    repo = reference_run.repo
    curve = json.loads((repo / "metrics/label_curve.json").read_text())
    assert curve["heldout_windows"] == 300 and curve["pool_windows"] == 120 and curve["seeds"] == [1337]
    # From the first replicate's encoder alone: its intervals do not cover pretraining runs.
    assert curve["encoder"] == "data/replicates/seed101/encoder.pt"
    assert list(curve["sizes"]) == ["20", "45"] and curve["skipped_sizes"] == []
    assert curve["precision"] == "fp32"
    for entry in curve["sizes"].values():
        for model in label_efficiency.MODELS:
            for metric in label_efficiency.SCORED_METRICS:
                m = entry[model][metric]
                assert m["ci_low"] <= m["point"] <= m["ci_high"]
                assert m["seed_min"] == m["seed_max"] == m["point"]  # one seed: its value is the mean
        for name, other in (("lift", "scratch"), ("lift_same_schedule", "scratch_same_schedule")):
            lift = entry[name]["accuracy"]
            expected = entry["pretrained"]["accuracy"]["point"] - entry[other]["accuracy"]["point"]
            assert lift["point"] == pytest.approx(expected, abs=1e-5)
            assert lift["covers"] == ["held-out windows (blocks of 7)"] and "not over the fine-tuning seed (1)" in (
                entry[name]["verdict"])
    assert curve["covers"] == ["held-out windows (blocks of 7)"]
    # The majority class predicts the training draw's larger class on every window: its accuracy is that share.
    test = read_windows(repo / TEST_FILE)
    assert curve["sizes"]["20"]["majority"]["accuracy"]["point"] == pytest.approx(np.mean(test.label == 0), abs=1e-6)
    table = pd.read_csv(repo / "plots/label_curve.csv")
    assert len(table) == 2 * len(label_efficiency.MODELS)
    row = table[(table["labels"] == 45) & (table["model"] == "pretrained")].iloc[0]
    assert row["mcc"] == pytest.approx(curve["sizes"]["45"]["pretrained"]["mcc"]["point"], abs=1e-6)
    # `dvc plots show` renders both curves with the project's band template (lines and interval bands), and the
    # held-out lift of each (replicate, seed) pair with the pairs template (points, the pooled interval's band).
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    pairs = pd.read_csv(repo / "plots/finetune/lift_per_seed.csv")
    for title, metric in (("Held-out lift per (replicate, seed) pair, accuracy", "accuracy"),
                          ("Held-out lift per (replicate, seed) pair, MCC", "mcc")):
        name = next(k for k in shown["data"] if k.startswith(title))
        content = shown["data"][name][0]["content"]
        assert len(content["data"]["values"]) == len(pairs)
        zero, band, pooled, points = content["layer"]
        assert zero["mark"]["type"] == "rule" and zero["encoding"]["y"]["datum"] == 0  # the lift's zero line
        assert band["encoding"]["y"]["field"] == f"{metric}_low" and band["encoding"]["y2"]["field"] == f"{metric}_high"
        assert pooled["encoding"]["y"]["field"] == f"{metric}_pooled"
        assert points["encoding"]["y"]["field"] == metric and points["encoding"]["x"]["field"] == "pair"
    for title, metric in (("Held-out accuracy", "accuracy"), ("Held-out MCC", "mcc")):
        name = next(k for k in shown["data"] if k.startswith(title))
        content = shown["data"][name][0]["content"]
        assert len(content["data"]["values"]) == len(table)
        band, line = content["layer"]
        assert band["encoding"]["y"]["field"] == f"{metric}_low" and band["encoding"]["y2"]["field"] == f"{metric}_high"
        assert line["encoding"]["y"]["field"] == metric and content["encoding"]["x"]["field"] == "labels"


@pytest.fixture(scope="module")
def small_market():
    bars, labels, test = market.example_data(1337, 105, 10, 300, 40, 15, label_pool=40, test_windows=30)
    return validate_bars(bars), labels, test


def _params(labels="user/labels.csv", test_labels="user/test_labels.csv", **data):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return parse_params({**raw, "data": {**raw["data"], "labels": labels, "test_labels": test_labels,
                                         "unlabeled_windows": 300, "labeled_windows": 40, **data}})


def test_user_test_labels_overlapping_labels_are_refused_in_one_line(small_market):
    bars, labels, _ = small_market
    shifted = labels.iloc[[3]].copy()
    shifted["start"] = bars["timestamp"].to_numpy()[bar_index(bars, shifted["start"])[0] + 50]
    with pytest.raises(DataError) as err:
        prepare(_params(), bars, labels, shifted)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("user/test_labels.csv: row 1") and "user/labels.csv" in message


def test_user_test_windows_inside_the_unlabeled_stretch_leave_pretraining(small_market):
    bars, labels, test = small_market
    # Held-out windows among the unlabeled ones (a user's choice, data.heldout: anywhere): those unlabeled windows
    # are left out.
    inside = pd.DataFrame({"start": bars["timestamp"].to_numpy()[[500, 1200]], "label": ["consolidation"] * 2})
    out = prepare(_params(heldout="anywhere"), bars, labels, inside)
    assert len(out.test) == 2 and out.excluded > 0
    assert len(out.unlabeled) == 300 - out.excluded
    window = out.unlabeled.values.shape[1]
    assert not overlapping(bar_index(bars, out.test.start), bar_index(bars, out.unlabeled.start), window).any()
    assert not overlapping(bar_index(bars, out.test.start), bar_index(bars, out.pool.start), window).any()


def test_no_rows_means_no_heldout_set(small_market):
    bars, labels, _ = small_market
    out = prepare(_params(test_labels="data/no_test_labels.csv"), bars, labels,
                  pd.read_csv(ROOT / "data/no_test_labels.csv"))
    assert len(out.test) == 0 and out.excluded == 0


def test_heldout_report_intervals_match_sklearn_points():
    from sklearn.metrics import matthews_corrcoef

    from moola.finetuning import heldout_report

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    proba_a = np.eye(2)[np.where(rng.random(400) < 0.7, labels, 1 - labels)]
    proba_b = np.eye(2)[np.where(rng.random(400) < 0.6, labels, 1 - labels)]
    predicted = {"pretrained": proba_a.argmax(1)[None, None], "scratch": proba_b.argmax(1)[None]}
    report = heldout_report(labels, predicted, 300, 1, "auto", [1337], ["exp"], folds=5)
    assert report["pretrained"]["mcc"]["point"] == pytest.approx(matthews_corrcoef(labels, proba_a.argmax(1)), abs=1e-6)
    assert report["lift"]["accuracy"]["point"] == pytest.approx(
        np.mean(proba_a.argmax(1) == labels) - np.mean(proba_b.argmax(1) == labels), abs=1e-6)
    assert report == heldout_report(labels, predicted, 300, 1, "auto", [1337], ["exp"], folds=5)
    assert report["block"] == 7 and "lift_same_schedule" not in report  # no schedule-matched row given


def test_curve_draws_are_stratified_seeded_and_whole_pool_at_its_size():
    labels = np.array([0] * 64 + [1] * 36)
    a, b = label_efficiency.draw_labeled(labels, 20, 7), label_efficiency.draw_labeled(labels, 20, 7)
    assert np.array_equal(a, b) and len(np.unique(a)) == 20
    assert np.bincount(labels[a]).tolist() == [13, 7]  # the pool's 64/36 share, rounded
    assert not np.array_equal(a, label_efficiency.draw_labeled(labels, 20, 8))
    assert np.array_equal(label_efficiency.draw_labeled(labels, 100, 7), np.arange(100))


def test_own_bars_with_the_example_heldout_labels_are_refused_naming_the_param():
    from moola.errors import ParamsError
    from moola.preparation import check_test_labels_follow_bars

    p = _params()  # the user's own labels and held-out labels: fine
    check_test_labels_follow_bars(p.data)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mixed = parse_params({**raw, "data": {**raw["data"], "bars": "data/raw/bars.csv", "labels": "data/raw/labels.csv"}})
    with pytest.raises(ParamsError) as info:
        check_test_labels_follow_bars(mixed.data)
    message = str(info.value)
    assert "\n" not in message and "data.test_labels" in message and "data/example/test_labels.csv" in message
    assert "data/raw/bars.csv" in message and "data/no_test_labels.csv" in message
