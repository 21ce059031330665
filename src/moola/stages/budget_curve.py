"""Stage budget_curve: the held-out lift against pretraining epochs (moola.pretraining_budget).

    python -m moola.stages.budget_curve

Reads the labeled windows, the held-out windows and every replicate's snapshots (data/replicates/seed<s>/
epoch_<e>.pt); writes metrics/budget_curve.json and plots/budget_curve.csv (one row per epoch and lift: the point
and its 95% interval, for `dvc plots show`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moola import io, paths, pretraining_budget
from moola.device import describe
from moola.errors import DataError, run_main
from moola.finetuning import finetune_device, finetune_numerics, fit_placement
from moola.models import load_encoder_checkpoint
from moola.numerics import attention_kernels
from moola.params import Params, load_params
from moola.windows import read_windows


def read_snapshots(p: Params) -> tuple[dict, list[int], str]:
    """(snapshot_key -> weights, the epochs, the experiment) of every replicate; the replicates must agree."""
    snapshots: dict = {}
    epochs: list[int] | None = None
    experiment = None
    for seed in p.replicates.seeds:
        folder = Path(paths.replicate_dir(seed))
        files = sorted(folder.glob("epoch_*.pt"))
        if not files:
            raise DataError(f"{folder}: no snapshots (epoch_<e>.pt) found; run `dvc repro replicate` first")
        found = []
        for path in files:
            checkpoint = load_encoder_checkpoint(path, expect_hidden=p.finetune.hidden_size)
            epoch = int(checkpoint.training.get("weights_after_epoch", -1))
            if path.name != paths.snapshot_name(epoch):
                raise DataError(f"{path}: holds the weights after epoch {epoch}, not what its name says; re-make "
                                f"it with `dvc repro -f replicate`")
            made_from = checkpoint.hyperparams.get("experiment")
            if experiment is not None and made_from != experiment:
                raise DataError(f"{path}: a run of '{made_from}', the other replicates of '{experiment}'; run "
                                f"`dvc repro replicate`")
            experiment = made_from
            snapshots[pretraining_budget.snapshot_key(f"seed{seed}", epoch)] = checkpoint.state_dict
            found.append(epoch)
        if epochs is not None and found != epochs:
            raise DataError(f"{folder}: snapshots after epochs {found}, the other replicates' after {epochs}; run "
                            f"`dvc repro replicate`")
        epochs = found
    assert epochs is not None and experiment is not None
    return snapshots, epochs, str(experiment)


def run(p: Params) -> None:
    """Train the curve's fits and write its metrics and plot (without held-out windows: a note saying so)."""
    ft = p.finetune
    labeled, test = read_windows(paths.LABELED), read_windows(paths.TEST)
    if labeled.label is None:
        raise DataError(f"{paths.LABELED}: column 'label' missing (expected the labeled windows file)")
    if len(test) == 0:
        note = f"no held-out set ({p.data.test_labels} has no rows): the budget curve needs held-out windows"
        print(note, flush=True)
        with io.written_together():
            io.write_json(paths.BUDGET_METRICS, {"heldout_windows": 0, "note": note})
            io.write_text(paths.BUDGET_PLOT, pd.DataFrame(columns=["epoch", "lift"]).to_csv(index=False))
        return
    if test.label is None:
        raise DataError(f"{paths.TEST}: column 'label' missing (expected the held-out windows file)")
    snapshots, epochs, experiment = read_snapshots(p)
    expected = p.budget_epochs(experiment)
    if epochs != expected:
        raise DataError(f"{paths.REPLICATES_DIR}: snapshots after epochs {epochs}, params.yaml asks for {expected} "
                        f"(replicates.snapshot_epochs and the last epoch); run `dvc repro replicate`")
    replicates = [f"seed{s}" for s in p.replicates.seeds]
    device = finetune_device(ft)
    numerics = finetune_numerics(ft, device)
    fits = len(epochs) * len(replicates) * len(ft.seeds) + 2 * len(ft.seeds)
    print(f"budget curve of {experiment}: epochs {epochs} x replicates {replicates} x seeds {ft.seeds} on "
          f"{len(labeled)} labeled windows, {fits} fits; held-out {len(test)}; device {describe(device)}; "
          f"{fit_placement(ft, device)}", flush=True)
    with attention_kernels(device, ft.deterministic):
        result = pretraining_budget.run_budget(labeled.values, labeled.label, test.values, ft, snapshots, epochs,
                                               replicates, ft.seeds, device, ft.workers, ft.threads,
                                               numerics=numerics)
    order = np.argsort(test.start, kind="stable")
    report, table = pretraining_budget.budget_report(test.label, result, ft.bootstrap, p.seed, ft.bootstrap_block,
                                                     order)
    report = {"experiment": experiment, "labeled_windows": len(labeled), "epochs_finetune": ft.epochs,
              "precision": numerics.ran, **report}
    for epoch, entry in report["by_epoch"].items():
        print(f"pretraining epochs {epoch:>3}: " + "; ".join(
            f"{name} accuracy {100 * entry[name]['accuracy']['point']:+.1f} "
            f"[{100 * entry[name]['accuracy']['ci_low']:+.1f}, {100 * entry[name]['accuracy']['ci_high']:+.1f}]"
            for name in ("lift", "lift_same_schedule")), flush=True)
    with io.written_together():
        io.write_text(paths.BUDGET_PLOT, table.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
        io.write_json(paths.BUDGET_METRICS, report)
    print(f"wrote {paths.BUDGET_METRICS}, {paths.BUDGET_PLOT}", flush=True)


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_main(main)
