"""The pretraining-budget curve: the held-out lift as a function of pretraining epochs.

For every snapshot epoch e, replicate r and fine-tuning seed s: SimpleLSTM from replicate r's encoder as it was
after e epochs, trained on the pretrained schedule on every labeled window (no folds; the last epoch's model is
kept, as on the label curve) and scored on the held-out windows. Once per seed, the two scratch rows train on the
same windows with the same head initialisation and batch order (they do not depend on e). Per epoch, both lifts
get the hierarchical bootstrap of moola.evaluation over replicates, seeds and blocks of held-out windows (the same
draws at every epoch and for every row, so the lifts are paired).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from moola import evaluation
from moola.finetuning import lifts_with_intervals
from moola.fits import Fit, Shared, run_fits
from moola.numerics import Numerics
from moola.params import FinetuneParams

BUDGET_METRICS = evaluation.HELDOUT_LIFT_METRICS
SCRATCH_ROWS = ("scratch", "scratch_same_schedule")


def snapshot_key(replicate: str, epoch: int) -> str:
    return f"{replicate}@{epoch}"


def _train_seed(seed: int) -> int:
    # Shared by every row: only the LSTM's start (and scratch's schedule) differ between them.
    return seed * 1000 + 7


@dataclass
class BudgetResult:
    epochs: list[int]
    replicates: list[str]
    seeds: list[int]
    # epoch -> (replicates, seeds, n_heldout) class predictions of the pretrained row
    pretrained: dict[int, np.ndarray]
    # scratch row -> (seeds, n_heldout)
    scratch: dict[str, np.ndarray]


def run_budget(
    values: np.ndarray,
    labels: np.ndarray,
    heldout_values: np.ndarray,
    ft: FinetuneParams,
    snapshots: Mapping[str, Mapping[str, torch.Tensor]],
    epochs: Sequence[int],
    replicates: Sequence[str],
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
    workers: int = 1,
    threads: int = 1,
    numerics: Numerics | None = None,
) -> BudgetResult:
    """Train every fit of the curve (moola.fits) on all of `values`, with the settings of `ft` (finetune:) and
    `numerics` (finetuning.train_fold); `snapshots` maps snapshot_key -> weights."""
    rows = np.arange(len(labels))
    keys: list[tuple] = []
    jobs: list[Fit] = []
    for seed in seeds:
        for init in SCRATCH_ROWS:
            keys.append((init, seed))
            jobs.append(Fit(init, rows, _train_seed(seed)))
        for epoch in epochs:
            for replicate in replicates:
                keys.append(("pretrained", seed, epoch, replicate))
                jobs.append(Fit("pretrained", rows, _train_seed(seed), snapshot_key(replicate, epoch)))
    shared = Shared(values, np.asarray(labels, dtype=np.int64), heldout_values, snapshots, ft, numerics,
                    str(torch.device(device)), threads)
    trained = {key: run.heldout_proba.argmax(axis=1) for key, run in zip(keys, run_fits(jobs, shared, workers))}
    pretrained = {
        epoch: np.stack([np.stack([trained[("pretrained", s, epoch, r)] for s in seeds]) for r in replicates])
        for epoch in epochs
    }
    scratch = {init: np.stack([trained[(init, s)] for s in seeds]) for init in SCRATCH_ROWS}
    return BudgetResult(list(epochs), list(replicates), list(seeds), pretrained, scratch)


def budget_report(heldout_labels: np.ndarray, result: BudgetResult, resamples: int, seed: int,
                  block: int | str = "auto", order: np.ndarray | None = None) -> tuple[dict, pd.DataFrame]:
    """(metrics, plot table): per epoch each row's held-out scores and both lifts with their intervals. `order`: the
    held-out windows in time order (blocks are consecutive windows of it; default file order)."""
    labels = np.asarray(heldout_labels, dtype=np.int64)
    order = np.arange(len(labels)) if order is None else np.asarray(order)
    labels = labels[order]
    block_n = evaluation.block_length(block, len(labels))
    res = evaluation.hierarchical_resampling(len(labels), len(result.seeds), len(result.replicates), resamples,
                                             seed, block_n)
    scratch = {init: pred[:, order] for init, pred in result.scratch.items()}
    per_epoch: dict[str, dict] = {}
    rows = []
    for epoch in result.epochs:
        predicted = {"pretrained": result.pretrained[epoch][..., order], **scratch}
        entry: dict = {
            "pretrained": {m: evaluation.bootstrap_interval(labels, predicted["pretrained"], m, res)
                           for m in BUDGET_METRICS},
        }
        entry.update(lifts_with_intervals(labels, predicted, BUDGET_METRICS, res))
        per_epoch[str(epoch)] = entry
        for name in ("lift", "lift_same_schedule"):
            rows.append({"epoch": epoch, "lift": name, **{
                f"{m}{suffix}": entry[name][m][key]
                for m in BUDGET_METRICS for suffix, key in (("", "point"), ("_low", "ci_low"), ("_high", "ci_high"))
            }})
    report = {
        "epochs": result.epochs,
        "replicates": result.replicates,
        "seeds": result.seeds,
        "heldout_windows": int(len(labels)),
        "block": block_n,
        "resamples": resamples,
        "covers": res.covers(),
        "scratch": {init: {m: evaluation.bootstrap_interval(labels, pred, m, res) for m in BUDGET_METRICS}
                    for init, pred in scratch.items()},
        "by_epoch": per_epoch,
    }
    columns = ["epoch", "lift"] + [f"{m}{s}" for m in BUDGET_METRICS for s in ("", "_low", "_high")]
    return report, pd.DataFrame(rows, columns=columns)
