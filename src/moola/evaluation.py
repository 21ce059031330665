"""Classification metrics, their summary over seeds, the paired bootstrap of the lift, and the reference rows.

The reference rows are what any claim of transfer must beat on the same folds: the majority class (the
reference document's "before pretraining": 57.1% accuracy, retracement recall 0%) and a logistic regression on
a handful of window statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    matthews_corrcoef,
    recall_score,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from moola.params import CLASS_NAMES

LABELS = list(range(len(CLASS_NAMES)))
METRICS = (
    "accuracy",
    "balanced_accuracy",
    *(f"recall_{name}" for name in CLASS_NAMES),
    "macro_f1",
    "mcc",
    "log_loss",
)

# The reference document's success criteria for the fine-tuned classifier.
SUCCESS_ACCURACY = 0.64
SUCCESS_RETRACEMENT_RECALL = 0.40
SUCCESS_EVERY_RECALL = 0.30

# Probabilities are clipped before the log so one confident mistake costs a large but finite log loss.
_EPS = 1e-7


def classification_metrics(labels: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Every metric of METRICS for one set of predictions; `proba` is (n, classes), prediction = argmax."""
    labels = np.asarray(labels)
    proba = np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0)
    proba = proba / proba.sum(axis=1, keepdims=True)
    predicted = proba.argmax(axis=1)
    recalls = recall_score(labels, predicted, labels=LABELS, average=None, zero_division=0)
    out = {
        "accuracy": accuracy_score(labels, predicted),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted),
        **{f"recall_{name}": recalls[i] for i, name in enumerate(CLASS_NAMES)},
        "macro_f1": f1_score(labels, predicted, labels=LABELS, average="macro", zero_division=0),
        "mcc": matthews_corrcoef(labels, predicted),
        "log_loss": log_loss(labels, proba, labels=LABELS),
    }
    return {key: float(value) for key, value in out.items()}


def summarise(per_seed: Sequence[dict[str, float]], digits: int = 6) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std"}} over seeds; std is the population std (0.0 for a single seed, never NaN)."""
    out = {}
    for key in per_seed[0]:
        values = np.array([row[key] for row in per_seed], dtype=np.float64)
        out[key] = {"mean": round(float(values.mean()), digits), "std": round(float(values.std()), digits)}
    return out


def success_criteria(summary: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The reference document's success criteria, on the mean over seeds."""
    recalls = [summary[f"recall_{name}"]["mean"] for name in CLASS_NAMES]
    checks = {
        "accuracy_above_64pct": summary["accuracy"]["mean"] > SUCCESS_ACCURACY,
        "retracement_recall_above_40pct": summary["recall_retracement"]["mean"] > SUCCESS_RETRACEMENT_RECALL,
        "every_class_recall_above_30pct": min(recalls) > SUCCESS_EVERY_RECALL,
    }
    return {**checks, "all_met": all(checks.values())}


# --- bootstrap ------------------------------------------------------------------------------------------------
# Every metric is computed from `counts` (resamples, n): how often each window was drawn. The point estimate is the
# same function with counts of one, so a metric's value and its interval come from one implementation.


def _accuracy_from_counts(counts: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy of each resample; counts (resamples, n), predicted and labels (n,)."""
    return counts @ (predicted == labels).astype(np.float64) / counts.sum(axis=1)


def _recall_from_counts(cls: int) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    def recall(counts: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
        member = (labels == cls).astype(np.float64)
        total = counts @ member
        # A resample without the class has no recall for it (NaN; percentiles skip it).
        return np.where(total > 0, counts @ (member * (predicted == cls)) / np.maximum(total, 1), np.nan)

    return recall


def _balanced_accuracy_from_counts(counts: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    recalls = np.stack([_recall_from_counts(cls)(counts, predicted, labels) for cls in LABELS])
    # A resample without a class: average over the classes it holds.
    return np.nanmean(recalls, axis=0)


def _mcc_from_counts(counts: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Matthews correlation (multi-class form, as sklearn's) from the weighted confusion matrix of each resample;
    0 where it is undefined (a resample with one class, or one predicted class), as sklearn returns."""
    s = counts.sum(axis=1)
    correct = counts @ (predicted == labels).astype(np.float64)
    t = np.stack([counts @ (labels == k).astype(np.float64) for k in LABELS], axis=1)  # true class totals
    p = np.stack([counts @ (predicted == k).astype(np.float64) for k in LABELS], axis=1)  # predicted totals
    numerator = correct * s - np.sum(t * p, axis=1)
    denominator = np.sqrt((s**2 - np.sum(p**2, axis=1)) * (s**2 - np.sum(t**2, axis=1)))
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)


BOOTSTRAP_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "accuracy": _accuracy_from_counts,
    "balanced_accuracy": _balanced_accuracy_from_counts,
    "mcc": _mcc_from_counts,
    **{f"recall_{name}": _recall_from_counts(cls) for cls, name in enumerate(CLASS_NAMES)},
}
# The out-of-fold lift keeps the reference protocol's two metrics; the held-out lift adds MCC.
OOF_LIFT_METRICS = ("accuracy", "balanced_accuracy")
HELDOUT_LIFT_METRICS = ("accuracy", "balanced_accuracy", "mcc")


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n): how often each of n windows is drawn in each resample (with replacement). Seeded."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    return counts


