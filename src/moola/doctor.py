"""`moola doctor`: a GPU box's first minute. Will `device: auto` use the GPU, in what arithmetic, and how fast?

    moola doctor                 # versions, the LSTM's dtype, TF32, bare LSTM vs the real loop, --share 5 on cuda
    moola doctor --quick         # tiny shapes (the CPU test)
    moola doctor --share 5 --json metrics/bench.json

On a CPU it also says whether `precision: bf16` runs there (moola.numerics decides, by running a tiny LSTM), and
when it does, times the real loop in the other precision too and recommends a setting.

Fails with one line, before anything else, when the box has an NVIDIA GPU (nvidia-smi lists one) but torch
cannot use CUDA: `device: auto` would quietly train on the CPU (an image whose torch is too old for moola pulls
a PyPI torch at `pip install -e .` that may not match the driver). Timings: >= 20 warm-up and >= 100 timed steps
on CUDA, read with CUDA events; the loop's epochs end on a device read, so their wall time is the GPU's time.
Writes the figures in metrics/bench.json's format (benchmarks/, python -m benchmarks), with a "doctor" section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moola import io
from moola.device import describe, pick_device, use_threads
from moola.errors import MoolaError, run_main
from moola.numerics import apply_cuda_settings, decide, tf32_state
from moola.params import FEATURES, load_params
from moola.throughput import (
    DEFAULT_JSON,
    REPORT_FORMAT,
    SPEC_EXPERIMENT,
    TARGET_RATIO,
    WorkerRun,
    bare_lstm_stepper,
    machine_info,
    median,
    share_device,
)

CUDA_STEPS = dict(warmup=20, steps=100, repeats=3)
CPU_STEPS = dict(warmup=1, steps=3, repeats=2)
QUICK = dict(warmup=1, steps=2, repeats=2, batch_size=32)
# bf16 is recommended on a CPU only when it is clearly faster: a smaller gain is inside a 2-core box's noise and
# does not pay for giving up fp32's bytes.
BF16_MIN_SPEEDUP = 1.25


def cuda_verdict(nvidia_smi_present: bool, cuda_available: bool, requested: str, torch_version: str,
                 torch_cuda: str | None) -> str | None:
    """The one-line error when training would not use the box's NVIDIA GPU; None when all is well."""
    if not nvidia_smi_present or cuda_available or requested not in ("auto", "cuda"):
        return None
    built = f"built for CUDA {torch_cuda}" if torch_cuda else "a CPU-only build"
    return (
        f"this box has an NVIDIA GPU (nvidia-smi lists it) but torch {torch_version} ({built}) cannot use it: "
        f"pretrain.device '{requested}' would train on the CPU. Install the torch build that matches the driver "
        "(nvidia-smi shows the highest CUDA it supports) into the venv, or use the image's torch "
        "(scripts/runpod.sh --python /usr/bin/python3)"
    )


def nvidia_smi() -> dict | None:
    """Driver version and GPU names from nvidia-smi; None where there is no nvidia-smi (or it fails)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    rows = [[c.strip() for c in line.split(",")] for line in done.stdout.strip().splitlines() if line.strip()]
    return {"gpus": [r[0] for r in rows], "driver": rows[0][1] if rows else None,
            "memory": [r[2] for r in rows if len(r) > 2]}


def versions(device: torch.device, smi: dict | None) -> dict:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": smi["driver"] if smi else None,
        "gpus": smi["gpus"] if smi else [],
        "device": describe(device),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def time_bare(stepper, steps: int, repeats: int, device: torch.device) -> list[float]:
    """Samples/s of `steps` steps per repeat: CUDA events on a GPU, perf_counter elsewhere."""
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                stepper.step()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            seconds = stepper.run(steps)
        rates.append(steps * stepper.batch / seconds)
    return rates


def synthetic_windows(n: int, window: int, seed: int) -> np.ndarray:
    """Random-walk OHLC windows, min-max normalised per window: the loop's input without the pipeline."""
    rng = np.random.default_rng(seed)
    close = np.cumsum(rng.normal(size=(n, window, 1)), axis=1)
    x = close + rng.normal(scale=0.3, size=(n, window, len(FEATURES)))
    low, high = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    return ((x - low) / (high - low)).astype(np.float32)


