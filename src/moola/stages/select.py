"""Stage `select`: pick the pretrained encoder that fine-tuning starts from (the rules: moola.selection).

Reads each experiment's metrics, loss curve and checkpoint, and scores every checkpoint's autoencoder on one
common masked validation set: pretraining's validation split of data/prepared/unlabeled_windows.parquet, masked as
pretraining masks it for the top-level `mask` with pretrain's mask settings and `seed` (so an experiment with those
settings was validated on exactly these masks), on the CPU with pretrain.threads threads. Writes
metrics/select.json and data/selected/encoder.pt (the chosen file's exact bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moola import io, paths
from moola.device import use_threads
from moola.errors import CheckpointDamaged, CheckpointError, DataError, run_main
from moola.models import load_autoencoder, load_encoder_checkpoint
from moola.params import FEATURES, PARAMS_FILE, Params, PretrainParams, load_params
from moola.pretraining import EpochMasks, masked_validation_loss, read_unlabeled, validation_masks
from moola.selection import assess, choose, selection_report

CURVE_COLUMNS = ("epoch", "train_loss", "val_loss")


def metrics_path(exp: str) -> Path:
    return Path(paths.pretrain_metrics(exp))


def curve_path(exp: str) -> Path:
    return Path(paths.pretrain_curve(exp))


def read_curve(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: not found (run `dvc repro pretrain` first)")
    try:
        curve = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    if tuple(curve.columns) != CURVE_COLUMNS:
        found = ", ".join(map(str, curve.columns))
        raise DataError(f"{path}: columns are {found}, expected {', '.join(CURVE_COLUMNS)}")
    try:
        return curve.astype({"epoch": "int64", "train_loss": "float64", "val_loss": "float64"})
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: expected an integer epoch and numeric losses ({exc})") from None


def read_metrics(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: not found (run `dvc repro pretrain` first)")
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(metrics, dict) or "best_val_loss" not in metrics:
        raise DataError(f"{path}: field 'best_val_loss' missing (expected a pretraining metrics file)")
    return metrics


def mask_settings(strategy: str, exp_train: PretrainParams) -> tuple:
    """What decides an experiment's validation masks besides the seed and the windows (batch size only cuts them)."""
    extra = {"patch": exp_train.patch_size, "block": exp_train.block_spans}.get(strategy)
    return strategy, exp_train.mask_ratio, extra


def common_validation(p: Params, root: Path) -> tuple[np.ndarray, EpochMasks, dict]:
    """The common validation set: (validation windows, their masks, a description for metrics/select.json)."""
    _, val = read_unlabeled(root / paths.UNLABELED, p.data.window)  # the split pretraining validates on
    masks = validation_masks(p.mask, p.pretrain, len(val), p.data.window, len(FEATURES), p.seed)
    described = {
        "windows": len(val),
        "masked_steps": int(masks.mask.sum()),
        "mask": p.mask,
        "mask_ratio": p.pretrain.mask_ratio,
        "patch_size": p.pretrain.patch_size,
        "block_spans": p.pretrain.block_spans,
        "seed": p.seed,
        "batch_size": p.pretrain.batch_size,
        "threads": p.pretrain.threads,
    }
    return val, masks, described


def score_common(path: Path, checkpoint, val, masks: EpochMasks, batch_size: int) -> tuple[float | None, str | None]:
    """(the autoencoder's masked MSE on the common set, None) or (None, why it cannot be scored)."""
    try:
        model = load_autoencoder(checkpoint, path)
    except CheckpointError as exc:
        return None, str(exc)
    return masked_validation_loss(model, val, masks, batch_size), None


def select(root: Path = Path(".")) -> dict:
    """Assess every experiment of params.yaml under `root`, copy the winner, write the report; returns it."""
    p = load_params(root / PARAMS_FILE)
    expect_hidden = p.finetune.hidden_size
    val, masks, described = common_validation(p, root)
    use_threads(torch.device("cpu"), p.pretrain.threads)  # the thread count changes the bytes: the param's
    common_settings = mask_settings(p.mask, p.pretrain)
    candidates = []
    for name in p.experiments:
        metrics = read_metrics(root / metrics_path(name))
        curve = read_curve(root / curve_path(name))
        hidden, problem, common, common_problem = None, None, None, None
        path = root / paths.encoder(name)
        try:
            checkpoint = load_encoder_checkpoint(path)
            hidden = int(checkpoint.hyperparams["hidden_size"])
        except CheckpointDamaged:
            raise  # bit rot is not a property of the experiment: choosing another encoder would hide it
        except CheckpointError as exc:
            problem = str(exc)
        else:
            common, common_problem = score_common(path, checkpoint, val, masks, p.pretrain.batch_size)
        cand = assess(name, metrics, curve, hidden, problem, p.select, expect_hidden, common, common_problem)
        exp = p.experiment(name)
        cand.own_masks_are_common = mask_settings(exp.mask, exp.train) == common_settings
        candidates.append(cand)
    chosen = choose(candidates, p.select.fallback, p.select.compare_on)
    report = selection_report(candidates, chosen, paths.encoder(chosen.name), p.select.compare_on, described)
    for c in candidates:
        print(f"{c.name}: {report['candidates'][c.name]['reason']}", flush=True)
    # The exact bytes: data/selected/encoder.pt hashes the same as the chosen experiment's file.
    with io.written_together():
        io.write_bytes(root / paths.SELECTED_ENCODER, (root / paths.encoder(chosen.name)).read_bytes())
        io.write_json(root / paths.SELECT_METRICS, report)
    common = "none" if chosen.common_val_loss is None else f"{chosen.common_val_loss:.4g}"
    print(f"selected {chosen.name} by {p.select.compare_on} val loss (common {common}, own-mask best "
          f"{chosen.best_val_loss:.4g}) -> {paths.SELECTED_ENCODER}", flush=True)
    return report


def main() -> None:
    select()


if __name__ == "__main__":
    run_main(main)