def _score(metric: str, weights: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The metric per row of `weights`, averaged over the rows of `predicted` (seeds, n)."""
    score = BOOTSTRAP_METRICS[metric]
    return np.mean([score(weights, row, labels) for row in np.atleast_2d(predicted)], axis=0)


def undefined_because(labels: np.ndarray, metric: str) -> str | None:
    """Why `metric` has no value on windows with these labels (None: it has one). A recall needs a window of its
    class; with one class only, balanced accuracy and MCC do not measure what they are for."""
    labels = np.asarray(labels)
    present = [name for cls, name in enumerate(CLASS_NAMES) if np.any(labels == cls)]
    if metric.startswith("recall_") and metric[len("recall_"):] not in present:
        return f"no window of class '{metric[len('recall_'):]}' among the {len(labels)} scored: its recall is undefined"
    if metric in ("balanced_accuracy", "mcc") and len(present) < 2:
        only = present[0] if present else "?"
        return f"the {len(labels)} windows scored are all '{only}': {metric} needs both classes"
    return None


def _undefined(reason: str) -> dict:
    # JSON has no NaN: an undefined number is null, with the reason beside it (moola.io.write_json refuses NaN).
    return {"point": None, "ci_low": None, "ci_high": None, "undefined": reason}


def _interval(point: float, samples: np.ndarray, confidence: float) -> dict[str, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.nanpercentile(samples, [tail, 100.0 - tail])
    return {"point": round(point, 6), "ci_low": round(float(low), 6), "ci_high": round(float(high), 6)}


def point_score(labels: np.ndarray, predicted: np.ndarray, metric: str) -> float:
    """The metric on every window once (the bootstrap's point estimate), averaged over the rows of (seeds, n)."""
    labels = np.asarray(labels)
    return float(_score(metric, np.ones((1, len(labels))), predicted, labels)[0])


def bootstrap_interval(
    labels: np.ndarray, predicted: np.ndarray, metric: str, counts: np.ndarray, confidence: float = 0.95
) -> dict[str, float]:
    """A metric of (seeds, n) or (n,) class predictions with its percentile-bootstrap interval over windows;
    `counts` from resample_counts (share it between models to pair them)."""
    labels = np.asarray(labels)
    reason = undefined_because(labels, metric)
    if reason:
        return _undefined(reason)
    return _interval(point_score(labels, predicted, metric), _score(metric, counts, predicted, labels), confidence)


def paired_bootstrap_lift(
    labels: np.ndarray,
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    metric: str,
    resamples: int,
    seed: int,
    confidence: float = 0.95,
    counts: np.ndarray | None = None,
) -> dict[str, float | bool]:
    """Lift of A over B (metric of A - metric of B) with a percentile bootstrap CI, resampling windows.

    `predicted_a`/`predicted_b` are (seeds, n) class predictions of the same n windows (one row per seed). Each
    resample draws windows with replacement and scores both models on the same draw (paired), averaging the
    metric over seeds, so the interval reflects which windows happened to be labeled, not one lucky split.
    """
    labels = np.asarray(labels)
    reason = undefined_because(labels, metric)
    if reason:
        return {**_undefined(reason), "inside_noise": None}
    if counts is None:
        counts = resample_counts(labels.shape[0], resamples, seed)
    everything = np.ones((1, labels.shape[0]), dtype=np.float64)

    def lift(weights: np.ndarray) -> np.ndarray:
        return _score(metric, weights, predicted_a, labels) - _score(metric, weights, predicted_b, labels)

    out: dict[str, float | bool] = dict(_interval(float(lift(everything)[0]), lift(counts), confidence))
    # The interval contains 0: the data cannot tell the two apart.
    out["inside_noise"] = bool(out["ci_low"] <= 0.0 <= out["ci_high"])
    return out


# --- reference rows -------------------------------------------------------------------------------------------

WINDOW_FEATURES = (
    "net_return",
    "return_last20",
    "range_last20",
    "slope",
    "volatility_last_third",
    "last_close_position",
)


def window_features(values: np.ndarray) -> np.ndarray:
    """(n, window, 4 OHLC) normalised windows -> (n, len(WINDOW_FEATURES)) statistics for the logistic regression.

    The windows are min-max normalised to their own range, so the whole window's range is always 1; the range of
    the last 20 bars and the last close's position in [0, 1] carry that information instead.
    """
    values = np.asarray(values, dtype=np.float64)
    high, low, close = values[:, :, 1], values[:, :, 2], values[:, :, 3]
    steps = values.shape[1]
    last20 = min(20, steps - 1)
    third = max(2, steps // 3)
    centred = np.arange(steps, dtype=np.float64) - (steps - 1) / 2.0
    slope_weights = centred / np.sum(centred**2)  # close @ slope_weights = least-squares slope per bar
    features = np.stack(
        [
            close[:, -1] - close[:, 0],
            close[:, -1] - close[:, -1 - last20],
            high[:, -last20:].max(axis=1) - low[:, -last20:].min(axis=1),
            close @ slope_weights * steps,  # the fitted line's rise over the whole window
            np.diff(close[:, -third:], axis=1).std(axis=1),
            close[:, -1],
        ],
        axis=1,
    )
    return features


def majority_proba(train_labels: np.ndarray, n_test: int) -> np.ndarray:
    """Always the training fold's majority class; probabilities = the training fold's class frequencies."""
    model = DummyClassifier(strategy="prior").fit(np.zeros((len(train_labels), 1)), train_labels)
    proba = np.zeros((n_test, len(LABELS)))
    proba[:, model.classes_] = model.predict_proba(np.zeros((n_test, 1)))
    return proba


def logreg_proba(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, class_weighted: bool
) -> np.ndarray:
    """Standardised logistic regression on window statistics (balanced class weights like the networks' loss)."""
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced" if class_weighted else None, max_iter=1000),
    )
    model.fit(train_features, train_labels)
    proba = np.zeros((len(test_features), len(LABELS)))
    proba[:, model.classes_] = model.predict_proba(test_features)
    return proba
