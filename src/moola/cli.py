"""The `moola` command: the laptop tour, the results table, and the parallel runner.

    moola tour       run the pipeline at a small scale through `dvc exp run`, then print the results
    moola study      the same with every unlabeled window and pretraining cut to ~45 min on 2 CPU cores
    moola report     print the results table from the metrics files in the workspace
    moola parallel   the five pretraining experiments concurrently, then the rest (see moola.parallel)
    moola doctor     a GPU box's first command: versions, the LSTM's real dtype, TF32, bare LSTM vs the loop
    moola figures    every plot of `dvc plots show` as PNG or SVG files, offline (see moola.figures)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moola import paths
from moola.errors import run_main
from moola.params import CLASS_NAMES, load_params

# The tour: 4% of the windows and 10% of the pretraining epochs (8 for exp1), smaller batches so that each epoch
# still takes many optimiser steps, one fine-tuning seed instead of three, and the curve's three smaller sizes.
# Fine-tuning keeps its 60 epochs (scale.epochs scales pretraining only): cut short, the classifier never trains.
# It runs the stages up to finetune and label_curve; the ablation (five more fine-tunings, ~4 min here) is left
# to `dvc exp run`.
TOUR_SET = {
    "scale.windows": "0.04",
    "scale.epochs": "0.1",
    "pretrain.batch_size": "128",
    "finetune.seeds": "[1337]",
    "curve.sizes": "[20,45,89]",
    "curve.seeds": "[1337]",
}
# The CPU study: every unlabeled window of the spec (11,873) and pretraining cut to fit about 45 minutes on a
# 2-core CPU (see README "Results"); fine-tuning and the curve at the spec's settings.
STUDY_SET = {
    "scale.windows": "1.0",
    "scale.epochs": "0.04",
    "pretrain.batch_size": "256",
}
TARGETS = ["finetune", "label_curve"]
RUNS = {"tour": TOUR_SET, "study": STUDY_SET}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def _ci(m: dict | None, points: bool = False) -> str:
    """A metric with its 95% interval: '61.2% [59.1, 63.3]' (percent) or '0.212 [0.17, 0.25]'."""
    if not m:
        return "-"
    if points:
        return f"{100 * m['point']:5.1f}% [{100 * m['ci_low']:4.1f}, {100 * m['ci_high']:4.1f}]"
    return f"{m['point']:6.3f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]"


def heldout_lines(h: dict | None) -> list[str]:
    """The held-out table: every model's ensemble prediction on windows no model trained on, with intervals."""
    if not h:
        return ["Held-out test set: (not run)"]
    if not h.get("windows"):
        return [f"Held-out test set: none - {h.get('note', 'no held-out set')}; only out-of-fold numbers below"]
    counts = ", ".join(f"{n} {name}" for name, n in h["class_counts"].items())
    lines = [
        f"Held-out test set ({h['windows']} windows: {counts}; 95% bootstrap intervals; prediction = {h['prediction']})",
        f"  {'model':<12} {'accuracy':>22} {'balanced':>22} {'recall c0':>22} {'recall c1':>22} {'MCC':>22}",
    ]
    for init in ("pretrained", "scratch", "logreg", "majority"):
        m = h.get(init)
        if not m:
            continue
        cells = [_ci(m.get(k), True) for k in ("accuracy", "balanced_accuracy", *(f"recall_{c}" for c in CLASS_NAMES))]
        lines.append(f"  {init:<12} " + " ".join(f"{c:>22}" for c in cells) + f" {_ci(m.get('mcc')):>22}")
    lift = h.get("lift")
    if lift:
        parts = [f"accuracy {100 * lift['accuracy']['point']:+.1f} points [{100 * lift['accuracy']['ci_low']:+.1f}, "
                 f"{100 * lift['accuracy']['ci_high']:+.1f}]",
                 f"balanced {100 * lift['balanced_accuracy']['point']:+.1f} [{100 * lift['balanced_accuracy']['ci_low']:+.1f}, "
                 f"{100 * lift['balanced_accuracy']['ci_high']:+.1f}]",
                 f"MCC {lift['mcc']['point']:+.3f} [{lift['mcc']['ci_low']:+.3f}, {lift['mcc']['ci_high']:+.3f}]"]
        lines.append("  lift (pretrained - scratch): " + "; ".join(parts))
        lines.append(f"  verdict: {lift['verdict']}")
    return lines


