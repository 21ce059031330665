"""Stage pretrain@<experiment>: unlabeled windows (augmented training split, plain validation split) -> encoder.

    python -m moola.stages.pretrain --experiment exp1_baseline

Trains on data/augmented/<recipe>.npy, the recipe params.yaml gives the experiment. Writes
data/pretrained/<exp>_encoder.pt, metrics/pretrain/<exp>.json, plots/pretrain/<exp>.csv and (not a DVC output)
metrics/runtime/pretrain_<exp>.json. A run that is killed resumes from .moola/resume/pretrain/<exp>.pt
when started again with the same params and data, and ends with the same bytes as an uninterrupted one.
Imports neither dvc nor dvclive: a GPU box needs only torch, numpy, pandas, pyarrow, pyyaml and tqdm.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from moola import io, paths
from moola.device import pick_device
from moola.errors import DataError, run_main
from moola.models import count_parameters, save_encoder_checkpoint
from moola.params import FEATURES, Experiment, Params, load_params
from moola.pretraining import PretrainResult, encoder_hyperparams, log_line, pretrain, read_unlabeled
from moola.resume import file_digest, resume_fingerprint, resume_path_for


def load_augmented(path: Path, rows: int, window: int, recipe: str) -> np.ndarray:
    """The augmented training array, memory-mapped, checked against the prepared file it was made from."""
    if not path.is_file():
        raise DataError(f"{path}: not found (run `dvc repro augment@{recipe}` first)")
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as exc:  # numpy raises several types for a truncated or foreign file
        raise DataError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
    expected = (rows, window, len(FEATURES))
    if array.dtype == np.float32 and array.shape == expected:
        # Checked only for an array of the right shape: a stale one gets the more useful message below.
        problem = io.npy_checksum_problem(path)
        if problem:
            raise DataError(
                f"{path}: {problem}; re-create it with `dvc repro -f -s augment@{recipe}` (never pushed; if that "
                f"brings the damage back, `rm -f {io.dvc_cache_object(path)}` first)"
            )
    if array.dtype != np.float32 or array.shape != expected:
        raise DataError(
            f"{path}: holds {array.dtype} {array.shape}, expected float32 {expected} (the prepared training split "
            f"x (1 + multiplier)); it is stale: run `dvc repro augment@{recipe}`"
        )
    return array


def metrics(result: PretrainResult, experiment) -> dict:
    _, final_train, final_val = result.history[-1]
    return {
        "experiment": experiment.name,
        "mask": experiment.mask,
        "best_val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "final_val_loss": final_val,
        "final_train_loss": final_train,
        "epochs_run": result.epochs_run,
        "epochs_planned": result.epochs_planned,
        "train_samples": result.train_samples,
        "val_samples": result.val_samples,
        "batches_per_epoch": result.batches_per_epoch,
        "parameters": count_parameters(result.model),
        "encoder_parameters": count_parameters(result.model.encoder),
        # What really ran and why (moola.numerics): bf16 asked may run fp32 where the LSTM refuses it.
        "precision": result.precision,
        "precision_asked": experiment.train.precision,
        "lstm_dtype": result.numerics["lstm_dtype"],
        "precision_why": result.numerics["why"],
    }


def plot_csv(result: PretrainResult) -> str:
    rows = ["epoch,train_loss,val_loss"] + [f"{e},{t!r},{v!r}" for e, t, v in result.history]
    return "\n".join(rows) + "\n"


def read_training_data(p: Params, exp: Experiment) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The experiment's augmented training samples, the plain validation windows, and how many unlabeled windows
    and training windows there are; checked (select scores on the same validation split)."""
    augmented = Path(paths.augmented(exp.augment))
    windows, val = read_unlabeled(paths.UNLABELED, p.data.window)
    n_train = int((windows.split == "train").sum())
    train = load_augmented(augmented, n_train * (1 + exp.recipe.multiplier), p.data.window, exp.augment)
    if not np.isfinite(train).all():
        raise DataError(f"{augmented}: holds NaN or infinite values (expected finite normalised prices)")
    return train, val, len(windows), n_train


def input_digests(exp: Experiment) -> dict[str, str]:
    """The digests of the files the experiment trains on: part of its resume fingerprint (moola.resume)."""
    augmented = paths.augmented(exp.augment)
    return {paths.UNLABELED: file_digest(paths.UNLABELED), augmented: file_digest(augmented)}


def write_outputs(p: Params, exp: Experiment, result: PretrainResult, peak_mib: float | None) -> None:
    """The encoder, its metrics, its curve and the runtime facts: all or none."""
    with io.written_together():
        save_encoder_checkpoint(
            paths.encoder(exp.name), result.model, encoder_hyperparams(exp, p.data.window, result.numerics),
            result.training,
        )
        io.write_json(paths.pretrain_metrics(exp.name), metrics(result, exp))
        io.write_text(paths.pretrain_curve(exp.name), plot_csv(result))
        io.write_json(
            paths.runtime(f"pretrain_{exp.name}"),
            {
                "seconds": round(result.seconds, 3),
                "samples_per_second": round(result.samples_per_second, 1),
                "device": result.device,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "precision": result.precision,
                # What really ran: the LSTM's dtype (read from its output), autocast, loss scaling, TF32, cuDNN flags.
                "numerics": result.numerics,
                "peak_gpu_memory_mib": None if peak_mib is None else round(peak_mib, 1),
            },
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="a key of experiments in params.yaml")
    args = parser.parse_args(argv)
    p = load_params()
    exp = p.experiment(args.experiment)
    train, val, n_windows, n_train = read_training_data(p, exp)

    device = pick_device(exp.train.device)  # pretrain() sets its threads (moola.device.use_threads)
    log_line(
        f"Loaded {n_windows:,} unlabeled windows ({n_train:,} train, {len(val):,} validation); "
        f"{len(train):,} training samples after augmentation; {math.ceil(len(train) / exp.train.batch_size):,} "
        f"batches per epoch; device {device.type}"
    )
    log_line(
        f"{exp.name}: {exp.epochs} epochs, mask {exp.mask} {exp.train.mask_ratio:g}, recipe {exp.augment}, "
        f"precision {exp.train.precision}"
    )
    resume = resume_path_for(exp.name)
    result = pretrain(train, val, exp, p.seed, device=device, resume_path=resume,
                      fingerprint=resume_fingerprint(exp, p.seed, input_digests(exp), device.type))

    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    if peak is not None:
        log_line(f"{exp.name}: peak GPU memory {peak:,.0f} MiB")  # moola parallel repeats this line per job
    write_outputs(p, exp, result, peak)
    resume.unlink(missing_ok=True)
    log_line(
        f"{exp.name}: best val loss {result.best_val_loss:.6f} at epoch {result.best_epoch} of "
        f"{result.epochs_run} on {result.device} in {result.precision}; wrote {paths.encoder(exp.name)} "
        f"({Path(paths.encoder(exp.name)).stat().st_size:,} bytes)"
    )


if __name__ == "__main__":
    run_main(main)
