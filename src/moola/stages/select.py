"""Stage `select`: pick the pretrained encoder that fine-tuning starts from (the rules: moola.selection).

Reads each experiment's metrics, loss curve and checkpoint; writes metrics/select.json and
data/selected/encoder.pt (the chosen file's exact bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from moola import io, paths
from moola.errors import CheckpointDamaged, CheckpointError, DataError, run_main
from moola.models import load_encoder_checkpoint
from moola.params import PARAMS_FILE, load_params
from moola.selection import assess, choose, selection_report

SELECTED_ENCODER = Path(paths.SELECTED_ENCODER)
SELECT_METRICS = Path(paths.SELECT_METRICS)
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss")


def encoder_path(exp: str) -> Path:
    return Path(paths.encoder(exp))


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


def select(root: Path = Path(".")) -> dict:
    """Assess every experiment of params.yaml under `root`, copy the winner, write the report; returns it."""
    p = load_params(root / PARAMS_FILE)
    expect_hidden = p.finetune.hidden_size
    candidates = []
    for name in p.experiments:
        metrics = read_metrics(root / metrics_path(name))
        curve = read_curve(root / curve_path(name))
        hidden, problem = None, None
        try:
            hidden = int(load_encoder_checkpoint(root / encoder_path(name)).hyperparams["hidden_size"])
        except CheckpointDamaged:
            raise  # bit rot is not a property of the experiment: choosing another encoder would hide it
        except CheckpointError as exc:
            problem = str(exc)
        candidates.append(assess(name, metrics, curve, hidden, problem, p.select, expect_hidden))
    chosen = choose(candidates, p.select.fallback)
    report = selection_report(candidates, chosen, str(encoder_path(chosen.name)))
    for c in candidates:
        print(f"{c.name}: {report['candidates'][c.name]['reason']}", flush=True)
    # The exact bytes: data/selected/encoder.pt hashes the same as the chosen experiment's file.
    with io.written_together():
        io.write_bytes(root / SELECTED_ENCODER, (root / encoder_path(chosen.name)).read_bytes())
        io.write_json(root / SELECT_METRICS, report)
    print(f"selected {chosen.name} (best val loss {chosen.best_val_loss:.4g}) -> {SELECTED_ENCODER}", flush=True)
    return report


def main() -> None:
    select()


if __name__ == "__main__":
    run_main(main)
