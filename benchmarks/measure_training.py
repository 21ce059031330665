"""Training: the bare LSTM, the pretraining model and the real loop (items 1 and 2), one fine-tuning fold, the
tries that could move the ceiling, and bare-LSTM workers sharing the device."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch

from benchmarks.harness import Settings, timed
from benchmarks.throughput import (
    SPEC_EXPERIMENT,
    TARGET_RATIO,
    Stepper,
    WorkerRun,
    bare_lstm_stepper,
    median,
    share_device,
    start_workers,
    sync,
)
from moola.errors import MoolaError
from moola.masking import make_mask
from moola.models import BiLSTMMaskedAutoencoder, masked_mse
from moola.params import FEATURES, Params


def model_stepper(batch: int, window: int, exp, device: torch.device, precision: str,
                  decode_masked_only: bool = False) -> Stepper:
    """The pretraining model itself (mask token, MLP decoder, masked loss) on random tensors: no data, no loop.

    decode_masked_only: run the decoder on the masked steps alone, the only ones the loss reads (a try: the same
    loss in exact arithmetic, not the same fp32 bytes).
    """
    cfg = exp.train
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, window, len(FEATURES), generator=generator).to(device)
    mask = make_mask(exp.mask, batch, window, ratio=cfg.mask_ratio, generator=generator,
                     patch_size=cfg.patch_size, block_spans=cfg.block_spans).to(device)
    model = BiLSTMMaskedAutoencoder(len(FEATURES), cfg.hidden_size, cfg.num_layers, cfg.decoder_hidden)

    def loss(m: BiLSTMMaskedAutoencoder) -> torch.Tensor:
        if not decode_masked_only:
            return masked_mse(m(x, mask), x, mask)
        encoded, _ = m.encoder(torch.where(mask.unsqueeze(-1), m.mask_token.to(x.dtype), x))
        return (m.decoder(encoded[mask]).float() - x[mask]).pow(2).mean()

    return Stepper(model, loss, batch, device, precision, cfg.learning_rate)


# --- the real loop ------------------------------------------------------------------------------------------


def loop_experiment(p: Params, s: Settings, epochs: int = 1):
    """exp1_baseline as pretraining runs it, at the bench's batch size, device, precision and threads."""
    exp = p.experiment(SPEC_EXPERIMENT)
    train = dataclasses.replace(exp.train, batch_size=s.batch_size, device=s.device.type, precision=s.precision,
                                threads=s.threads, early_stopping_patience=0)
    return dataclasses.replace(exp, train=train, epochs=epochs)


def loop_epoch(train: np.ndarray, val: np.ndarray, exp, seed: int, device: torch.device) -> dict:
    """One epoch of the real pretraining loop (moola.pretraining.pretrain): training rate, and the rest of it."""
    from moola.pretraining import pretrain

    lines: list[str] = []
    sync(device)
    began = time.perf_counter()
    result = pretrain(train, val, exp, seed, device=device, log=lines.append)
    sync(device)
    wall = time.perf_counter() - began
    return {
        "samples_per_second": result.samples_per_second,
        "train_seconds": result.seconds,
        # Validation over the whole validation split, plus the call's setup (model, masks, tensors).
        "other_seconds": wall - result.seconds,
        "precision": result.precision,
        "lstm_dtype": result.numerics["lstm_dtype"],  # what the LSTM really computed in (moola.numerics)
        "val_loss": result.history[-1][2],
    }


