"""python -m benchmarks [--quick | --tries | --help]: the run, top to bottom (see benchmarks/__init__.py)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import bf16_support, parse_args
from benchmarks.measure_data import bench_data
from benchmarks.measure_dvc import bench_dvc
from benchmarks.measure_training import (
    bench_finetune,
    bench_share,
    bench_training,
    bench_tries,
    compare_precision,
    loop_epoch,
    loop_experiment,
)
from benchmarks.report import spec_estimate, write_report
from benchmarks.throughput import REPORT_FORMAT, machine_info
from moola.errors import run_main
from moola.params import ScaleParams, load_params
from moola.windows import chronological_split


def run_bench(argv: list[str] | None = None, root: Path = Path(".")) -> dict:
    p = load_params(root / "params.yaml")
    s, args = parse_args(argv, p)
    began = time.perf_counter()
    if s.device.type == "cpu":
        torch.set_num_threads(s.threads)
    # The spec's shapes whatever the workspace's scale (a tour sets it small); bench_data generates the example
    # market itself, whatever files data.bars and data.labels name.
    p = dataclasses.replace(p, scale=ScaleParams(windows=s.windows_scale, epochs=1.0))
    report: dict = {
        "format": REPORT_FORMAT,
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "quick": s.quick,
        "machine": machine_info(s.device),
        "settings": {"batch_size": s.batch_size, "steps": s.steps, "repeats": s.repeats, "warmup": s.warmup,
                     "window": p.data.window, "hidden_size": p.pretrain.hidden_size, "threads": s.threads,
                     "precision": s.precision, "tf32": loop_experiment(p, s).train.tf32, "device": s.device.type,
                     "windows_scale": s.windows_scale},
    }
    say = (lambda msg: None) if s.quick else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say("bench: prepare and augment ...")
    report["data"], arrays = bench_data(p, s)
    d = report["data"]
    say(f"  prepare {d['prepare']['seconds']:.2f} s, augment {d['augment']['seconds']:.2f} s")
    say("bench: bare LSTM, model and real loop ...")
    report["training"] = bench_training(p, s, arrays["train"], arrays["val"])
    t = report["training"]
    say(f"  bare {t['bare_lstm']['runs']}, model {t['model']['runs']}, loop {t['loop']['runs']} samples/s; "
        f"ratio {t['ratio_loop_to_bare']:.3f}; load {os.getloadavg()[0]:.2f}")
    say("bench: fine-tuning ...")
    report["finetune"] = bench_finetune(p, s, arrays["labeled"])
    if s.dvc:
        say("bench: dvc ...")
        report["dvc"] = bench_dvc(s)
        say(f"  no-op repro {report['dvc']['noop_repro_runs']} s, status {report['dvc']['status_runs']} s")
    else:
        report["dvc"] = {"skipped": "--no-dvc"}
    bf16 = bf16_support(s.device)
    report["machine"]["bf16_autocast_lstm"] = bf16[0] if bf16[0] else f"no: {bf16[1]}"
    if s.tries:
        say("bench: tries ...")
        report["tries"] = bench_tries(p, s, p.data.window, bf16)
        for tr in report["tries"]:
            say(f"  {tr['name']}: {tr['runs']} samples/s")
        if bf16[0]:
            probe = loop_epoch(arrays["train"][: s.batch_size], arrays["val"],
                               loop_experiment(p, dataclasses.replace(s, precision="bf16")), p.seed, s.device)
            if probe["precision"] == "bf16":  # the loop applies bf16 on this device: compare the loss curves
                report["precision_comparison"] = compare_precision(
                    p, s, arrays["train"][: 4 * s.batch_size * s.steps], arrays["val"], epochs=3 if s.quick else 5)
    if s.share:
        say(f"bench: {s.share} workers sharing the device ...")
        report["share"] = bench_share(p, s, report["training"]["bare_lstm"]["samples_per_second"])
    report["estimate"] = spec_estimate(
        p, t["loop"]["samples_per_second"], t["loop"]["validation_and_setup_seconds"],
        report["finetune"]["seconds_per_epoch"], d["prepare"]["seconds"] / s.windows_scale,
        d["augment"]["seconds"] / max(1, d["augment"]["windows_made"]),
        # The spec's training split, whatever windows_scale measured.
        int(np.sum(chronological_split(p.data.unlabeled_windows, p.data.val_fraction) == "train")),
    )
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = time.perf_counter() - began
    report["json"] = str(args.json)
    write_report(report, root)
    return report


if __name__ == "__main__":
    run_main(run_bench)
