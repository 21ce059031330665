"""Metrics against hand-computed values, the seeded paired bootstrap, and the reference rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef

from moola import evaluation
from moola.errors import ParamsError


def one_hot(predicted, confidence=0.9):
    predicted = np.asarray(predicted)
    proba = np.full((len(predicted), 2), 1 - confidence)
    proba[np.arange(len(predicted)), predicted] = confidence
    return proba


def test_majority_class_on_51_38_is_the_reference_before_row():
    labels = np.array([0] * 51 + [1] * 38)
    proba = evaluation.majority_proba(labels, len(labels))
    m = evaluation.classification_metrics(labels, proba)
    assert m["accuracy"] == pytest.approx(51 / 89)
    assert round(m["accuracy"], 3) == 0.573
    assert m["recall_consolidation"] == 1.0
    assert m["recall_retracement"] == 0.0
    assert m["balanced_accuracy"] == 0.5
    assert m["mcc"] == 0.0
    # F1 of class 0: precision 51/89, recall 1 -> 102/140; class 1 has none predicted -> 0.
    assert m["macro_f1"] == pytest.approx((102 / 140) / 2)
    entropy = -(51 * math.log(51 / 89) + 38 * math.log(38 / 89)) / 89
    assert m["log_loss"] == pytest.approx(entropy)


def test_metrics_of_a_small_hand_case():
    labels = np.array([0, 0, 1, 1])
    m = evaluation.classification_metrics(labels, one_hot([0, 1, 1, 1]))
    assert m["accuracy"] == 0.75
    assert m["recall_consolidation"] == 0.5
    assert m["recall_retracement"] == 1.0
    assert m["balanced_accuracy"] == 0.75
    # F1: class 0 = 2*1*0.5/1.5 = 2/3; class 1 = 2*(2/3)*1/(5/3) = 0.8.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    # MCC = (TP*TN - FP*FN) / sqrt(...) = (2*1 - 1*0) / sqrt(3*2*2*1)
    assert m["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert m["log_loss"] == pytest.approx(-(3 * math.log(0.9) + math.log(0.1)) / 4)


def test_summarise_and_success_criteria():
    rows = [{"accuracy": 0.6, "recall_consolidation": 0.9, "recall_retracement": 0.3},
            {"accuracy": 0.8, "recall_consolidation": 0.7, "recall_retracement": 0.5}]
    summary = evaluation.summarise(rows)
    assert summary["accuracy"] == {"mean": 0.7, "std": 0.1}
    assert evaluation.summarise(rows[:1])["accuracy"]["std"] == 0.0
    assert evaluation.success_criteria(summary) == {
        "accuracy_above_64pct": True,
        "retracement_recall_above_40pct": False,  # exactly 0.40 is not above
        "every_class_recall_above_30pct": True,
        "all_met": False,
    }


def test_bootstrap_contains_point_and_is_seeded():
    rng = np.random.default_rng(3)
    labels = np.array([0] * 51 + [1] * 38)
    a = np.where(rng.random((1, 2, 89)) < 0.7, labels, 1 - labels)  # one replicate, two seeds
    b = np.where(rng.random((2, 89)) < 0.6, labels, 1 - labels)  # no replicate axis: pairs by seed
    res = evaluation.hierarchical_resampling(89, 2, 1, 500, 1337, 4)
    for metric in ("accuracy", "balanced_accuracy", "mcc"):
        lift = evaluation.paired_bootstrap_lift(labels, a, b, metric, res)
        assert lift["ci_low"] <= lift["point"] <= lift["ci_high"]
        assert lift == evaluation.paired_bootstrap_lift(
            labels, a, b, metric, evaluation.hierarchical_resampling(89, 2, 1, 500, 1337, 4))
        assert lift != evaluation.paired_bootstrap_lift(
            labels, a, b, metric, evaluation.hierarchical_resampling(89, 2, 1, 500, 7, 4))
    expected = np.mean([balanced_accuracy_score(labels, a[0, i]) - balanced_accuracy_score(labels, b[i]) for i in (0, 1)])
    assert evaluation.paired_bootstrap_lift(labels, a, b, "balanced_accuracy", res)["point"] == pytest.approx(
        expected, abs=1e-6)
    pairs = evaluation.pair_lifts(labels, a, b, "mcc")
    assert pairs.shape == (1, 2)
    assert pairs[0, 1] == pytest.approx(matthews_corrcoef(labels, a[0, 1]) - matthews_corrcoef(labels, b[1]))
    assert lift["covers"] == ["held-out windows (blocks of 4)", "fine-tuning seeds (2)"]


def test_block_counts_draw_n_windows_in_circular_blocks_and_block_1_is_the_plain_bootstrap():
    counts = evaluation.block_counts(10, 300, 5, 3)
    assert counts.shape == (300, 10) and (counts.sum(axis=1) == 10).all()
    # Circular: every window is drawn equally often on average (no edge effect).
    assert np.allclose(counts.mean(axis=0), 1.0, atol=0.15)
    plain = np.zeros((50, 30))
    np.add.at(plain, (np.arange(50)[:, None], np.random.default_rng(7).integers(0, 30, size=(50, 30))), 1.0)
    assert np.array_equal(evaluation.block_counts(30, 50, 7, 1), plain)
    assert [evaluation.block_length("auto", n) for n in (2000, 300, 89)] == [13, 7, 4]
    with pytest.raises(ParamsError, match=r"finetune\.bootstrap_block \(40\) exceeds the 30 held-out windows"):
        evaluation.block_length(40, 30)


def test_bootstrap_verdict_names_what_the_interval_covers():
    labels = np.array([0] * 10 + [1] * 8)
    res = evaluation.hierarchical_resampling(18, 1, 1, 200, 0, 1)
    same = evaluation.paired_bootstrap_lift(labels, labels[None], labels[None], "accuracy", res)
    assert same == {"point": 0.0, "ci_low": 0.0, "ci_high": 0.0, "covers": ["held-out windows (one at a time)"],
                    "contains_zero": True}
    perfect_vs_wrong = evaluation.paired_bootstrap_lift(labels, labels[None], 1 - labels[None], "accuracy", res)
    assert perfect_vs_wrong["point"] == 1.0 and perfect_vs_wrong["contains_zero"] is False
    verdict = evaluation.lift_verdict({"accuracy": perfect_vs_wrong, "mcc": same}, res, 18)
    assert verdict.startswith("the 95% interval excludes 0 for accuracy and contains 0 for mcc (intervals over "
                              "held-out windows (one at a time); not over the fine-tuning seed (1) or the "
                              "pretraining run (1 replicate))")
    many = evaluation.hierarchical_resampling(18, 3, 3, 10, 0, 2)
    assert many.covers() == ["held-out windows (blocks of 2)", "fine-tuning seeds (3)", "pretraining replicates (3)"]
    assert "noise" not in verdict and many.not_covered() == []


# --- simulated studies: the interval against a known truth -------------------------------------------------------


def simulated_study(rng, n, seeds, replicates, lift, seed_sd, replicate_sd, window_sd=0.1, persistence=0.0):
    """Two models' class predictions on n windows, with a known true accuracy lift (the mean over seeds, replicates
    and windows of the market). A window is right when its difficulty (shared by every model: the pairing), plus a
    little per-model noise (`window_sd`), is below the model's accuracy; the accuracy varies by pretraining
    replicate (A only) and fine-tuning seed (both). `persistence`: how much a window's difficulty carries over to
    the next one (0: independent windows; 0.95: long clusters)."""
    labels = rng.integers(0, 2, n)
    z = rng.normal(size=n)
    for i in range(1, n):  # an AR(1) latent; its normal CDF is uniform on [0, 1] whatever the persistence
        z[i] = persistence * z[i - 1] + np.sqrt(1 - persistence**2) * z[i]
    difficulty = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    accuracy_a = 0.6 + lift + rng.normal(0, replicate_sd, (replicates, 1, 1)) + rng.normal(0, seed_sd, (replicates, seeds, 1))
    accuracy_b = 0.6 + rng.normal(0, seed_sd, (seeds, 1))
    a = np.where(difficulty + rng.normal(0, window_sd, (replicates, seeds, n)) < accuracy_a, labels, 1 - labels)
    b = np.where(difficulty + rng.normal(0, window_sd, (seeds, n)) < accuracy_b, labels, 1 - labels)
    return labels, a, b


def test_hierarchical_interval_covers_the_true_lift_in_90_to_98_percent_of_studies():
    """3 pretraining replicates x 3 fine-tuning seeds, 2,000 windows, a true lift of 3 points; per model, the
    replicates' accuracy spreads by 1 point (sd) and the seeds' by 0.5. Measured here: 0.93 of 300 studies.

    Known limits (measured with this simulation, not asserted): with 3 seeds the interval cannot span more than the
    seeds' range, so when the seeds' spread dominates the windows' it under-covers (seed sd 2 points, one
    replicate: 0.80); with no seed spread at all it over-covers (1.00: each seed's own window noise is counted at
    both levels). More seeds and replicates are what narrows the first gap."""
    rng = np.random.default_rng(2026)
    studies, truth, hits = 300, 0.03, 0
    for study in range(studies):
        labels, a, b = simulated_study(rng, 2000, 3, 3, truth, seed_sd=0.005, replicate_sd=0.01)
        res = evaluation.hierarchical_resampling(2000, 3, 3, 400, study, 1)
        lift = evaluation.paired_bootstrap_lift(labels, a, b, "accuracy", res)
        hits += lift["ci_low"] <= truth <= lift["ci_high"]
    assert 0.90 <= hits / studies <= 0.98, hits / studies


def _width(labels, a, b, block):
    lift = evaluation.paired_bootstrap_lift(
        labels, a, b, "accuracy", evaluation.hierarchical_resampling(len(labels), 1, 1, 1000, 11, block))
    return lift["ci_high"] - lift["ci_low"]


def test_blocks_widen_the_interval_on_autocorrelated_windows_and_not_on_independent_ones():
    rng = np.random.default_rng(7)
    clustered = simulated_study(rng, 2000, 1, 1, 0.05, 0.0, 0.0, window_sd=0.02, persistence=0.95)
    independent = simulated_study(rng, 2000, 1, 1, 0.05, 0.0, 0.0, window_sd=0.02, persistence=0.0)
    block = evaluation.block_length("auto", 2000)
    widened = _width(*clustered, block) / _width(*clustered, 1)
    same = _width(*independent, block) / _width(*independent, 1)
    assert widened > 1.2 and 0.85 < same < 1.15, (widened, same)  # measured here: 1.31 and 1.00


def test_reference_rows():
    rng = np.random.default_rng(0)
    values = rng.random((30, 40, 4)).astype(np.float32)
    features = evaluation.window_features(values)
    assert features.shape == (30, len(evaluation.WINDOW_FEATURES))
    assert np.isfinite(features).all()
    # A straight line from 0 to 1: rises by the whole window, ends at the top.
    line = np.repeat(np.linspace(0, 1, 40)[None, :, None], 4, axis=2)
    net, last20, _, slope, _, last = evaluation.window_features(line)[0]
    assert net == pytest.approx(1.0) and last == pytest.approx(1.0)
    assert last20 == pytest.approx(20 / 39) and slope == pytest.approx(40 / 39)
    labels = (features[:, 0] > np.median(features[:, 0])).astype(np.int64)
    proba = evaluation.logreg_proba(features[:20], labels[:20], features[20:], class_weighted=True)
    assert proba.shape == (10, 2) and np.allclose(proba.sum(axis=1), 1.0)
    assert evaluation.majority_proba(np.array([1, 1, 0]), 2).tolist() == [[1 / 3, 2 / 3]] * 2