def bench_training(p: Params, s: Settings, train: np.ndarray, val: np.ndarray) -> dict:
    """Items 1 and 2: the bare LSTM, the model alone, and the real loop, taking turns within each repeat."""
    window = train.shape[1]
    exp = loop_experiment(p, s)
    needed = s.steps * s.batch_size
    if len(train) < needed:
        raise MoolaError(f"--steps {s.steps} x --batch-size {s.batch_size} needs {needed} training samples, "
                         f"the augmented data has {len(train)}")
    loop_train = train[:needed]
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    # Warm-up: the loop first, so that the ceiling runs in the precision the loop really uses.
    warm = loop_epoch(train[: max(1, s.warmup) * s.batch_size], val, exp, p.seed, s.device)
    precision = warm["precision"]
    bare = bare_lstm_stepper(s.batch_size, window, exp.train.hidden_size, s.device, precision,
                             exp.train.learning_rate, s.threads)
    model = model_stepper(s.batch_size, window, exp, s.device, precision)
    for stepper in (bare, model):
        stepper.run(s.warmup)
    rates: dict[str, list[float]] = {"bare": [], "model": [], "loop": []}
    other: list[float] = []
    for _ in range(s.repeats):
        rates["bare"].append(needed / bare.run(s.steps))
        rates["model"].append(needed / model.run(s.steps))
        run = loop_epoch(loop_train, val, exp, p.seed, s.device)
        rates["loop"].append(run["samples_per_second"])
        other.append(run["other_seconds"])
    peak = torch.cuda.max_memory_allocated(s.device) / 2**20 if s.device.type == "cuda" else None
    paired = [loop / bare for loop, bare in zip(rates["loop"], rates["bare"])]
    paired_model = [loop / model for loop, model in zip(rates["loop"], rates["model"])]
    return {
        "precision": precision,
        "lstm_dtype": warm["lstm_dtype"],
        "bare_lstm": {"samples_per_second": median(rates["bare"]), "runs": rates["bare"]},
        "model": {"samples_per_second": median(rates["model"]), "runs": rates["model"]},
        "loop": {
            "samples_per_second": median(rates["loop"]),
            "runs": rates["loop"],
            "validation_and_setup_seconds": median(other),
            "validation_windows": len(val),
        },
        "ratio_loop_to_bare": median(paired),
        "ratio_runs": paired,
        "ratio_loop_to_model": median(paired_model),
        "target_ratio": TARGET_RATIO,
        "target_met": median(paired) >= TARGET_RATIO,
        "peak_gpu_memory_mib": peak,  # of the three in this process; None off CUDA
    }


def compare_precision(p: Params, s: Settings, train: np.ndarray, val: np.ndarray, epochs: int) -> dict:
    """fp32 against bf16 (twice, for determinism) in the real loop: final validation losses."""
    from moola.pretraining import pretrain

    histories = {}
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16_again", "bf16")):
        exp = loop_experiment(p, dataclasses.replace(s, precision=precision), epochs=epochs)
        result = pretrain(train, val, exp, p.seed, device=s.device, log=lambda _: None)
        histories[name] = {"precision": result.precision, "history": result.history,
                           "samples_per_second": result.samples_per_second}
    final = {k: v["history"][-1][2] for k, v in histories.items()}
    return {
        "epochs": epochs,
        "train_samples": len(train),
        "final_val_loss": final,
        "relative_difference": abs(final["bf16"] - final["fp32"]) / final["fp32"],
        "bf16_deterministic": histories["bf16"]["history"] == histories["bf16_again"]["history"],
        "histories": histories,
    }


# --- fine-tuning: seconds per epoch of one fold --------------------------------------------------------------


def bench_finetune(p: Params, s: Settings, labeled) -> dict:
    from moola.device import use_threads
    from moola.finetuning import fold_splits, train_fold

    epochs = 1 if s.quick else 3
    cfg = dataclasses.replace(p.finetune, epochs=epochs, freeze_epochs=0)
    train, test = fold_splits(labeled.label, p.finetune.folds, p.seed)[0]
    use_threads(s.device, p.finetune.threads)

    def one_fold():
        train_fold(labeled.values[train], labeled.label[train], labeled.values[test], labeled.label[test],
                   cfg, None, p.seed, s.device)

    runs, _ = timed(one_fold, s.data_repeats)
    return {"seconds_per_epoch": median(runs) / epochs, "fold_windows": len(train), "epochs_timed": epochs,
            "note": "scratch init, every parameter trained (frozen epochs cost less): an upper bound"}


# --- tries: what could move the ceiling ---------------------------------------------------------------------


