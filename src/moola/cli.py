"""The `moola` command: the laptop tour, the results table, and the parallel runner.

    moola tour       run the whole pipeline at a small scale through `dvc exp run`, then print the results
    moola report     print the results table from the metrics files in the workspace
    moola parallel   the five pretraining experiments concurrently, then the rest (see moola.parallel)
    moola doctor     a GPU box's first command: versions, the LSTM's real dtype, TF32, bare LSTM vs the loop
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moola.errors import run_main
from moola.params import CLASS_NAMES, load_params

# The tour: 4% of the windows and 10% of the epochs (8 for exp1, 6 fine-tuning epochs), smaller batches so that
# each epoch still takes many optimiser steps, and one fine-tuning seed instead of three.
TOUR_SET = {
    "scale.windows": "0.04",
    "scale.epochs": "0.1",
    "pretrain.batch_size": "128",
    "finetune.seeds": "[1337]",
}


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


def report(root: Path = Path(".")) -> str:
    """The results as a plain-text table (pretraining, selection, fine-tuning, ablation)."""
    p = load_params(root / "params.yaml")
    lines = ["Pretraining (validation loss = masked-step MSE on held-out windows)"]
    lines.append(f"  {'experiment':<20} {'mask':<7} {'epochs':>6} {'best val':>10} {'final val':>10}")
    for exp in p.experiments:
        m = _load(root / f"metrics/pretrain/{exp}.json")
        if m is None:
            lines.append(f"  {exp:<20} (not run)")
            continue
        lines.append(
            f"  {exp:<20} {m['mask']:<7} {m['epochs_run']:>6} {m['best_val_loss']:>10.5f} {m['final_val_loss']:>10.5f}"
        )
    chosen = _load(root / "metrics/select.json")
    if chosen:
        lines.append(f"Selected encoder: {chosen.get('selected')}")
    ft = _load(root / "metrics/finetune.json")
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
    ablation = [(exp, _load(root / f"metrics/ablation/{exp}.json")) for exp in p.experiments]
    if any(m for _, m in ablation):
        lines += ["", "Ablation: the same fine-tuning from each encoder", header]
        lines += [row(f"from {exp}", (m or {}).get("pretrained")) for exp, m in ablation]
    return "\n".join(lines)


def tour(extra: list[str]) -> None:
    sets = [arg for key, value in TOUR_SET.items() for arg in ("-S", f"{key}={value}")]
    cmd = ["dvc", "exp", "run", *sets, *extra]
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise SystemExit(code)
    print()
    print(report())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moola", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tour", help="the whole pipeline at a small scale via `dvc exp run`, then the results; "
                   "further options go to `dvc exp run` (e.g. -S mask=random)")
    sub.add_parser("report", help="print the results table from the workspace's metrics")
    sub.add_parser("parallel", help="run the five pretraining experiments concurrently, then the rest "
                   "(moola parallel --help)")
    sub.add_parser("doctor", help="a GPU box's first command: will training use the GPU, in what precision, how "
                   "fast (moola doctor --help)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["parallel"]:
        from moola import parallel

        return parallel.main(argv[1:])
    if argv[:1] == ["doctor"]:
        from moola import doctor

        return doctor.main(argv[1:])
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "tour":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "tour":
        run_main(lambda: tour(extra))
    else:
        run_main(lambda: print(report()))


if __name__ == "__main__":
    main()
