"""How to train many small fine-tunings on this machine's cores: one process with finetune.threads threads, or
finetune.workers processes of one thread each (moola.fits), on the spec's fine-tuning (60 epochs, batch 16).

    python -m benchmarks.measure_fits                         # 8 fits of 71 windows, 3 repeats per arrangement
    python -m benchmarks.measure_fits --fits 2 --epochs 2 --repeats 1     # seconds

Each repeat trains the same fits in every arrangement, the arrangements taking turns (a change in load hits all
alike), each predicting 2,000 held-out windows as the stages do. Reports fits per minute (median over repeats) and
the ratio to one process of 2 threads, and checks that 1 and 2 workers of 1 thread give the same bytes.
Inputs are random-walk windows of the spec's shape (speed does not depend on the values). Writes
metrics/bench_fits.json (machine-specific, git-ignored) and prints one line per arrangement.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch

from benchmarks.throughput import machine_info, median, synthetic_windows
from moola import io
from moola.errors import run_main
from moola.fits import Fit, Shared, run_fits
from moola.params import load_params

# (workers, threads per fit)
ARRANGEMENTS = ((1, 2), (1, 1), (2, 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=8)
    parser.add_argument("--windows", type=int, default=71, help="training windows per fit (a fold of 89)")
    parser.add_argument("--epochs", type=int, default=None, help="default finetune.epochs")
    parser.add_argument("--heldout", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    p = load_params()
    cfg = p.finetune
    if args.epochs:
        cfg = dataclasses.replace(cfg, epochs=args.epochs, freeze_epochs=min(cfg.freeze_epochs, args.epochs - 1))
    values = synthetic_windows(args.windows + args.heldout, p.data.window, seed=0).astype(np.float32)
    labels = (np.arange(len(values)) % 3 == 0).astype(np.int64)
    train = np.arange(args.windows)
    heldout = values[args.windows:]
    fits = [Fit("scratch", train, 1000 + i) for i in range(args.fits)]
    seconds: dict[str, list[float]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for repeat in range(args.repeats):
        for workers, threads in ARRANGEMENTS:
            name = f"{workers} worker{'s' if workers > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
            torch.set_num_threads(threads)
            shared = Shared(values, labels, heldout, {}, cfg, None, "cpu", threads)
            started = time.perf_counter()
            runs = run_fits(fits, shared, workers)
            seconds.setdefault(name, []).append(time.perf_counter() - started)
            outputs[name] = [r.heldout_proba for r in runs]
            print(f"repeat {repeat + 1}: {name}: {seconds[name][-1]:.1f} s", flush=True)
    same = all(np.array_equal(a, b) for a, b in zip(outputs["1 worker x 1 thread"], outputs["2 workers x 1 thread"]))
    base = median(seconds["1 worker x 2 threads"])
    rows = {name: {"median_seconds": round(median(s), 2), "fits_per_minute": round(60 * args.fits / median(s), 2),
                   "speedup_vs_1x2": round(base / median(s), 3), "seconds": [round(x, 2) for x in s]}
            for name, s in seconds.items()}
    report = {"machine": machine_info(torch.device("cpu")), "fits": args.fits, "windows": args.windows, "epochs": cfg.epochs,
              "heldout": args.heldout, "repeats": args.repeats, "arrangements": rows,
              "same_bytes_1_and_2_workers": same}
    io.write_json("metrics/bench_fits.json", report)
    for name, row in rows.items():
        print(f"{name}: {row['fits_per_minute']} fits/min (median of {args.repeats}), {row['speedup_vs_1x2']}x "
              f"one process of 2 threads", flush=True)
    print(f"1 and 2 workers of 1 thread, same bytes: {same}", flush=True)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