def time_loop(exp, batch: int, steps: int, repeats: int, warmup: int, window: int, device, seed: int) -> tuple[list[float], dict]:
    """The real pretraining loop (moola.pretraining.pretrain), one epoch of `steps` batches per repeat."""
    from moola.pretraining import pretrain

    train = synthetic_windows(steps * batch, window, seed)
    val = synthetic_windows(batch, window, seed + 1)
    one = dataclasses.replace(exp, epochs=1, train=dataclasses.replace(exp.train, batch_size=batch))
    quiet = lambda line: None  # noqa: E731
    warm = pretrain(train[: max(1, warmup) * batch], val, one, seed, device=device, log=quiet)
    rates = [pretrain(train, val, one, seed, device=device, log=quiet).samples_per_second for _ in range(repeats)]
    return rates, warm.numerics


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


def cpu_bf16(exp, device, asked: str, loop_rates: list[float], batch: int, steps: int, repeats: int, warmup: int,
             window: int, seed: int) -> dict:
    """On a CPU: does bf16 run (the decision pretraining makes), and the real loop's samples/s in fp32 and bf16.
    The precision the loop already ran in (`asked`) reuses `loop_rates`; the other is timed the same way."""
    bf16 = decide(device, "bf16", False)
    out: dict = {"available": bf16.ran == "bf16", "why": bf16.why}
    if bf16.ran == "bf16":
        began = time.perf_counter()
        other = "fp32" if asked == "bf16" else "bf16"
        exp_other = dataclasses.replace(exp, train=dataclasses.replace(exp.train, precision=other))
        rates, _ = time_loop(exp_other, batch, steps, repeats, warmup, window, device, seed)
        runs = {asked: loop_rates, other: rates}
        out |= {"fp32": {"samples_per_second": median(runs["fp32"]), "runs": runs["fp32"]},
                "bf16": {"samples_per_second": median(runs["bf16"]), "runs": runs["bf16"]},
                "speedup": median(runs["bf16"]) / median(runs["fp32"]),
                "seconds": time.perf_counter() - began}
    setting, line = cpu_bf16_advice(out["available"], out.get("fp32", {}).get("samples_per_second"),
                                    out.get("bf16", {}).get("samples_per_second"))
    return out | {"recommended": setting, "advice": line}


