"""The results table (`moola report`, and what `moola tour`, `study` and `deep` print at the end): the metrics files
in the workspace as plain text, section by section (pretraining, selection, replicates, held-out, fine-tuning out of
fold, the label-efficiency and pretraining-budget curves, the ablation).

A metrics file that is not there is "(not run)"; one that is there but cannot be read, or lacks a field the table
needs, is a one-line error naming it (moola.errors.DataError).
"""

from __future__ import annotations

import json
from pathlib import Path

from moola import paths
from moola.errors import DataError
from moola.params import CLASS_NAMES, load_params


class _Metrics(dict):
    """A metrics file's object that names the file when the table asks for a key it does not hold."""

    path: Path

    def __missing__(self, key):
        raise DataError(f"{self.path}: no field '{key}' (expected what moola's stage writes; re-make it with "
                        f"`dvc repro`, or restore the last run's copy with `dvc checkout {self.path}`)")


def _load(path: Path) -> dict | None:
    """A metrics file; None if it is not there (its stage has not run). One that is there but cannot be read (cut
    short, damaged, not JSON) is an error naming it: read as "not run", it would hide the damage."""
    def tagged(obj: dict) -> _Metrics:
        m = _Metrics(obj)
        m.path = path
        return m

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise DataError(f"{path}: cannot be read ({why}); re-make it with `dvc repro`, or restore the last run's "
                        f"copy with `dvc checkout {path}`") from None
    try:
        loaded = json.loads(text, object_hook=tagged)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}: cut short "
                        f"or damaged); re-make it with `dvc repro`, or restore the last run's copy with "
                        f"`dvc checkout {path}`") from None
    if not isinstance(loaded, dict):
        raise DataError(f"{path}: holds {type(loaded).__name__}, not an object (expected what moola's stage writes)")
    return loaded


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def _ci(m: dict | None, points: bool = False) -> str:
    """A metric with its 95% interval: '61.2% [59.1, 63.3]' (percent) or '0.212 [0.17, 0.25]'."""
    if not m:
        return "-"
    if m.get("point") is None:  # undefined on these windows (one class only): null, with its reason
        return "undefined"
    if points:
        return f"{100 * m['point']:5.1f}% [{100 * m['ci_low']:4.1f}, {100 * m['ci_high']:4.1f}]"
    return f"{m['point']:6.3f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]"


NETWORK_ROWS = ("pretrained", "scratch", "scratch_same_schedule")
ROWS = (*NETWORK_ROWS, "logreg", "majority")
LIFT_NAMES = {"lift": "pretrained - scratch", "lift_same_schedule": "pretrained - scratch_same_schedule"}


def _lift_cells(lift: dict) -> str:
    """A lift's accuracy, balanced accuracy and MCC with their intervals (the metrics it holds)."""
    parts = []
    for key, name in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced"), ("mcc", "MCC")):
        m = lift.get(key)
        if not m:
            continue
        if m.get("point") is None:  # undefined on these windows (one class only): null, with its reason
            parts.append(f"{name} undefined")
            continue
        if key == "mcc":
            parts.append(f"{name} {m['point']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]")
        else:
            parts.append(f"{name} {100 * m['point']:+.1f} points [{100 * m['ci_low']:+.1f}, {100 * m['ci_high']:+.1f}]")
    return "; ".join(parts)


