"""The label-efficiency curve: how held-out accuracy and MCC grow with the number of labeled windows.

For every size n and seed: a stratified draw of n windows from the label pool; SimpleLSTM from the pretrained
encoder, from scratch, and from scratch on the pretrained schedule (the same draw, the same head initialisation
and batch order), the logistic regression and the majority class are trained on it with fine-tuning's settings (no
folds: every drawn window trains, and the last epoch's model is kept, as in fine-tuning), then each model predicts
the held-out windows. A point is the mean over seeds; its 95% interval is the hierarchical bootstrap of
moola.evaluation over the seeds and blocks of consecutive held-out windows (the same draws for every model, so the
lifts are paired). The seeds' range is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from moola import evaluation
from moola.finetuning import FROM_ENCODER, NETWORK_INITS, lifts_with_intervals, with_replicates
from moola.fits import Fit, Shared, run_fits
from moola.numerics import Numerics
from moola.params import FinetuneParams

MODELS = (*NETWORK_INITS, "logreg", "majority")
SCORED_METRICS = ("accuracy", "balanced_accuracy", "mcc")


def draw_labeled(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a stratified draw of `size` windows (all of them if the pool has no more), sorted."""
    n = len(labels)
    if size >= n:
        return np.arange(n)
    picked, _ = train_test_split(np.arange(n), train_size=size, stratify=labels, random_state=seed)
    return np.sort(picked)


def _train_seed(seed: int, size: int) -> int:
    # Shared by every network init: only the LSTM's start and schedule differ between them.
    return seed * 1000 + size


@dataclass
class CurveResult:
    sizes: list[int]  # the sizes that ran (those the pool can fill)
    skipped: list[int]  # sizes above the pool's windows
    # (size, model) -> (seeds, n_heldout) class predictions on the held-out windows
    predictions: dict[tuple[int, str], np.ndarray]


def run_curve(
    pool_values: np.ndarray,
    pool_labels: np.ndarray,
    heldout_values: np.ndarray,
    ft: FinetuneParams,
    sizes: Sequence[int],
    seeds: Sequence[int],
    encoder_state: Mapping[str, torch.Tensor],
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    workers: int = 1,
    threads: int = 1,
    numerics: Numerics | None = None,
) -> CurveResult:
    """Every model of MODELS trained on each size's draws; their held-out class predictions. The networks are
    trained by moola.fits (`workers` processes of `threads` threads on the CPU) with the settings of `ft`
    (finetune:) and `numerics` (finetuning.train_fold)."""
    pool_labels = np.asarray(pool_labels, dtype=np.int64)
    runnable = sorted(n for n in sizes if n <= len(pool_labels))
    skipped = sorted(n for n in sizes if n > len(pool_labels))
    pool_features = evaluation.window_features(pool_values)
    heldout_features = evaluation.window_features(heldout_values)
    draws = {(size, seed): draw_labeled(pool_labels, size, seed) for size in runnable for seed in seeds}
    keys = [(size, seed, init) for size in runnable for seed in seeds for init in NETWORK_INITS]
    jobs = [Fit(init, draws[(size, seed)], _train_seed(seed, size), "encoder" if init in FROM_ENCODER else None)
            for size, seed, init in keys]
    shared = Shared(pool_values, pool_labels, heldout_values, {"encoder": encoder_state}, ft, numerics,
                    str(torch.device(device)), threads)
    trained = dict(zip(keys, run_fits(jobs, shared, workers)))
    predictions: dict[tuple[int, str], list[np.ndarray]] = {}
    for size in runnable:
        for seed in seeds:
            idx = draws[(size, seed)]
            y = pool_labels[idx]
            for init in NETWORK_INITS:
                run = trained[(size, seed, init)]
                assert run.heldout_proba is not None
                predictions.setdefault((size, init), []).append(run.heldout_proba.argmax(axis=1))
            logreg = evaluation.logreg_proba(pool_features[idx], y, heldout_features, ft.class_weighted)
            predictions.setdefault((size, "logreg"), []).append(logreg.argmax(axis=1))
            majority = evaluation.majority_proba(y, len(heldout_values))
            predictions.setdefault((size, "majority"), []).append(majority.argmax(axis=1))
            log(f"labels {size}, seed {seed}: trained on {int(np.sum(y == 0))} + {int(np.sum(y == 1))} windows")
    return CurveResult(
        sizes=runnable, skipped=skipped, predictions={k: np.stack(v) for k, v in predictions.items()}
    )


def curve_report(
    heldout_labels: np.ndarray, result: CurveResult, resamples: int, seed: int, block: int | str = "auto",
    order: np.ndarray | None = None,
) -> tuple[dict, pd.DataFrame]:
    """(metrics, plot table): per size and model, each metric's mean over seeds with its hierarchical interval and
    the seeds' range; per size every paired lift of finetuning.LIFTS. `order`: the held-out windows in time order
    (blocks are consecutive windows of it; default file order)."""
    labels = np.asarray(heldout_labels, dtype=np.int64)
    order = np.arange(len(labels)) if order is None else np.asarray(order)
    labels = labels[order]
    seeds = next(iter(result.predictions.values())).shape[0] if result.predictions else 1
    res = evaluation.hierarchical_resampling(
        len(labels), seeds, 1, resamples, seed, evaluation.block_length(block, len(labels))
    )
    per_size: dict[str, dict] = {}
    rows = []
    for size in result.sizes:
        entry: dict[str, dict] = {}
        predicted = {model: with_replicates(model, result.predictions[(size, model)][:, order]) for model in MODELS}
        for model in MODELS:
            scores = {}
            for metric in SCORED_METRICS:
                interval = evaluation.bootstrap_interval(labels, predicted[model], metric, res)
                if interval.get("undefined"):  # one class only (data.allow_one_class_test): null, not a number
                    scores[metric] = {**interval, "seed_min": None, "seed_max": None}
                    continue
                per_seed = evaluation.pair_scores(labels, predicted[model], metric).ravel()
                scores[metric] = {**interval, "seed_min": round(float(per_seed.min()), 6),
                                  "seed_max": round(float(per_seed.max()), 6)}
            entry[model] = scores
            rows.append({"labels": size, "model": model, **{
                f"{metric}{suffix}": scores[metric][key]
                for metric in SCORED_METRICS
                for suffix, key in (("", "point"), ("_low", "ci_low"), ("_high", "ci_high"))
            }})
        entry.update(lifts_with_intervals(labels, predicted, SCORED_METRICS, res))
        per_size[str(size)] = entry
    columns = ["labels", "model"] + [f"{m}{s}" for m in SCORED_METRICS for s in ("", "_low", "_high")]
    table = pd.DataFrame(rows, columns=columns)
    return per_size, table
