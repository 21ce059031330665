"""Stage `finetune`: out-of-fold fine-tuning of SimpleLSTM, from the selected encoder and from scratch (on its own
schedule and on the pretrained one).

    python -m moola.stages.finetune                      # the selected encoder; every output of the stage
    python -m moola.stages.finetune --encoder data/pretrained/exp2_conservative_encoder.pt --ablation exp2_conservative
                                                         # that encoder only; writes metrics/ablation/<exp>.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from moola import answer, finetuning, io, paths
from moola.device import describe
from moola.errors import DataError, ParamsError, run_main
from moola.evaluation import heldout_warning, success_criteria
from moola.models import EncoderCheckpoint, load_encoder_checkpoint
from moola.numerics import attention_kernels
from moola.params import CLASS_NAMES, PARAMS_FILE, FinetuneParams, Params, load_params
from moola.windows import Windows, read_windows

# paths.TEST, the held-out windows, is read only here and by label_curve (the evaluations), and only after training:
# see finetuning.run_oof.
ALL_INITS = finetuning.NETWORK_INITS + finetuning.REFERENCE_INITS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moola.stages.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", type=Path, default=None,
                        help=f"encoder checkpoint (default {paths.SELECTED_ENCODER})")
    parser.add_argument("--ablation", metavar="EXP", default=None,
                        help="fine-tune from this experiment's encoder only and write metrics/ablation/EXP.json")
    return parser.parse_args(argv)


def confusion_csv(predictions: pd.DataFrame, init: str, seed: int, replicate: str) -> str:
    """One row per out-of-fold prediction of the first seed and, for the pretrained row, the first replicate's
    encoder (so the counts sum to the number of windows)."""
    rows = predictions[(predictions["init"] == init) & (predictions["seed"] == seed)
                       & predictions["replicate"].isin(["", replicate])]
    names = np.array(CLASS_NAMES)
    frame = pd.DataFrame({"actual": names[rows["label"].to_numpy()], "predicted": names[rows["prediction"].to_numpy()]})
    return frame.to_csv(index=False, lineterminator="\n")


def heldout_extras(p: Params, starts: np.ndarray, labels: np.ndarray, predicted: dict[str, np.ndarray],
                   replicates: list[str]) -> dict:
    """Walk-forward (the held-out numbers per consecutive period) and, with data.heldout: anywhere, the warning."""
    ft = p.finetune
    extras: dict = {"by_period": finetuning.heldout_by_period(
        labels, predicted, starts, ft.heldout_periods, ft.bootstrap, p.seed, ft.bootstrap_block, ft.seeds,
        replicates, ft.folds)}
    warning = heldout_warning(p.data.heldout)
    if warning:
        extras["warning"] = warning
        print(f"warning: {warning}", flush=True)
    return extras


def criteria_scored(windows: int) -> str:
    """What `criteria` are measured on, said next to them (the README's held-out numbers are another set)."""
    return f"out of fold: the mean over seeds of each seed's metrics on the {windows} labeled windows"


def heldout_confusion_csv(labels: np.ndarray, proba: dict[str, np.ndarray]) -> str:
    """Per model, actual and predicted class and how many held-out windows fall in that cell (every cell, zeros
    included): the held-out confusion matrices, small enough to plot (`dvc plots show`)."""
    labels = np.asarray(labels, dtype=np.int64)
    rows = []
    for model, p in proba.items():
        predicted = np.asarray(p).argmax(axis=1)
        for actual, actual_name in enumerate(CLASS_NAMES):
            for guess, guess_name in enumerate(CLASS_NAMES):
                rows.append({"model": model, "actual": actual_name, "predicted": guess_name,
                             "windows": int(np.sum((labels == actual) & (predicted == guess)))})
    frame = pd.DataFrame(rows, columns=["model", "actual", "predicted", "windows"])
    return frame.to_csv(index=False, lineterminator="\n")


def replicate_encoders(p: Params, replicated: str) -> dict[str, dict]:
    """replicate name -> its encoder's weights, one per replicates.seeds, each checked to be a run of `replicated`."""
    encoders = {}
    for seed in p.replicates.seeds:
        path = Path(paths.replicate_dir(seed)) / paths.REPLICATE_ENCODER
        checkpoint = load_encoder_checkpoint(path, expect_hidden=p.finetune.hidden_size)
        made_from = checkpoint.hyperparams.get("experiment")
        if made_from != replicated:
            raise DataError(f"{path}: a replicate of '{made_from}', but the replicates should run '{replicated}'; "
                            f"it is stale: run `dvc repro replicate`")
        encoders[f"seed{seed}"] = checkpoint.state_dict
    return encoders


def check_ablation(p: Params, ablation: str | None) -> None:
    """--ablation names an experiment of params.yaml."""
    if ablation is not None and ablation not in p.experiments:
        raise ParamsError(f"--ablation: '{ablation}' is not an experiment of {PARAMS_FILE} "
                          f"(expected one of: {', '.join(p.experiments)})")


def read_labeled(p: Params) -> tuple[Windows, dict[str, int], finetuning.Splitter, dict]:
    """(the labeled windows, their class counts, finetune.cv's fold maker, its cv_report), checked before any
    training: both classes, enough windows per class for the folds, and (purged) both classes in every fold."""
    ft = p.finetune
    labeled = read_windows(paths.LABELED)
    if labeled.label is None:
        raise DataError(f"{paths.LABELED}: column 'label' missing (expected the labeled windows file)")
    counts = finetuning.class_counts(labeled.label)
    print(f"{len(labeled)} labeled windows ({', '.join(f'{n} {name}' for name, n in counts.items())})", flush=True)
    finetuning.check_folds(labeled.label, ft.folds, paths.LABELED)
    splitter = finetuning.cv_splitter(ft.cv, labeled.bar, labeled.values.shape[1], p.data.embargo, paths.LABELED)
    cv = finetuning.cv_report(ft.cv, splitter(labeled.label, ft.folds, ft.seeds[0]), p.data.embargo)
    print(f"out-of-fold folds: {cv['description']}", flush=True)
    return labeled, counts, splitter, cv


def encoders_to_finetune(p: Params, encoder: Path, ablation: str | None) -> tuple[EncoderCheckpoint, dict[str, dict]]:
    """(`encoder`'s checkpoint, name -> the weights the pretrained row starts from)."""
    checkpoint = load_encoder_checkpoint(encoder, expect_hidden=p.finetune.hidden_size)
    # The answer fine-tunes from the replicates (independent runs of the selected experiment); the ablation
    # compares the experiments' own encoders.
    if ablation:
        return checkpoint, {ablation: checkpoint.state_dict}
    return checkpoint, replicate_encoders(p, p.replicated(str(checkpoint.hyperparams.get("experiment", ""))))


def read_heldout(ft: FinetuneParams) -> Windows:
    """The held-out windows, checked before any training (labeled, no fewer than finetune.heldout_periods)."""
    test = read_windows(paths.TEST)
    if len(test) and test.label is None:
        raise DataError(f"{paths.TEST}: column 'label' missing (expected the held-out windows file)")
    if len(test) and ft.heldout_periods > len(test):
        raise ParamsError(f"{PARAMS_FILE}: finetune.heldout_periods ({ft.heldout_periods}) exceeds the {len(test)} "
                          f"held-out windows of {paths.TEST}; expected at most {len(test)}")
    return test


def write_ablation(ablation: str, encoder: Path, checkpoint: EncoderCheckpoint, pretrained: dict, windows: int,
                   common: dict) -> None:
    """metrics/ablation/<exp>.json: the pretrained row of one experiment's encoder, with its pretraining loss."""
    io.write_json(paths.ablation_metrics(ablation), {
        "experiment": ablation,
        "encoder": str(encoder),
        "pretrain": {key: checkpoint.training[key] for key in ("best_val_loss", "best_epoch", "epochs_run")},
        "pretrained": pretrained,
        "criteria": success_criteria(pretrained),
        "criteria_scored": criteria_scored(windows),
        **common,
    })
    print(f"wrote {paths.ablation_metrics(ablation)}", flush=True)


def heldout_section(p: Params, test: Windows | None, result: finetuning.OofResult, replicates: list[str]) -> dict:
    """finetune.json's `heldout`: every model's held-out numbers and the lifts (logged), or why there are none."""
    ft = p.finetune
    if not result.heldout:
        heldout = {"windows": 0, "note": f"no held-out set ({p.data.test_labels} has no rows)"}
        print(heldout["note"], flush=True)
        return heldout
    assert test is not None
    order = np.argsort(test.start, kind="stable")
    # (replicates, seeds, n) for pretrained, (seeds, n) for the others: the levels the bootstrap resamples.
    predicted = {init: proba.argmax(axis=-1)[..., order] for init, proba in result.heldout.items()}
    heldout = finetuning.heldout_report(
        test.label[order], predicted, ft.bootstrap, p.seed, ft.bootstrap_block, ft.seeds, replicates, ft.folds
    )
    heldout.update(heldout_extras(p, test.start[order], test.label[order], predicted, replicates))
    for name in finetuning.LIFTS:
        hl = heldout[name]["accuracy"]
        print(f"held-out ({len(test)} windows) {name}: accuracy {hl['point']:+.3f} [{hl['ci_low']:+.3f}, "
              f"{hl['ci_high']:+.3f}]; {heldout[name]['verdict']}", flush=True)
    return heldout


def finetune_report(p: Params, labeled: Windows, test: Windows | None, result: finetuning.OofResult,
                    summary: dict, selected: str, replicates: list[str], common: dict) -> dict:
    """finetune.json: the held-out numbers, the out-of-fold summary and lifts (logged), the success criteria."""
    ft = p.finetune
    # Blocks of consecutive windows: the windows in time order (a user's files need not be sorted).
    oof_order = labeled.window_id[np.argsort(labeled.start, kind="stable")]
    lifts = finetuning.lift_report(result.predictions, ft.bootstrap, p.seed, ft.bootstrap_block, oof_order)
    report = {
        "heldout": heldout_section(p, test, result, replicates),
        **summary,
        **lifts,
        "criteria": success_criteria(summary["pretrained"]),
        "criteria_scored": criteria_scored(len(labeled)),
        "selected_encoder": selected,
        # The experiment the pretrained row's encoders are runs of (replicates.experiment: select's choice or pinned)
        "replicates_of": p.replicated(selected),
        "replicates": replicates,
        **common,
    }
    for name, lift in lifts.items():
        print(f"out-of-fold {name}: accuracy {lift['accuracy']['point']:+.3f} [{lift['accuracy']['ci_low']:+.3f}, "
              f"{lift['accuracy']['ci_high']:+.3f}]; {lift['verdict']}", flush=True)
    return report


def write_outputs(result: finetuning.OofResult, report: dict, test: Windows | None, first_seed: int,
                  first_replicate: str, checkpoint: EncoderCheckpoint) -> None:
    """Every output of the stage (but the ablation's), all of them or none."""
    with io.written_together():  # all of them or none: a failed run leaves no plots without their metrics
        io.write_parquet(paths.OOF_PREDICTIONS, result.predictions)
        for init in finetuning.NETWORK_INITS:
            io.write_text(paths.confusion(init), confusion_csv(result.predictions, init, first_seed, first_replicate))
        # Each model's ensemble (every fold model of every seed) on the held-out windows, as counts per cell.
        io.write_text(paths.HELDOUT_CONFUSION, heldout_confusion_csv(
            test.label if result.heldout else [],
            {init: proba.reshape(-1, *proba.shape[-2:]).mean(axis=0) for init, proba in result.heldout.items()}))
        io.write_text(paths.FINETUNE_CURVES,
                      result.curves.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
        io.write_text(paths.FINETUNE_LIFT_PER_SEED, finetuning.pair_lift_table(report["heldout"]).to_csv(
            index=False, float_format="%.6f", lineterminator="\n"))
        io.write_json(paths.FINETUNE_METRICS, report)
        # The encoder's own record of its validation loss: no dep on select's report.
        # Not sorted: the lift first, as `dvc exp show` and `dvc metrics diff` list the keys in file order.
        headline = answer.headline(report, report["selected_encoder"], checkpoint.training["best_val_loss"])
        io.write_json(paths.ANSWER, headline, sort_keys=False)
    print(f"wrote {paths.ANSWER}, {paths.FINETUNE_METRICS}, {paths.OOF_PREDICTIONS}", flush=True)


def run(p: Params, encoder: Path, ablation: str | None) -> None:
    """Fine-tune out of fold and write the stage's outputs; with `ablation`, from that experiment's `encoder` only
    and only its metrics (no held-out numbers)."""
    ft = p.finetune
    check_ablation(p, ablation)
    device = finetuning.finetune_device(ft)
    labeled, counts, splitter, cv = read_labeled(p)
    checkpoint, encoders = encoders_to_finetune(p, encoder, ablation)
    numerics = finetuning.finetune_numerics(ft, device)
    inits = ("pretrained",) if ablation else ALL_INITS
    # The ablation compares encoders, which is a choice: it gets no held-out numbers, so no choice can use them.
    test = None if ablation else read_heldout(ft)
    print(
        f"encoders {', '.join(encoders)} ({checkpoint.hyperparams.get('experiment', 'unnamed')}); {ft.folds} folds "
        f"x seeds {ft.seeds}; {ft.epochs} epochs ({ft.freeze_epochs} frozen); inits {', '.join(inits)}; "
        f"device {describe(device)}; {finetuning.fit_placement(ft, device)}",
        flush=True,
    )
    with attention_kernels(device, ft.deterministic):
        result = finetuning.run_oof(
            labeled.values, labeled.label, labeled.window_id, ft, ft.seeds, ft.folds, inits,
            encoder_states=encoders, device=device,
            heldout_values=test.values if test is not None and len(test) else None, splitter=splitter,
            workers=ft.workers, threads=ft.threads, numerics=numerics,
        )
    summary = finetuning.summary_report(result.predictions, inits)
    common = {"windows": len(labeled), "class_counts": counts, "folds": ft.folds, "seeds": list(ft.seeds),
              "epochs": ft.epochs, "freeze_epochs": ft.freeze_epochs, "cv": cv,
              "precision": numerics.ran, "precision_why": numerics.why}
    if ablation is not None:
        write_ablation(ablation, encoder, checkpoint, summary["pretrained"], len(labeled), common)
        return
    selected = str(checkpoint.hyperparams.get("experiment", encoder))
    report = finetune_report(p, labeled, test, result, summary, selected, list(encoders), common)
    write_outputs(result, report, test, ft.seeds[0], next(iter(encoders)), checkpoint)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    p = load_params()
    if args.encoder is not None:
        encoder = args.encoder
    elif args.ablation is not None:
        encoder = Path(paths.encoder(args.ablation))
    else:
        encoder = Path(paths.SELECTED_ENCODER)
    run(p, encoder, args.ablation)


if __name__ == "__main__":
    run_main(main)