def heldout_lines(h: dict | None) -> list[str]:
    """The held-out table: every model's prediction on windows no model trained on, with intervals."""
    if not h:
        return ["Held-out test set: (not run)"]
    if not h.get("windows"):
        return [f"Held-out test set: none - {h.get('note', 'no held-out set')}; only out-of-fold numbers below"]
    counts = ", ".join(f"{n} {name}" for name, n in h["class_counts"].items())
    covers = " and ".join(h.get("covers", [])) or "held-out windows"
    lines = [
        f"Held-out test set ({h['windows']} windows: {counts}; 95% bootstrap intervals over {covers}; "
        f"prediction = {h['prediction']})",
        f"  {'model':<22} {'accuracy':>22} {'balanced':>22} {'recall c0':>22} {'recall c1':>22} {'MCC':>22}",
    ]
    for init in ROWS:
        m = h.get(init)
        if not m:
            continue
        cells = [_ci(m.get(k), True) for k in ("accuracy", "balanced_accuracy", *(f"recall_{c}" for c in CLASS_NAMES))]
        lines.append(f"  {init:<22} " + " ".join(f"{c:>22}" for c in cells) + f" {_ci(m.get('mcc')):>22}")
    undefined = sorted({m["undefined"] for init in ROWS for m in (h.get(init) or {}).values()
                        if isinstance(m, dict) and m.get("undefined")})
    lines += [f"  undefined: {reason}" for reason in undefined]
    for key, name in LIFT_NAMES.items():
        lift = h.get(key)
        if not lift:
            continue
        lines.append(f"  {key} ({name}): {_lift_cells(lift)}")
        ratios = {m: lift[m].get("width_vs_independent_windows") for m in ("accuracy", "balanced_accuracy", "mcc")
                  if isinstance(lift.get(m), dict)}
        if any(r is not None for r in ratios.values()):
            lines.append(f"    interval width vs windows resampled one at a time (blocks of {h.get('block')}): "
                         + ", ".join(f"{m} x{r:.2f}" for m, r in ratios.items() if r is not None))
        lines.append(f"    verdict: {lift['verdict']}")
    pairs = h.get("pairs") or []
    if pairs:
        lines.append("  each (replicate, seed) pair's lift on every window (accuracy points; MCC):")
        for pair in pairs:
            lines.append(f"    {pair['lift']:<19} replicate {pair['replicate']}, seed {pair['seed']}: "
                         f"{100 * pair['accuracy']:+.1f}; {pair['mcc']:+.3f}")
    return lines


def warning_lines(h: dict | None) -> list[str]:
    """data.heldout: anywhere: the held-out numbers (table, periods, curve) may be optimistic; said every time."""
    return [f"WARNING: {h['warning']}"] if h and h.get("warning") else []


def period_lines(h: dict | None) -> list[str]:
    """Walk-forward: the held-out accuracy per consecutive period (the same predictions; nothing re-trained)."""
    periods = (h or {}).get("by_period")
    if not periods:
        return []
    models = [m for m in ("pretrained", "scratch", "scratch_same_schedule", "logreg", "majority") if m in periods[0]]
    lines = [
        f"  by period (walk-forward: the held-out windows in {len(periods)} consecutive periods of equal size, the "
        "same predictions; accuracy, 95% interval)",
        f"    {'period':>6} {'windows':>7}  {'from':<16}  {'to':<16} " + " ".join(f"{m:>22}" for m in models)
        + (f" {'lift (points)':>22}" if "lift" in periods[0] else ""),
    ]
    when = lambda text: text[:16].replace("T", " ")  # noqa: E731
    for e in periods:
        cells = " ".join(f"{_ci(e[m]['accuracy'], True):>22}" for m in models)
        lift = e.get("lift", {}).get("accuracy")
        lift_cell = ""
        if lift:
            text = f"{100 * lift['point']:+.1f} [{100 * lift['ci_low']:+.1f}, {100 * lift['ci_high']:+.1f}]"
            lift_cell = f" {text:>22}"
        lines.append(f"    {e['period']:>6} {e['windows']:>7}  {when(e['first_start']):<16}  "
                     f"{when(e['last_start']):<16} {cells}{lift_cell}")
    return lines


def selection_basis(chosen: dict) -> str:
    """' (lowest common val loss 0.00412 among 5 stable; own-mask best 0.00302)' from metrics/select.json."""
    if "compare_on" not in chosen:  # written before select compared on a common set
        return ""
    own, common = chosen.get("best_val_loss"), chosen.get("common_val_loss")
    fmt = lambda x: "-" if x is None else f"{x:.5f}"  # noqa: E731
    if chosen["compare_on"] == "common":
        ranked, other = f"common val loss {fmt(common)}", f"own-mask best {fmt(own)}"
    else:
        ranked, other = f"own-mask best val loss {fmt(own)}", f"common {fmt(common)}"
    return f" (lowest {ranked} among {chosen.get('stable_candidates')} stable; {other})"


