"""Stage replicate@<i>: one more pretraining run of the selected experiment, with its own seed, keeping snapshots.

    python -m moola.stages.replicate --seed 101

The experiment is the one select chose (metrics/select.json), or the one replicates.experiment names; its settings
come from params.yaml, its epochs from replicates.epochs (0: the experiment's own). The seed decides the
initialisation, the masks and the batch order: the runs differ in nothing else, so the spread of the answer across
them is the spread of pretraining itself.
Writes data/replicates/seed<seed>/ (encoder.pt, the best validation epoch's as pretrain keeps it, and
epoch_<e>.pt, the encoder as it is after epoch e, for each of replicates.snapshot_epochs and the last epoch),
metrics/replicates/seed<seed>.json and plots/replicates/seed<seed>.csv. Resumes like pretrain after a kill.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from moola import io, paths
from moola.device import pick_device
from moola.errors import DataError, ParamsError, run_main
from moola.models import save_encoder_checkpoint
from moola.params import PARAMS_FILE, Experiment, Params, load_params
from moola.pretraining import encoder_hyperparams, log_line, pretrain
from moola.resume import resume_fingerprint, resume_path_for
from moola.stages.pretrain import input_digests, metrics, plot_csv, read_training_data


def selected_experiment(p: Params, select_report: Path = Path(paths.SELECT_METRICS)) -> str:
    """The experiment select chose, from its report."""
    try:
        chosen = json.loads(select_report.read_text(encoding="utf-8"))["selected"]
    except FileNotFoundError:
        raise DataError(f"{select_report}: not found (run `dvc repro select` first)") from None
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{select_report}: no field 'selected' (expected select's report; re-make it with "
                        f"`dvc repro select`)") from None
    if chosen not in p.experiments:
        raise DataError(f"{select_report}: selected '{chosen}' is not an experiment of {PARAMS_FILE}; re-make it "
                        f"with `dvc repro select`")
    return chosen


def replicate_experiment(p: Params, replicated: str) -> Experiment:
    """The replicated experiment as a replicate runs it (replicates.epochs)."""
    return dataclasses.replace(p.experiment(replicated), epochs=p.replicate_epochs(replicated))


def snapshot_training(history: list[tuple[int, float, float]], epoch: int) -> dict:
    """A snapshot checkpoint's `training`: the run up to `epoch` (its weights are those after `epoch`)."""
    upto = [row for row in history if row[0] <= epoch]
    best = min(upto, key=lambda row: row[2])
    return {"best_val_loss": best[2], "best_epoch": best[0], "epochs_run": epoch, "weights_after_epoch": epoch,
            "val_loss": upto[-1][2]}


def save_snapshot(path: Path, weights: dict[str, torch.Tensor], exp: Experiment, hyperparams: dict,
                  training: dict) -> None:
    lstm = nn.LSTM(len(hyperparams["features"]), exp.train.hidden_size, exp.train.num_layers, batch_first=True,
                   bidirectional=True)
    lstm.load_state_dict(weights)
    save_encoder_checkpoint(path, lstm, hyperparams, training)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="one of replicates.seeds in params.yaml")
    args = parser.parse_args(argv)
    p = load_params()
    if args.seed not in p.replicates.seeds:
        raise ParamsError(f"--seed {args.seed}: not one of replicates.seeds in {PARAMS_FILE} ({p.replicates.seeds})")
    replicated = p.replicated(selected_experiment(p))
    exp = replicate_experiment(p, replicated)
    snapshots = p.budget_epochs(replicated)
    train, val, _, _ = read_training_data(p, exp)
    device = pick_device(exp.train.device)
    log_line(f"replicate seed {args.seed} of {replicated}: {exp.epochs} epochs on {len(train):,} samples "
             f"({exp.augment}), mask {exp.mask}, snapshots after epochs {snapshots}, device {device.type}")
    name = f"replicate_seed{args.seed}"
    fingerprint = resume_fingerprint(
        exp, args.seed, input_digests(exp) | {"snapshots": ",".join(map(str, snapshots))}, device.type
    )
    resume = resume_path_for(name)
    result = pretrain(train, val, exp, args.seed, device=device, resume_path=resume, fingerprint=fingerprint,
                      snapshot_epochs=snapshots)

    out = Path(paths.replicate_dir(args.seed))
    hyperparams = encoder_hyperparams(exp, p.data.window, result.numerics) | {"replicate_seed": args.seed}
    report = metrics(result, exp) | {"replicate_seed": args.seed, "snapshot_epochs": list(result.snapshots)}
    shutil.rmtree(out, ignore_errors=True)  # a previous run's snapshots never mix with this one's
    with io.written_together():
        save_encoder_checkpoint(out / paths.REPLICATE_ENCODER, result.model, hyperparams, result.training)
        for epoch, weights in result.snapshots.items():
            save_snapshot(out / paths.snapshot_name(epoch), weights, exp, hyperparams,
                          snapshot_training(result.history, epoch))
        io.write_json(paths.replicate_metrics(args.seed), report)
        io.write_text(paths.replicate_curve(args.seed), plot_csv(result))
        io.write_json(paths.runtime(name), {"seconds": round(result.seconds, 3),
                                            "samples_per_second": round(result.samples_per_second, 1),
                                            "device": result.device, "precision": result.precision,
                                            "threads": torch.get_num_threads()})
    resume.unlink(missing_ok=True)
    log_line(f"replicate seed {args.seed}: best val loss {result.best_val_loss:.6f} at epoch {result.best_epoch} of "
             f"{result.epochs_run}; wrote {out}/ ({len(result.snapshots)} snapshots)")


if __name__ == "__main__":
    run_main(main)