def run_doctor(argv: list[str] | None = None, root: Path = Path(".")) -> dict:
    parser = argparse.ArgumentParser(prog="moola doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few steps (the CPU test)")
    parser.add_argument("--steps", type=int, help="timed steps per repeat (default: 100 on cuda, 3 on cpu)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 20 on cuda, 1 on cpu)")
    parser.add_argument("--batch-size", type=int, help="default: pretrain.batch_size")
    parser.add_argument("--share", type=int, help="workers sharing the device at once (default: 5 on cuda, else 0)")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"where to write (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)

    p = load_params(root / "params.yaml")
    exp = p.experiment(SPEC_EXPERIMENT)
    cfg = exp.train
    smi = nvidia_smi()
    problem = cuda_verdict(smi is not None and bool(smi["gpus"]), torch.cuda.is_available(), cfg.device,
                           torch.__version__, torch.version.cuda)
    if problem:
        raise MoolaError(problem)
    device = pick_device(cfg.device)
    use_threads(device, cfg.threads)
    cuda = apply_cuda_settings(device, cfg.tf32, cfg.deterministic)
    numerics = decide(device, cfg.precision, cfg.tf32)
    base = QUICK if args.quick else (CUDA_STEPS if device.type == "cuda" else CPU_STEPS)
    steps = args.steps or base["steps"]
    warmup = args.warmup if args.warmup is not None else base["warmup"]
    repeats = base["repeats"]
    batch = args.batch_size or base.get("batch_size", cfg.batch_size)
    share = args.share if args.share is not None else (5 if device.type == "cuda" else 0)
    if min(steps, batch) < 1 or warmup < 0 or share < 0:
        raise MoolaError("--steps and --batch-size must be at least 1, --warmup and --share at least 0")
    window = p.data.window
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    began = time.perf_counter()
    v = versions(device, smi)
    say(f"torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, driver {v['driver']}; device {v['device']}")
    say(f"precision {cfg.precision}: autocast {numerics.record()['autocast_dtype'] or 'off'}, LSTM runs in "
        f"{numerics.lstm_dtype}{', loss scaling' if numerics.grad_scaler else ''}"
        + (f" ({numerics.note})" if numerics.note else ""))
    say(f"TF32 {'on' if numerics.tf32 else 'off'} (pretrain.tf32: {cfg.tf32}): {tf32_state()}")

    # The ceiling runs in the arithmetic the loop really uses for its LSTM.
    bare_precision = numerics.ran if numerics.lstm_in_autocast else "fp32"
    bare = bare_lstm_stepper(batch, window, cfg.hidden_size, device, bare_precision, cfg.learning_rate)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        bare.step()
    bare_rates = time_bare(bare, steps, repeats, device)
    loop_rates, seen = time_loop(exp, batch, steps, repeats, warmup, window, device, p.seed)
    ratio = median(loop_rates) / median(bare_rates)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    say(f"bare LSTM {median(bare_rates):,.0f} samples/s, real loop {median(loop_rates):,.0f} samples/s: "
        f"ratio {ratio:.2f} (target >= {TARGET_RATIO}); LSTM dtype seen in the loop: {seen['lstm_dtype']}"
        + (f"; peak GPU memory {peak:,.0f} MiB" if peak is not None else ""))
    report = {
        "format": REPORT_FORMAT,
        "command": " ".join(["moola doctor", *(argv or [])]),
        "quick": args.quick,
        "machine": machine_info(device) | {"driver": v["driver"], "gpus": v["gpus"]},
        "settings": {"batch_size": batch, "steps": steps, "repeats": repeats, "warmup": warmup, "window": window,
                     "hidden_size": cfg.hidden_size, "threads": torch.get_num_threads(),
                     "precision": cfg.precision, "device": device.type},
        "doctor": {"versions": v, "numerics": seen, "cuda_settings": cuda,
                   "timer": "cuda events" if device.type == "cuda" else "perf_counter"},
        "training": {
            "precision": numerics.ran,
            "bare_lstm": {"samples_per_second": median(bare_rates), "runs": bare_rates},
            "loop": {"samples_per_second": median(loop_rates), "runs": loop_rates},
            "ratio_loop_to_bare": ratio,
            "target_ratio": TARGET_RATIO,
            "target_met": ratio >= TARGET_RATIO,
            "peak_gpu_memory_mib": peak,
        },
    }
    if share:
        run = WorkerRun(device=device.type, batch_size=batch, steps=steps, repeats=repeats, warmup=warmup,
                        precision=bare_precision, threads=cfg.threads, window=window, hidden=cfg.hidden_size,
                        learning_rate=cfg.learning_rate)
        report["share"] = share_device(run, share, median(bare_rates))
        sh = report["share"]
        say(f"--share {share}: {sh['aggregate_samples_per_second']:,.0f} samples/s together "
            f"({sh['aggregate_vs_single']:.2f}x one alone)"
            + (f"; peak GPU memory per worker {sh['peak_memory_mib']} MiB" if sh.get("peak_memory_mib") else ""))
    if device.type == "cpu":
        ran = numerics.ran if numerics.ran in ("fp32", "bf16") else "fp32"
        c = cpu_bf16(exp, device, ran, loop_rates, batch, steps, repeats, warmup, window, p.seed)
        report["doctor"]["cpu_bf16"] = c
        if c["available"]:
            say(f"bf16 on this CPU: available (oneDNN runs the LSTM in bfloat16); real loop at batch {batch}: "
                f"fp32 {c['fp32']['samples_per_second']:,.0f}, bf16 {c['bf16']['samples_per_second']:,.0f} "
                f"samples/s ({c['speedup']:.2f}x; timed in {c['seconds']:.1f} s)")
        else:
            say(f"bf16 on this CPU: not available ({c['why']})")
        say(f"recommended: precision {c['recommended']}: {c['advice']}")
    report["seconds"] = time.perf_counter() - began
    out = Path(args.json) if Path(args.json).is_absolute() else root / args.json
    io.write_json(out, report)
    say(f"wrote {args.json} in {report['seconds']:.1f} s")
    return report


def main(argv: list[str] | None = None) -> None:
    run_main(lambda: run_doctor(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