def pretraining_lines(p, root: Path, chosen: dict | None) -> list[str]:
    """Every experiment's pretraining losses, with its loss on select's common validation set (`chosen`: the
    select metrics) where it was scored."""
    common = {name: c.get("common_val_loss") for name, c in ((chosen or {}).get("candidates") or {}).items()}
    lines = ["Pretraining (validation loss = masked-step MSE on held-out windows; best and final under the "
             "experiment's own mask, common: select's one mask set for all)"]
    lines.append(f"  {'experiment':<20} {'mask':<7} {'epochs':>6} {'best val':>10} {'final val':>10} {'common':>10}")
    for exp in p.experiments:
        m = _load(root / paths.pretrain_metrics(exp))
        if m is None:
            lines.append(f"  {exp:<20} (not run)")
            continue
        lines.append(
            f"  {exp:<20} {m['mask']:<7} {m['epochs_run']:>6} {m['best_val_loss']:>10.5f} {m['final_val_loss']:>10.5f}"
            + ("" if common.get(exp) is None else f" {common[exp]:>10.5f}")
        )
    return lines


FINETUNE_HEADER = f"  {'model':<26} {'accuracy':>9} {'balanced':>9} {'recall c0':>10} {'recall c1':>10} {'MCC':>6}"


def _finetune_row(name: str, m: dict | None) -> str:
    """One model's out-of-fold metrics (mean over seeds) under FINETUNE_HEADER."""
    if not m:
        return f"  {name:<26} (not run)"
    get = lambda k: (m.get(k) or {}).get("mean") if isinstance(m.get(k), dict) else m.get(k)  # noqa: E731
    mcc = get("mcc")
    return (
        f"  {name:<26} {_pct(get('accuracy')):>9} {_pct(get('balanced_accuracy')):>9} "
        f"{_pct(get('recall_' + CLASS_NAMES[0])):>10} {_pct(get('recall_' + CLASS_NAMES[1])):>10} "
        f"{'  -' if mcc is None else f'{mcc:6.3f}'}"
    )


def finetune_lines(ft: dict | None) -> list[str]:
    """Fine-tuning out of fold: every model's row, then the lifts with their verdicts."""
    folds = (ft or {}).get("cv", {}).get("description")
    lines = [f"Fine-tuning, out of fold ({folds + '; ' if folds else ''}mean over seeds; c0 consolidation, "
             "c1 retracement)", FINETUNE_HEADER]
    if not ft:
        return lines + ["  (not run)"]
    for init in ROWS:
        if init in ft:
            lines.append(_finetune_row(init, ft.get(init)))
    for key, name in LIFT_NAMES.items():
        lift = ft.get(key)
        if lift and "accuracy" in lift:
            lines.append(f"  {key} ({name}): {_lift_cells(lift)}")
            lines.append(f"    verdict: {lift.get('verdict', '')}")
    return lines


def ablation_lines(p, root: Path, ablation: bool) -> list[str]:
    """The same fine-tuning from each experiment's encoder; `ablation` False: left out of this run."""
    found = [(exp, _load(root / paths.ablation_metrics(exp))) for exp in p.experiments] if ablation else []
    if not any(m for _, m in found):
        return ["Ablation: not run (`dvc exp run` or `dvc repro` runs it; the tour and the study leave it out)"]
    return (["Ablation: the same fine-tuning from each encoder (out of fold)", FINETUNE_HEADER]
            + [_finetune_row(f"from {exp}", (m or {}).get("pretrained")) for exp, m in found])


def report(root: Path = Path("."), ablation: bool = True, curve: bool = True) -> str:
    """The results as a plain-text table (pretraining, selection, held-out, fine-tuning, curve, ablation).

    ablation=False leaves the ablation out (curve=False the label curve): after a run that did not include it (the
    tour, the study, `moola deep`), metrics files in the workspace would be another run's."""
    p = load_params(root / "params.yaml")
    chosen = _load(root / paths.SELECT_METRICS)
    lines = pretraining_lines(p, root, chosen)
    if chosen:
        lines.append(f"Selected encoder: {chosen.get('selected')}" + selection_basis(chosen))
    lines += replicate_lines(p, root)
    ft = _load(root / paths.FINETUNE_METRICS)
    held = (ft or {}).get("heldout")
    lines += [""] + warning_lines(held) + heldout_lines(held) + period_lines(held)
    lines += [""] + finetune_lines(ft)
    if curve:  # `moola deep` does not run the label curve: a file in the workspace would be another run's
        lines += [""] + curve_lines(_load(root / paths.LABEL_CURVE_METRICS))
    lines += [""] + budget_lines(_load(root / paths.BUDGET_METRICS))
    lines += [""] + ablation_lines(p, root, ablation)
    return "\n".join(lines)


