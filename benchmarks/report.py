"""The report: a full-spec `dvc repro` estimated from the measured rates, the table printed, metrics/bench.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks.throughput import TARGET_RATIO
from moola import io
from moola.finetuning import NETWORK_INITS
from moola.params import Params, ScaleParams


def spec_estimate(p: Params, loop_sps: float, epoch_other_s: float, finetune_epoch_s: float,
                  prepare_s: float, augment_s_per_window: float, train_windows: int) -> dict:
    """Seconds of a full-spec `dvc repro` here: every stage run one after the other, as `dvc repro` does."""
    spec = dataclasses.replace(p, scale=ScaleParams(windows=1.0, epochs=1.0))
    experiments = {}
    for exp in spec.all_experiments():
        samples = train_windows * (1 + exp.recipe.multiplier)
        per_epoch = samples / loop_sps + epoch_other_s
        experiments[exp.name] = {"epochs": exp.epochs, "train_samples": samples,
                                 "seconds_per_epoch": per_epoch, "seconds": exp.epochs * per_epoch}
    pretrain_s = sum(e["seconds"] for e in experiments.values())
    augment_s = sum(train_windows * r.multiplier * augment_s_per_window for r in spec.augment.recipes.values())
    ft = spec.finetune
    # finetune trains every network init (pretrained, scratch, scratch_same_schedule); each finetune_ablation@<exp>
    # trains the pretrained init only.
    fold_runs = ft.folds * len(ft.seeds) * (len(NETWORK_INITS) + len(spec.experiments))
    finetune_s = fold_runs * spec.finetune.epochs * finetune_epoch_s
    total = prepare_s + augment_s + pretrain_s + finetune_s
    return {
        "experiments": experiments,
        "prepare_seconds": prepare_s,
        "augment_seconds": augment_s,
        "pretrain_seconds": pretrain_s,
        "finetune_fold_runs": fold_runs,
        "finetune_seconds": finetune_s,
        "total_seconds": total,
        "total_hours": total / 3600,
        "method": "per experiment: epochs x (train samples / loop samples/s + validation-and-setup seconds); "
                  "fine-tuning: folds x seeds x (3 network inits + experiments) fold runs x epochs x seconds per epoch; "
                  "plus prepare and the three augment recipes",
    }


def _rate(x: float | None, unit: str = "samples/s") -> str:
    return "n/a" if x is None else f"{x:,.0f} {unit}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def format_table(r: dict) -> str:
    m, st, t = r["machine"], r["settings"], r["training"]
    lines = [
        f"moola bench ({r['command']})",
        f"machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']}, device {m['device']}, "
        f"load {m['load_average_at_start'][0]} at start",
        f"shapes: batch {st['batch_size']} x {st['window']} steps x 4 -> 2 x {st['hidden_size']} (bidirectional), "
        f"{st['steps']} steps x {st['repeats']} repeats after {st['warmup']} warm-up, precision {t['precision']} "
        f"(LSTM in {t.get('lstm_dtype')}), tf32 {st.get('tf32')}",
        "",
        f"{'measurement':<60} {'median':>20}  runs",
    ]

    def row(name: str, value: str, runs: list[float] | None = None) -> None:
        runs_text = " ".join(f"{x:,.0f}" if x >= 100 else f"{x:.2f}" for x in runs) if runs else ""
        lines.append(f"{name:<60} {value:>20}  {runs_text}")

    row("1 bare nn.LSTM + linear decoder (random tensors)", _rate(t["bare_lstm"]["samples_per_second"]),
        t["bare_lstm"]["runs"])
    row("  the pretraining model alone (random tensors)", _rate(t["model"]["samples_per_second"]),
        t["model"]["runs"])
    row("2 pretraining loop, real augmented data", _rate(t["loop"]["samples_per_second"]), t["loop"]["runs"])
    row(f"  ratio 2/1 (target >= {TARGET_RATIO:.2f}: {'met' if t['target_met'] else 'NOT met'})",
        f"{t['ratio_loop_to_bare']:.3f}", t["ratio_runs"])
    row("  ratio 2 / model alone (the loop's own overhead)", f"{t['ratio_loop_to_model']:.3f}")
    row(f"  validation ({t['loop']['validation_windows']:,} windows) + setup per epoch",
        _duration(t["loop"]["validation_and_setup_seconds"]))
    if t.get("peak_gpu_memory_mib") is not None:
        row("  peak GPU memory (bare, model and loop)", f"{t['peak_gpu_memory_mib']:,.0f} MiB")
    d = r["data"]
    row(f"3 prepare, whole core ({d['prepare']['windows']:,} windows)", _rate(d["prepare"]["windows_per_second"],
        "windows/s"))
    row("  windowing + normalise, vectorised", _rate(d["windowing"]["vectorised_windows_per_second"], "windows/s"))
    row(f"  ... per-window Python loop (x{d['windowing']['speedup']:.1f} slower)",
        _rate(d["windowing"]["per_window_loop_windows_per_second"], "windows/s"))
    a = d["augment"]
    row(f"  augment {a['recipe']}: {a['train_windows']:,} x {a['windows_made'] // max(1, a['train_windows'])} "
        f"in {_duration(a['seconds'])}", _rate(a["vectorised_windows_per_second"], "windows/s"))
    row(f"  ... per-window Python loop (x{a['speedup']:.1f} slower)",
        _rate(a["per_window_loop_windows_per_second"], "windows/s"))
    if "noop_repro_seconds" in r["dvc"]:
        v = r["dvc"]
        row(f"4 dvc repro prepare augment, no-op ({v['output_bytes'] / 1e6:,.0f} MB)",
            _duration(v["noop_repro_seconds"]), v["noop_repro_runs"])
        row("  dvc status", _duration(v["status_seconds"]), v["status_runs"])
        row("  (first build, once)", _duration(v["build_seconds"]))
    else:
        row("4 dvc", "skipped")
    row("fine-tuning, one fold, per epoch", _duration(r["finetune"]["seconds_per_epoch"]))
    for tr in r.get("tries", []):
        value = _rate(tr["samples_per_second"])
        if tr["vs_baseline"] is not None:
            value = f"{value} x{tr['vs_baseline']:.2f}"
        row(f"  try: {tr['name']}", value if tr["samples_per_second"] else "unsupported")
    if "precision_comparison" in r:
        c = r["precision_comparison"]
        row("  bf16 vs fp32 final val loss, relative", f"{c['relative_difference']:.4f}")
    if "share" in r:
        sh = r["share"]
        row(f"{sh['workers']} workers sharing {st['device']}, aggregate", _rate(sh["aggregate_samples_per_second"]))
        if sh.get("peak_memory_mib"):
            row("  peak GPU memory per worker (MiB)", " ".join(f"{m:,.0f}" for m in sh["peak_memory_mib"] if m))
    e = r["estimate"]
    lines += ["", "Full-spec `dvc repro` on this machine, estimated from the loop's rate:"]
    for name, x in e["experiments"].items():
        lines.append(f"  pretrain@{name:<18} {x['epochs']:>4} epochs x {_duration(x['seconds_per_epoch']):>9} "
                     f"= {_duration(x['seconds'])}")
    lines.append(f"  prepare + augment {_duration(e['prepare_seconds'] + e['augment_seconds'])}, fine-tuning "
                 f"({e['finetune_fold_runs']} fold runs) {_duration(e['finetune_seconds'])}; "
                 f"total {_duration(e['total_seconds'])}")
    lines.append(f"wrote {r['json']} (machine-specific; not a DVC output) in {_duration(r['seconds'])}")
    return "\n".join(lines)


def write_report(report: dict, root: Path) -> None:
    """metrics/bench.json (or --json; a relative path is under `root`), then the table on stdout."""
    path = Path(report["json"])
    io.write_json(path if path.is_absolute() else root / path, report)
    print(format_table(report), flush=True)