def report(root: Path = Path("."), ablation: bool = True) -> str:
    """The results as a plain-text table (pretraining, selection, held-out, fine-tuning, curve, ablation).

    ablation=False leaves the ablation out: after a run that did not include it (the tour, the study), metrics
    files in the workspace would be another run's."""
    p = load_params(root / "params.yaml")
    lines = ["Pretraining (validation loss = masked-step MSE on held-out windows)"]
    lines.append(f"  {'experiment':<20} {'mask':<7} {'epochs':>6} {'best val':>10} {'final val':>10}")
    for exp in p.experiments:
        m = _load(root / paths.pretrain_metrics(exp))
        if m is None:
            lines.append(f"  {exp:<20} (not run)")
            continue
        lines.append(
            f"  {exp:<20} {m['mask']:<7} {m['epochs_run']:>6} {m['best_val_loss']:>10.5f} {m['final_val_loss']:>10.5f}"
        )
    chosen = _load(root / paths.SELECT_METRICS)
    if chosen:
        lines.append(f"Selected encoder: {chosen.get('selected')}")
    ft = _load(root / paths.FINETUNE_METRICS)
    lines += [""] + heldout_lines((ft or {}).get("heldout"))
    header = f"  {'model':<26} {'accuracy':>9} {'balanced':>9} {'recall c0':>10} {'recall c1':>10} {'MCC':>6}"
    lines += ["", "Fine-tuning, out of fold (mean over seeds; c0 consolidation, c1 retracement)", header]

    def row(name: str, m: dict | None) -> str:
        if not m:
            return f"  {name:<26} (not run)"
        get = lambda k: (m.get(k) or {}).get("mean") if isinstance(m.get(k), dict) else m.get(k)  # noqa: E731
        mcc = get("mcc")
        return (
            f"  {name:<26} {_pct(get('accuracy')):>9} {_pct(get('balanced_accuracy')):>9} "
            f"{_pct(get('recall_' + CLASS_NAMES[0])):>10} {_pct(get('recall_' + CLASS_NAMES[1])):>10} "
            f"{'  -' if mcc is None else f'{mcc:6.3f}'}"
        )

    if ft:
        for init in ("pretrained", "scratch", "logreg", "majority"):
            lines.append(row(init, ft.get(init)))
        lift = ft.get("lift", {}).get("accuracy")
        if lift:
            lines.append(
                f"  lift (pretrained - scratch accuracy): {100 * lift['point']:+.1f} points, "
                f"95% CI [{100 * lift['ci_low']:+.1f}, {100 * lift['ci_high']:+.1f}]"
                + (" - inside the noise" if lift.get("inside_noise") else "")
            )
    else:
        lines.append("  (not run)")
    lines += [""] + curve_lines(_load(root / paths.CURVE_METRICS))
    found = [(exp, _load(root / paths.ablation_metrics(exp))) for exp in p.experiments] if ablation else []
    if any(m for _, m in found):
        lines += ["", "Ablation: the same fine-tuning from each encoder (out of fold)", header]
        lines += [row(f"from {exp}", (m or {}).get("pretrained")) for exp, m in found]
    else:
        lines += ["", "Ablation: not run (`dvc exp run` or `dvc repro` runs it; the tour and the study leave it out)"]
    return "\n".join(lines)


def curve_lines(c: dict | None) -> list[str]:
    """The label-efficiency curve: held-out accuracy and MCC per number of labels, with 95% intervals."""
    if not c:
        return ["Label-efficiency curve: (not run)"]
    if not c.get("heldout_windows"):
        return [f"Label-efficiency curve: none - {c.get('note', 'no held-out set')}"]
    lines = [
        f"Label-efficiency curve: held-out accuracy (MCC) by labeled windows; mean of {len(c['seeds'])} seed(s), "
        f"95% bootstrap intervals over the {c['heldout_windows']} held-out windows",
        f"  {'labels':>6} " + " ".join(f"{m:>32}" for m in ("pretrained", "scratch", "logreg", "majority"))
        + f" {'lift (accuracy, points)':>26}",
    ]
    for size, entry in sorted(c["sizes"].items(), key=lambda item: int(item[0])):  # JSON keys sort as text
        cells = [f"{_ci(entry[m]['accuracy'], True)} ({entry[m]['mcc']['point']:+.2f})"
                 for m in ("pretrained", "scratch", "logreg", "majority")]
        lift = entry["lift"]["accuracy"]
        lift_cell = f"{100 * lift['point']:+.1f} [{100 * lift['ci_low']:+.1f}, {100 * lift['ci_high']:+.1f}]"
        lines.append(f"  {size:>6} " + " ".join(f"{cell:>32}" for cell in cells) + f" {lift_cell:>26}")
    if c.get("skipped_sizes"):
        lines.append(f"  sizes {c['skipped_sizes']} left out: the label pool has {c['pool_windows']} windows")
    return lines


def run_experiment(name: str, extra: list[str]) -> None:
    """`moola tour` / `moola study`: its -S settings, then the user's options, through `dvc exp run`."""
    sets = [arg for key, value in RUNS[name].items() for arg in ("-S", f"{key}={value}")]
    cmd = ["dvc", "exp", "run", *sets, *extra, *TARGETS]
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise SystemExit(code)
    print()
    print(report(ablation=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moola", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tour", help="the whole pipeline at a small scale via `dvc exp run`, then the results; "
                   "further options go to `dvc exp run` (e.g. -S mask=random)")
    sub.add_parser("study", help="the CPU study: all unlabeled windows, pretraining cut to about 45 minutes on 2 "
                   "cores, then fine-tuning and the curve via `dvc exp run` (README \"Results\")")
    sub.add_parser("report", help="print the results table from the workspace's metrics")
    sub.add_parser("parallel", help="run the five pretraining experiments concurrently, then the rest "
                   "(moola parallel --help)")
    sub.add_parser("doctor", help="a GPU box's first command: will training use the GPU, in what precision, how "
                   "fast (moola doctor --help)")
    sub.add_parser("figures", help="every plot of `dvc plots show` as PNG/SVG files in a folder, rendered offline "
                   "(moola figures --help)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["parallel"]:
        from moola import parallel

        return parallel.main(argv[1:])
    if argv[:1] == ["figures"]:
        from moola import figures

        return figures.main(argv[1:])
    if argv[:1] == ["doctor"]:
        from moola import doctor

        return doctor.main(argv[1:])
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in RUNS:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in RUNS:
        run_main(lambda: run_experiment(args.command, extra))
    else:
        run_main(lambda: print(report()))


if __name__ == "__main__":
    main()
