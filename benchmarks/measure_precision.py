"""fp32 against bf16 on this machine: the real pretraining loop's samples/s at each batch size, and fine-tuning's
seconds per fold-epoch, the two precisions taking turns within each repeat (a change in load hits both alike).

    python -m benchmarks.measure_precision                          # batches 256 (the study's) and 2048 (the spec's)
    python -m benchmarks.measure_precision --batch-sizes 32 --samples 64 --repeats 2 --finetune-epochs 1   # seconds

bf16 is what `precision: bf16` really runs here (moola.numerics decides by running a tiny LSTM): where it falls
back to fp32 the JSON says so and no bf16 figure is claimed. Inputs are random-walk windows of the spec's shape
(the loop's speed does not depend on the values); exp1_baseline's model, mask and learning rate; params.yaml's
threads. Writes metrics/bench_precision.json (machine-specific, git-ignored) and prints one line per figure, and
for each batch size the `pretrain.precision` it recommends here (bf16 only where it runs and is clearly faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.throughput import SPEC_EXPERIMENT, machine_info, median, synthetic_windows
from moola import io
from moola.device import use_threads
from moola.errors import MoolaError, run_main
from moola.numerics import decide
from moola.params import load_params

PRECISIONS = ("fp32", "bf16")
# bf16 is recommended on a CPU only when it is clearly faster: a smaller gain is inside a 2-core box's noise and
# does not pay for giving up fp32's bytes.
BF16_MIN_SPEEDUP = 1.25


def cpu_bf16_advice(available: bool, fp32: float | None, bf16: float | None) -> tuple[str, str]:
    """(setting, one line) for pretrain.precision on a CPU, from whether bf16 runs and the loop's two rates."""
    if not available:
        return "fp32", "bf16 does not run on this CPU: keep precision fp32 (the default)"
    assert fp32 and bf16
    speedup = bf16 / fp32
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", (f"bf16 trains {speedup:.2f}x as fast here: -S pretrain.precision=bf16 for speed; fp32 "
                        "(the default) where the weights must match another fp32 run's bytes")
    return "fp32", (f"bf16 runs but only {speedup:.2f}x as fast (< {BF16_MIN_SPEEDUP}x): keep precision fp32 "
                    "(the default)")


def loop_rate(train: np.ndarray, val: np.ndarray, exp, seed: int, device: torch.device) -> dict:
    """One epoch of moola.pretraining.pretrain: its training samples/s (validation not counted) and what ran."""
    from moola.pretraining import pretrain

    result = pretrain(train, val, exp, seed, device=device, log=lambda _: None)
    return {"samples_per_second": result.samples_per_second, "ran": result.precision,
            "lstm_dtype": result.numerics["lstm_dtype"], "val_loss": result.history[-1][2]}