def replicate_lines(p, root: Path) -> list[str]:
    """The answer's encoders: one pretraining run of the selected experiment per replicate seed."""
    found = [(seed, _load(root / paths.replicate_metrics(seed))) for seed in p.replicates.seeds]
    if not any(m for _, m in found):
        return ["Replicates: (not run)"]
    lines = ["Replicates (the answer's encoders: runs of the selected experiment, one per pretraining seed)"]
    for seed, m in found:
        if m is None:
            lines.append(f"  seed {seed:<6} (not run)")
            continue
        lines.append(f"  seed {seed:<6} {m['experiment']:<20} {m['epochs_run']:>3} epochs ({m['precision']}), best "
                     f"val {m['best_val_loss']:.5f} at epoch {m['best_epoch']}, final {m['final_val_loss']:.5f}")
    return lines


def budget_lines(b: dict | None) -> list[str]:
    """The pretraining-budget curve: held-out lifts by pretraining epochs, with 95% intervals."""
    if not b:
        return ["Pretraining-budget curve: (not run)"]
    if not b.get("heldout_windows"):
        return [f"Pretraining-budget curve: none - {b.get('note', 'no held-out set')}"]
    covers = " and ".join(b.get("covers") or [])
    lines = [f"Pretraining-budget curve ({b['experiment']}): held-out lift (points) by pretraining epochs; mean over "
             f"{len(b['replicates'])} replicate(s) x {len(b['seeds'])} seed(s), 95% intervals over {covers}",
             f"  {'epochs':>6} " + " ".join(f"{name:>26}" for name in (
                 "lift accuracy", "lift balanced", "lift MCC", "same-schedule accuracy", "same-schedule MCC"))]
    for epoch, entry in sorted(b["by_epoch"].items(), key=lambda item: int(item[0])):
        cells = [_lift_cell(entry[name][metric], metric == "mcc") for name, metric in (
            ("lift", "accuracy"), ("lift", "balanced_accuracy"), ("lift", "mcc"),
            ("lift_same_schedule", "accuracy"), ("lift_same_schedule", "mcc"))]
        lines.append(f"  {epoch:>6} " + " ".join(f"{cell:>26}" for cell in cells))
    return lines


def _lift_cell(x: dict, raw: bool = False) -> str:
    if x.get("point") is None:
        return "undefined"
    k, fmt = (1, "{:+.3f}") if raw else (100, "{:+.1f}")
    return f"{fmt.format(k * x['point'])} [{fmt.format(k * x['ci_low'])}, {fmt.format(k * x['ci_high'])}]"


def curve_lines(c: dict | None) -> list[str]:
    """The label-efficiency curve: held-out accuracy and MCC per number of labels, with 95% intervals."""
    if not c:
        return ["Label-efficiency curve: (not run)"]
    if not c.get("heldout_windows"):
        return [f"Label-efficiency curve: none - {c.get('note', 'no held-out set')}"]
    covers = " and ".join(c.get("covers") or [f"the {c['heldout_windows']} held-out windows"])
    models = [m for m in ROWS if all(m in entry for entry in c["sizes"].values())]
    lifts = [k for k in LIFT_NAMES if all(k in entry for entry in c["sizes"].values())]
    lines = [
        f"Label-efficiency curve: held-out accuracy (MCC) by labeled windows; mean of {len(c['seeds'])} seed(s), "
        f"95% bootstrap intervals over {covers}",
        f"  {'labels':>6} " + " ".join(f"{m:>32}" for m in models)
        + "".join(f" {k + ' (accuracy, points)':>36}" for k in lifts),
    ]
    for size, entry in sorted(c["sizes"].items(), key=lambda item: int(item[0])):  # JSON keys sort as text
        cells = [f"{_ci(entry[m]['accuracy'], True)} ({_signed(entry[m]['mcc']['point'])})" for m in models]
        lift_cells = [
            f"{100 * entry[k]['accuracy']['point']:+.1f} [{100 * entry[k]['accuracy']['ci_low']:+.1f}, "
            f"{100 * entry[k]['accuracy']['ci_high']:+.1f}]" for k in lifts
        ]
        lines.append(f"  {size:>6} " + " ".join(f"{cell:>32}" for cell in cells)
                     + "".join(f" {cell:>36}" for cell in lift_cells))
    if c.get("skipped_sizes"):
        lines.append(f"  sizes {c['skipped_sizes']} left out: the label pool has {c['pool_windows']} windows")
    return lines


def _signed(x: float | None) -> str:
    return "undefined" if x is None else f"{x:+.2f}"