def bench_tries(p: Params, s: Settings, window: int, bf16: tuple[bool, str]) -> list[dict]:
    """Variants of the bare LSTM step, taking turns with the baseline within each repeat."""
    exp = loop_experiment(p, s)
    hidden, lr, b = exp.train.hidden_size, exp.train.learning_rate, s.batch_size

    def make(batch: int = b, precision: str = "fp32", threads: int = s.threads, **kw) -> tuple[int, Stepper]:
        return batch, bare_lstm_stepper(batch, window, hidden, s.device, precision, lr, threads, **kw)

    steppers = {"baseline fp32": make()}
    if bf16[0]:
        steppers["bf16 autocast"] = make(precision="bf16")
    if s.device.type == "cpu":
        steppers["oneDNN off (ATen LSTM kernel)"] = make(onednn=False)
        for n in sorted({1, os.cpu_count() or 1} - {s.threads}):
            steppers[f"threads {n}"] = make(threads=n)
    steppers["time-major input (batch_first=False)"] = make(time_major=True)
    for factor in (0.25, 0.5, 2):
        steppers[f"batch {max(1, int(b * factor))}"] = make(batch=max(1, int(b * factor)))
    # Not the LSTM: how much of the model's cost beyond the ceiling is its decoder on steps the loss ignores.
    steppers["model alone"] = (b, model_stepper(b, window, exp, s.device, "fp32"))
    steppers["model, decoder on masked steps only"] = (b, model_stepper(b, window, exp, s.device, "fp32", True))
    for _, stepper in steppers.values():
        stepper.run(s.warmup)
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    # Half the main figures' work per timing (a dozen variants): one batch of the spec's size.
    samples = max(1, s.steps // 2) * b
    for _ in range(s.repeats):
        for name, (batch, stepper) in steppers.items():
            steps = max(1, round(samples / batch))  # the same samples per timing whatever the batch
            rates[name].append(steps * batch / stepper.run(steps))
    base = median(rates["baseline fp32"])
    tries = [{"name": name, "samples_per_second": median(r), "runs": r, "vs_baseline": median(r) / base}
             for name, r in rates.items()]
    if s.device.type == "cpu":
        tries += try_omp_passive(worker_run(s, window, hidden, lr), quick=s.quick)
    if not bf16[0]:
        tries.append({"name": "bf16 autocast", "samples_per_second": None, "runs": [], "vs_baseline": None,
                      "note": f"not supported here: {bf16[1]}"})
    return tries


# --- bare-LSTM workers in processes of their own ------------------------------------------------------------


def worker_run(s: Settings, window: int, hidden: int, lr: float) -> WorkerRun:
    """What each worker process times: the bench's bare LSTM at its settings."""
    return WorkerRun(device=s.device.type, batch_size=s.batch_size, steps=s.steps, repeats=s.repeats,
                     warmup=s.warmup, precision=s.precision, threads=s.threads, window=window, hidden=hidden,
                     learning_rate=lr)


def bench_share(p: Params, s: Settings, single: float) -> dict:
    """`s.share` bare-LSTM workers at once on the bench's device: the aggregate against one alone (`single`)."""
    lr = p.experiment(SPEC_EXPERIMENT).train.learning_rate
    return share_device(worker_run(s, p.data.window, p.pretrain.hidden_size, lr), s.share, single)


def try_omp_passive(run: WorkerRun, quick: bool) -> list[dict]:
    """OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning between parallel regions) against the
    default, in fresh processes taking turns (it can only be set before torch starts): one process alone, and
    two at once (a CPU shared with another training run or a test suite)."""
    run = dataclasses.replace(run, steps=max(1, run.steps // 2), repeats=3)
    policies = {"default": {"OMP_WAIT_POLICY": None}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
    alone: dict[str, list[float]] = {"default": [], "passive": []}
    shared: dict[str, list[float]] = {"default": [], "passive": []}
    for _ in range(1 if quick else 2):
        for name, env in policies.items():
            alone[name] += start_workers(run, 1, env)
            shared[name].append(sum(start_workers(run, 2, env)))
    return [
        {"name": "OMP_WAIT_POLICY=PASSIVE, one process", "samples_per_second": median(alone["passive"]),
         "runs": alone["passive"], "vs_baseline": median(alone["passive"]) / median(alone["default"]),
         "baseline_runs": alone["default"]},
        {"name": "OMP_WAIT_POLICY=PASSIVE, two processes at once (sum)",
         "samples_per_second": median(shared["passive"]), "runs": shared["passive"],
         "vs_baseline": median(shared["passive"]) / median(shared["default"]), "baseline_runs": shared["default"]},
    ]
