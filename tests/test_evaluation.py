"""Metrics against hand-computed values, the seeded paired bootstrap, and the reference rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from moola import evaluation


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
    a = np.where(rng.random((2, 89)) < 0.7, labels, 1 - labels)
    b = np.where(rng.random((2, 89)) < 0.6, labels, 1 - labels)
    for metric in ("accuracy", "balanced_accuracy"):
        lift = evaluation.paired_bootstrap_lift(labels, a, b, metric, resamples=500, seed=1337)
        assert lift["ci_low"] <= lift["point"] <= lift["ci_high"]
        assert lift == evaluation.paired_bootstrap_lift(labels, a, b, metric, resamples=500, seed=1337)
        assert lift != evaluation.paired_bootstrap_lift(labels, a, b, metric, resamples=500, seed=7)
    expected = np.mean([balanced_accuracy_score(labels, a[i]) - balanced_accuracy_score(labels, b[i]) for i in (0, 1)])
    got = evaluation.paired_bootstrap_lift(labels, a, b, "balanced_accuracy", resamples=10, seed=0)["point"]
    assert got == pytest.approx(expected, abs=1e-6)


def test_bootstrap_noise_verdict():
    labels = np.array([0] * 10 + [1] * 8)
    same = evaluation.paired_bootstrap_lift(labels, labels[None], labels[None], "accuracy", 200, 0)
    assert same == {"point": 0.0, "ci_low": 0.0, "ci_high": 0.0, "inside_noise": True}
    perfect_vs_wrong = evaluation.paired_bootstrap_lift(labels, labels[None], 1 - labels[None], "accuracy", 200, 0)
    assert perfect_vs_wrong["point"] == 1.0 and perfect_vs_wrong["inside_noise"] is False


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
