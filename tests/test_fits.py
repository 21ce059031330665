"""moola.fits: a list of fine-tunings gives the same bytes whether one process trains them or two do, in order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT
from moola import finetuning, fits
from moola.fits import Fit, Shared, run_fits, worker_count
from moola.params import load_params

HIDDEN = 16
# finetune: for small fits: the repository's params.yaml with a small model trained for 2 epochs (1 frozen).
CFG = dataclasses.replace(
    load_params(ROOT / "params.yaml").finetune,
    epochs=2, freeze_epochs=1, batch_size=8, learning_rate=1e-2, encoder_learning_rate=1e-3, weight_decay=1e-4,
    hidden_size=HIDDEN, attention_heads=4, dropout=0.1, grad_clip=1.0, class_weighted=True,
)


def data(n: int = 24, steps: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random windows whose class shows in the last steps' close (as tests/test_finetuning.py)."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n - n // 3) + [1] * (n // 3), dtype=np.int64)
    values = rng.random((n, steps, 4)).astype(np.float32)
    values[labels == 1, -3:, 3] += 0.5
    return values, labels


def encoder_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    lstm = nn.LSTM(4, HIDDEN, batch_first=True, bidirectional=True)
    return {k: v.detach().clone() for k, v in lstm.state_dict().items()}


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """run_fits sets this process's torch threads to the fits' own when it trains in process: put them back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def shared_and_fits() -> tuple[Shared, list[Fit]]:
    values, labels = data()
    heldout, _ = data(7, seed=1)
    rows = np.arange(len(labels))
    # Stratified by hand: every training set holds both classes.
    test = np.array([0, 1, 2, 20, 21])
    train = np.setdiff1d(rows, test)
    fit_list = [
        Fit("pretrained", train, seed=11, encoder="r1", test=test),
        Fit("scratch", rows, seed=12),
        Fit("scratch_same_schedule", train, seed=13, test=test),
    ]
    shared = Shared(values, labels, heldout, {"r1": encoder_state()}, CFG, None, "cpu", threads=1)
    return shared, fit_list


def same_run(a: finetuning.FoldRun, b: finetuning.FoldRun) -> bool:
    return (np.array_equal(a.proba, b.proba) and np.array_equal(a.heldout_proba, b.heldout_proba)
            and a.train_loss == b.train_loss and a.val_loss == b.val_loss)


def test_two_worker_processes_give_the_bytes_of_one_in_the_order_of_the_fits():
    shared, fit_list = shared_and_fits()
    logged: list[tuple[int, int]] = []
    one = run_fits(fit_list, shared, workers=1)
    assert fits._shared is None  # the in-process run leaves no shared data behind
    two = run_fits(fit_list, shared, workers=2, log=lambda done, total: logged.append((done, total)))
    assert logged == [(1, 3), (2, 3), (3, 3)]
    assert len(one) == len(two) == 3
    for i, (a, b) in enumerate(zip(one, two)):
        assert same_run(a, b), fit_list[i]
    # Each FoldRun is its own fit's, trained here directly with the same threads.
    torch.set_num_threads(1)
    for fit, got in zip(fit_list, one):
        x_test = None if fit.test is None else shared.values[fit.test]
        y_test = None if fit.test is None else shared.labels[fit.test]
        expected = finetuning.train_init(
            fit.init, shared.values[fit.train], shared.labels[fit.train], x_test, y_test, CFG,
            shared.encoders["r1"], fit.seed, "cpu", x_heldout=shared.heldout,
        )
        assert same_run(got, expected), fit
    # What each fit is shows in its result: predictions of its test rows only, every held-out window, 2 epochs.
    pretrained, scratch, same_schedule = one
    assert pretrained.proba.shape == same_schedule.proba.shape == (5, 2) and scratch.proba.shape == (0, 2)
    assert scratch.val_loss == [] and len(pretrained.val_loss) == len(pretrained.train_loss) == CFG.epochs
    assert all(run.heldout_proba.shape == (7, 2) for run in one)
    assert not np.array_equal(pretrained.heldout_proba, same_schedule.heldout_proba)


def test_worker_count():
    assert worker_count(2, "cpu", 10) == 2
    assert worker_count(4, "cpu", 3) == 3  # never more processes than fits
    assert worker_count(2, "cpu", 1) == 1 and worker_count(2, "cpu", 0) == 1
    assert worker_count(1, "cpu", 10) == 1
    # One accelerator trains one fit at a time, whatever finetune.workers says.
    assert worker_count(4, "cuda", 10) == 1 and worker_count(4, "cuda:0", 10) == 1 and worker_count(4, "mps", 10) == 1