def bench_loop(p, batch_sizes: list[int], samples: int, repeats: int, window: int, device: torch.device) -> dict:
    base = p.experiment(SPEC_EXPERIMENT)
    out = {}
    for batch in batch_sizes:
        steps = max(1, samples // batch)
        train = synthetic_windows(steps * batch, window, p.seed)
        val = synthetic_windows(min(batch, 512), window, p.seed + 1)
        exps = {name: dataclasses.replace(base, epochs=1, train=dataclasses.replace(
            base.train, batch_size=batch, precision=name, device=device.type, early_stopping_patience=0))
            for name in PRECISIONS}
        for exp in exps.values():  # warm-up: oneDNN builds its primitives on the first call
            loop_rate(train[:batch], val, exp, p.seed, device)
        runs: dict[str, list[dict]] = {name: [] for name in PRECISIONS}
        for _ in range(repeats):
            for name, exp in exps.items():
                runs[name].append(loop_rate(train, val, exp, p.seed, device))
        entry: dict = {"steps": steps, "samples_per_timing": steps * batch}
        for name in PRECISIONS:
            rates = [r["samples_per_second"] for r in runs[name]]
            entry[name] = {"samples_per_second": median(rates), "runs": rates, "ran": runs[name][0]["ran"],
                           "lstm_dtype": runs[name][0]["lstm_dtype"], "val_loss": runs[name][0]["val_loss"],
                           "val_loss_same_every_repeat": len({r["val_loss"] for r in runs[name]}) == 1}
        if entry["bf16"]["ran"] == "bf16":
            entry["speedup"] = entry["bf16"]["samples_per_second"] / entry["fp32"]["samples_per_second"]
            entry["speedup_runs"] = [b / f for b, f in zip(entry["bf16"]["runs"], entry["fp32"]["runs"])]
        entry["recommended"], entry["advice"] = cpu_bf16_advice(
            entry["bf16"]["ran"] == "bf16", entry["fp32"]["samples_per_second"], entry["bf16"]["samples_per_second"])
        out[str(batch)] = entry
    return out


def bench_finetune(p, epochs: int, repeats: int, window: int, device: torch.device) -> dict:
    """One fold of fine-tuning (scratch init: every parameter trains), fp32 and bf16 taking turns."""
    from moola.finetuning import train_fold

    n = p.data.labeled_windows
    values = synthetic_windows(n, window, p.seed)
    labels = (np.arange(n) % 3 == 0).astype(np.int64)
    train, test = np.arange(n) >= n // 5, np.arange(n) < n // 5
    base = dataclasses.replace(p.finetune, epochs=epochs, freeze_epochs=0)
    numerics = {name: decide(device, name, False) for name in PRECISIONS}
    use_threads(device, p.finetune.threads)
    runs: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    for rep in range(repeats + 1):  # the first round warms up
        for name, decided in numerics.items():
            began = time.perf_counter()
            train_fold(values[train], labels[train], values[test], labels[test], base, None, p.seed, device,
                       numerics=decided)
            if rep:
                runs[name].append((time.perf_counter() - began) / epochs)
    out: dict = {"fold_windows": int(train.sum()), "epochs_timed": epochs, "batch_size": base.batch_size}
    for name in PRECISIONS:
        out[name] = {"seconds_per_epoch": median(runs[name]), "runs": runs[name], "ran": numerics[name].ran}
    out["bf16_vs_fp32_time"] = out["bf16"]["seconds_per_epoch"] / out["fp32"]["seconds_per_epoch"]
    return out


def run(argv: list[str] | None = None, root: Path = Path(".")) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.measure_precision", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--samples", type=int, default=4096, help="training samples per timing (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per precision and batch size (median)")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs per timing (0: skip)")
    parser.add_argument("--json", default="metrics/bench_precision.json")
    args = parser.parse_args(argv)
    if min(args.batch_sizes + [args.samples, args.repeats]) < 1 or args.finetune_epochs < 0:
        raise MoolaError("--batch-sizes, --samples and --repeats must be at least 1, --finetune-epochs at least 0")
    p = load_params(root / "params.yaml")
    device = torch.device("cpu")
    use_threads(device, p.pretrain.threads)
    began = time.perf_counter()
    bf16 = decide(device, "bf16", False)
    report: dict = {
        "command": " ".join(["python -m benchmarks.measure_precision", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(device) | {"threads": torch.get_num_threads()},
        "bf16": {"runs_here": bf16.ran == "bf16", "why": bf16.why},
        "inputs": "random-walk windows, min-max normalised, the spec's window; exp1_baseline's model and mask",
    }
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    say(f"{report['machine']['cpu']} ({', '.join(report['machine']['cpu_flags'])}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; bf16: {bf16.why}")
    report["loop"] = bench_loop(p, args.batch_sizes, args.samples, args.repeats, p.data.window, device)
    for batch, e in report["loop"].items():
        say(f"loop batch {batch}: fp32 {e['fp32']['samples_per_second']:,.0f} samples/s {_runs(e['fp32']['runs'])}, "
            f"bf16 ({e['bf16']['ran']} ran) {e['bf16']['samples_per_second']:,.0f} {_runs(e['bf16']['runs'])}"
            + (f": {e['speedup']:.2f}x" if "speedup" in e else "")
            + f"; val loss after 1 epoch fp32 {e['fp32']['val_loss']:.5f}, bf16 {e['bf16']['val_loss']:.5f}")
        say(f"  recommended at batch {batch}: precision {e['recommended']}: {e['advice']}")
    if args.finetune_epochs:
        report["finetune"] = f = bench_finetune(p, args.finetune_epochs, args.repeats, p.data.window, device)
        say(f"fine-tuning, one fold ({f['fold_windows']} windows, batch {f['batch_size']}): fp32 "
            f"{f['fp32']['seconds_per_epoch']:.3f} s/epoch, bf16 ({f['bf16']['ran']} ran) "
            f"{f['bf16']['seconds_per_epoch']:.3f} s/epoch ({f['bf16_vs_fp32_time']:.2f}x the time)")
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = time.perf_counter() - began
    out = Path(args.json) if Path(args.json).is_absolute() else root / args.json
    io.write_json(out, report)
    say(f"wrote {args.json} in {report['seconds']:.1f} s")
    return report


def _runs(rates: list[float]) -> str:
    return "(" + ", ".join(f"{r:,.0f}" for r in rates) + ")"


if __name__ == "__main__":
    run_main(run)
