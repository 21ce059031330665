"""Classification metrics, their summary over seeds, the hierarchical paired bootstrap of the lift, and the
reference rows.

The reference rows are what any claim of transfer must beat on the same folds: the majority class (the
reference document's "before pretraining": 57.1% accuracy, retracement recall 0%) and a logistic regression on
a handful of window statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

from moola.errors import ParamsError
from moola.params import CLASS_NAMES, PARAMS_FILE

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
# A hierarchical bootstrap over the three sources of variation of a fine-tuned model's score: which pretraining run
# made its encoder (replicates), which fine-tuning seed trained it (fold split, head initialisation, batch order),
# and which windows the market happened to produce (resampled in blocks of consecutive windows, since neighbouring
# windows share volatility clusters). Every metric is computed from `counts` (resamples, n): how often each window
# was drawn. The point estimate is the same function with counts of one, so a metric's value and its interval come
# from one implementation.
#
# Predictions are class predictions shaped (replicates, seeds, n) for a model fine-tuned from an encoder, or
# (seeds, n) for one without an encoder (scratch, the reference rows): those have no replicate axis and pair with
# every replicate by seed. A model's score is the mean over its (replicate, seed) pairs of the metric on the windows.


def _accuracy_from_counts(counts: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy of each resample and row; counts (resamples, n), predicted (rows, n), labels (n,) -> (resamples, rows)."""
    return counts @ (predicted == labels).T.astype(np.float64) / counts.sum(axis=1)[:, None]


