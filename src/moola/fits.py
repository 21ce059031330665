"""Many small fine-tunings, two at a time on a CPU: out of fold, the label curve and the budget curve are each
hundreds of SimpleLSTM fits on 20-500 windows at batch 16, too small to keep two cores busy in one process.

A `Fit` names what one training needs besides the shared data (which rows, which init, which seed, which encoder);
`run_fits` trains a list of them and returns their FoldRuns in the same order. On the CPU with finetune.workers > 1
the fits run in that many worker processes of finetune.threads threads each (spawned: a forked torch can hang on
its thread pools). Each fit seeds itself (train_fold), so its bytes depend on params and code and on the threads per
fit, never on the worker count or the order in which workers pick fits (tests/test_fits.py).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # finetuning imports this module (run_oof)
    from moola.finetuning import FoldRun
    from moola.numerics import Numerics
    from moola.params import FinetuneParams


@dataclass(frozen=True)
class Fit:
    init: str  # one of finetuning.NETWORK_INITS
    train: np.ndarray  # rows of the shared values it trains on
    seed: int  # train_fold's seed: head initialisation, dropout, batch order
    encoder: str | None = None  # key of the shared encoder states (for the inits that start from an encoder)
    test: np.ndarray | None = None  # rows scored after every epoch and predicted at the end (out of fold)


@dataclass
class Shared:
    """What every fit of one run_fits call reads: sent to each worker once."""

    values: np.ndarray  # (n, window, features)
    labels: np.ndarray  # (n,)
    heldout: np.ndarray | None  # held-out windows each trained model predicts, or None
    encoders: Mapping[str, Mapping[str, torch.Tensor]]
    ft: FinetuneParams  # finetune: as loaded (it and numerics are plain dataclasses: they pickle to the workers)
    numerics: Numerics | None  # finetune.precision as decided on the device (finetuning.train_fold)
    device: str
    threads: int


_shared: Shared | None = None


def _set_shared(shared: Shared) -> None:
    global _shared
    _shared = shared
    if torch.device(shared.device).type == "cpu":
        torch.set_num_threads(shared.threads)


def _train(fit: Fit) -> FoldRun:
    from moola.finetuning import train_init

    s = _shared
    assert s is not None, "run_fits sets the shared data first"
    test = fit.test
    return train_init(
        fit.init, s.values[fit.train], s.labels[fit.train],
        None if test is None else s.values[test], None if test is None else s.labels[test],
        s.ft, None if fit.encoder is None else s.encoders[fit.encoder], fit.seed, s.device, x_heldout=s.heldout,
        numerics=s.numerics,
    )


def worker_count(workers: int, device: str, fits: int) -> int:
    """Processes to use: several only on the CPU (one accelerator runs one fit at a time) and never more than fits."""
    return max(1, min(workers, fits)) if torch.device(device).type == "cpu" else 1


def run_fits(fits: Sequence[Fit], shared: Shared, workers: int = 1,
             log: Callable[[int, int], None] | None = None) -> list[FoldRun]:
    """Train every fit; their FoldRuns in the order of `fits`. `log(done, total)` after each one finishes."""
    n = worker_count(workers, shared.device, len(fits))
    out: list[FoldRun] = []
    if n == 1:
        previous = _shared
        _set_shared(shared)
        try:
            for fit in fits:
                out.append(_train(fit))
                if log is not None:
                    log(len(out), len(fits))
        finally:
            globals()["_shared"] = previous
        return out
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n, mp_context=context, initializer=_set_shared, initargs=(shared,)) as pool:
        for run in pool.map(_train, fits, chunksize=1):  # results in submission order
            out.append(run)
            if log is not None:
                log(len(out), len(fits))
    return out