def _recall_from_counts(cls: int) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    def recall(counts: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
        member = (labels == cls).astype(np.float64)
        total = (counts @ member)[:, None]
        hits = counts @ ((predicted == cls) * member).T.astype(np.float64)
        # A resample without the class has no recall for it (NaN; percentiles skip it).
        return np.where(total > 0, hits / np.maximum(total, 1), np.nan)

    return recall


def _balanced_accuracy_from_counts(counts: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    recalls = np.stack([_recall_from_counts(cls)(counts, predicted, labels) for cls in LABELS])
    # A resample without a class: average over the classes it holds.
    return np.nanmean(recalls, axis=0)


def _mcc_from_counts(counts: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Matthews correlation (multi-class form, as sklearn's) from the weighted confusion matrix of each resample and
    row; 0 where it is undefined (a resample with one class, or one predicted class), as sklearn returns."""
    s = counts.sum(axis=1)[:, None]
    correct = counts @ (predicted == labels).T.astype(np.float64)
    t = np.stack([counts @ (labels == k).astype(np.float64) for k in LABELS], axis=1)[:, None, :]  # true totals
    p = np.stack([counts @ (predicted == k).T.astype(np.float64) for k in LABELS], axis=2)  # predicted totals
    numerator = correct * s - np.sum(t * p, axis=2)
    denominator = np.sqrt((s**2 - np.sum(p**2, axis=2)) * (s**2 - np.sum(t**2, axis=2)))
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


def block_length(setting: int | str, n: int, where: str = "held-out windows") -> int:
    """finetune.bootstrap_block for n windows: an integer as given, or "auto": round(n ** (1/3)), at least 1 (the
    order of the block length that is best for a variance estimate: Hall, Horowitz & Jing 1995)."""
    if setting == "auto":
        return max(1, round(n ** (1.0 / 3.0)))
    if int(setting) > n:
        raise ParamsError(f"{PARAMS_FILE}: finetune.bootstrap_block ({setting}) exceeds the {n} {where} it resamples "
                          f"(expected at most {n}, or auto)")
    return int(setting)


def block_counts(n: int, resamples: int, seed: int, block: int) -> np.ndarray:
    """(resamples, n): how often each of n windows is drawn by a circular block bootstrap (Politis & Romano 1992).

    Each resample strings together blocks of `block` consecutive windows starting anywhere (wrapping from the last
    window to the first, so every window is drawn equally often on average), cut to n windows. block=1 is the
    ordinary bootstrap of independent windows (the same draws as before blocks existed). Seeded."""
    if not 1 <= block <= n:
        raise ValueError(f"block length {block} for {n} windows (expected 1 to {n})")
    rng = np.random.default_rng(seed)
    blocks = -(-n // block)
    starts = rng.integers(0, n, size=(resamples, blocks))
    drawn = ((starts[:, :, None] + np.arange(block)) % n).reshape(resamples, blocks * block)[:, :n]
    flat = (drawn + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def _multiplicity(rng: np.random.Generator, resamples: int, k: int) -> np.ndarray:
    """(resamples, k): how often each of k units is drawn, k draws with replacement per resample."""
    draws = rng.integers(0, k, size=(resamples, k)) + k * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * k).reshape(resamples, k).astype(np.float64)


@dataclass(frozen=True)
class Resampling:
    """The draws of one hierarchical bootstrap; every model scored on the same Resampling is paired with the others
    on each draw (the same replicates, seeds and windows)."""

    windows: np.ndarray  # (resamples, n): how often each window is drawn
    seeds: np.ndarray  # (resamples, seeds): how often each fine-tuning seed is drawn
    replicates: np.ndarray  # (resamples, replicates): how often each pretraining replicate is drawn
    block: int
    where: str  # what the windows are, for `covers`: "held-out windows", "out-of-fold windows"

    @property
    def resamples(self) -> int:
        return self.windows.shape[0]

    def covers(self) -> list[str]:
        """The sources of variation the intervals resample, in words; a level with one unit resamples nothing."""
        blocks = "one at a time" if self.block == 1 else f"blocks of {self.block}"
        out = [f"{self.where} ({blocks})"]
        if self.seeds.shape[1] > 1:
            out.append(f"fine-tuning seeds ({self.seeds.shape[1]})")
        if self.replicates.shape[1] > 1:
            out.append(f"pretraining replicates ({self.replicates.shape[1]})")
        return out

    def not_covered(self) -> list[str]:
        """The levels with one unit: their variation is in no interval."""
        out = []
        if self.seeds.shape[1] == 1:
            out.append("the fine-tuning seed (1)")
        if self.replicates.shape[1] == 1:
            out.append("the pretraining run (1 replicate)")
        return out


def hierarchical_resampling(
    n: int, seeds: int, replicates: int, resamples: int, seed: int, block: int, where: str = "held-out windows"
) -> Resampling:
    """Draw `resamples` hierarchical resamples: replicates and seeds with replacement, windows in circular blocks.

    The windows come from the generator seeded with `seed` and the levels from a second stream, so a different
    block length changes only the windows drawn (the width ratio compares like with like)."""
    levels = np.random.default_rng([seed, 1])
    seed_draws = _multiplicity(levels, resamples, seeds)
    replicate_draws = _multiplicity(levels, resamples, replicates)
    return Resampling(block_counts(n, resamples, seed, block), seed_draws, replicate_draws, block, where)


def _pair_weights(predicted: np.ndarray, res: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """(rows (pairs, n), weights (resamples, pairs)): each (replicate, seed) row's share of a resample's mean."""
    predicted = np.asarray(predicted)
    seeds = res.seeds.shape[1]
    if predicted.ndim == 2:
        if predicted.shape[0] != seeds:
            raise ValueError(f"predictions for {predicted.shape[0]} seeds, resampling draws {seeds}")
        return predicted, res.seeds / seeds
    replicates = res.replicates.shape[1]
    if predicted.ndim != 3 or predicted.shape[:2] != (replicates, seeds):
        raise ValueError(f"predictions shaped {predicted.shape}, expected ({replicates}, {seeds}, n) or ({seeds}, n)")
    weights = res.replicates[:, :, None] * res.seeds[:, None, :] / (replicates * seeds)
    return predicted.reshape(replicates * seeds, -1), weights.reshape(res.resamples, -1)


def _resampled(metric: str, labels: np.ndarray, predicted: np.ndarray, res: Resampling) -> np.ndarray:
    """(resamples,): the model's score on each resample (NaN where a pair's metric is undefined)."""
    rows, weights = _pair_weights(predicted, res)
    return np.sum(BOOTSTRAP_METRICS[metric](res.windows, rows, labels) * weights, axis=1)


def pair_scores(labels: np.ndarray, predicted: np.ndarray, metric: str) -> np.ndarray:
    """The metric on every window once, per (replicate, seed) row: (replicates, seeds) or (seeds,)."""
    labels = np.asarray(labels)
    predicted = np.asarray(predicted)
    rows = predicted.reshape(-1, predicted.shape[-1])
    return BOOTSTRAP_METRICS[metric](np.ones((1, len(labels))), rows, labels)[0].reshape(predicted.shape[:-1])


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


def point_score(labels: np.ndarray, predicted: np.ndarray, metric: str) -> float:
    """The bootstrap's point estimate: the mean over (replicate, seed) pairs of the metric on every window."""
    return float(np.mean(pair_scores(labels, predicted, metric)))


def pair_lifts(labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray, metric: str) -> np.ndarray:
    """(replicates, seeds): A's metric minus B's for each pair; B without a replicate axis pairs with every one."""
    a = pair_scores(labels, predicted_a, metric)
    b = pair_scores(labels, predicted_b, metric)
    return np.atleast_2d(a) - (b[None] if np.ndim(b) < np.ndim(a) else b)


def _interval(point: float, samples: np.ndarray, confidence: float, res: Resampling) -> dict:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.nanpercentile(samples, [tail, 100.0 - tail])
    return {"point": round(point, 6), "ci_low": round(float(low), 6), "ci_high": round(float(high), 6),
            "covers": res.covers()}


def bootstrap_interval(
    labels: np.ndarray, predicted: np.ndarray, metric: str, res: Resampling, confidence: float = 0.95
) -> dict:
    """A model's metric (mean over its pairs) with its percentile interval over the resampling's draws."""
    labels = np.asarray(labels)
    reason = undefined_because(labels, metric)
    if reason:
        return _undefined(reason)
    return _interval(point_score(labels, predicted, metric), _resampled(metric, labels, predicted, res), confidence,
                     res)


def paired_bootstrap_lift(
    labels: np.ndarray,
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    metric: str,
    res: Resampling,
    confidence: float = 0.95,
) -> dict:
    """Lift of A over B (A's score - B's) with a percentile interval; both are scored on the same draws (paired)."""
    labels = np.asarray(labels)
    reason = undefined_because(labels, metric)
    if reason:
        return {**_undefined(reason), "contains_zero": None}
    point = point_score(labels, predicted_a, metric) - point_score(labels, predicted_b, metric)
    samples = _resampled(metric, labels, predicted_a, res) - _resampled(metric, labels, predicted_b, res)
    out = _interval(point, samples, confidence, res)
    out["contains_zero"] = bool(out["ci_low"] <= 0.0 <= out["ci_high"])
    return out


def lift_verdict(lifts: dict[str, dict], res: Resampling, n: int) -> str:
    """One line on a lift's intervals: which exclude 0, and what the intervals cover and do not."""
    metrics = [m for m in lifts if isinstance(lifts[m], dict) and "contains_zero" in lifts[m]]
    zero = [m for m in metrics if lifts[m]["contains_zero"] is True]
    clear = [m for m in metrics if lifts[m]["contains_zero"] is False]
    # An undefined lift (one class only: null, with its reason) is neither.
    undefined = [m for m in metrics if lifts[m]["contains_zero"] is None]
    if undefined:
        metrics, head_undefined = [m for m in metrics if m not in undefined], f"; undefined for {', '.join(undefined)}"
    else:
        head_undefined = ""
    if not metrics:
        head = "no interval is defined"
    elif not zero:
        head = "every 95% interval excludes 0"
    elif not clear:
        head = "every 95% interval contains 0"
    else:
        head = f"the 95% interval excludes 0 for {', '.join(clear)} and contains 0 for {', '.join(zero)}"
    text = f"{head}{head_undefined} (intervals over {' and '.join(res.covers())}"
    missing = res.not_covered()
    text += f"; not over {' or '.join(missing)})" if missing else ")"
    return text + f"; one window of {n} is {100 / n:.2f} points"


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


# --- walk-forward and the as-of warning -------------------------------------------------------------------------


def when(value) -> str:
    """A window start as text: ISO seconds for a timestamp, as it is otherwise."""
    return np.datetime_as_string(value, unit="s") if isinstance(value, np.datetime64) else str(value)


def heldout_warning(heldout: str) -> str | None:
    """data.heldout: anywhere gives up the as-of split; every place that prints held-out numbers says so."""
    if heldout == "after":
        return None
    return ("data.heldout is 'anywhere': held-out windows may lie among or before the training windows (no as-of "
            "split, no embargo), so held-out results may be optimistic")
