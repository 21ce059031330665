"""The harness: settings from the command line, repeats timed with perf_counter, and what the machine can run."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import benchmarks
from benchmarks.throughput import DEFAULT_JSON, autocast_args
from moola.device import pick_device
from moola.errors import MoolaError
from moola.params import FEATURES, Params

QUICK = dict(batch_size=32, steps=2, repeats=2, warmup=1, windows_scale=0.01, data_repeats=1)
# On CUDA a step takes milliseconds: more steps per timing and more warm-up (cuDNN sets up its kernels), fewer
# repeats. 20 steps of the spec's batch 2048 fit the spec's augmented training split (47,490 samples).
CUDA = dict(steps=20, repeats=3, warmup=20)


@dataclass(frozen=True)
class Settings:
    batch_size: int
    steps: int  # timed training steps per repeat
    repeats: int
    warmup: int  # untimed steps first (oneDNN / cuDNN set up their kernels on the first call)
    windows_scale: float  # of data.unlabeled_windows for prepare, augment and the DVC repository (1.0 = spec)
    data_repeats: int
    threads: int
    precision: str  # asked for; the loop decides what runs (moola.numerics: bf16 on cuda, or a CPU that runs it)
    device: torch.device
    dvc: bool
    tries: bool
    share: int  # concurrent workers for the shared-device measurement (0 = skip)
    quick: bool


def parse_args(argv: list[str] | None, p: Params) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a sanity run in seconds")
    parser.add_argument("--tries", action="store_true", help="also bf16, oneDNN off, threads, layout, batch sizes")
    parser.add_argument("--no-dvc", action="store_true", help="skip the DVC timings (item 4)")
    parser.add_argument("--batch-size", type=int, help=f"default: pretrain.batch_size ({p.pretrain.batch_size})")
    parser.add_argument("--steps", type=int, help="timed training steps per repeat (default 2; 20 on cuda)")
    parser.add_argument("--repeats", type=int, help="repeats, the median is reported (default 5; 3 on cuda)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 1; 20 on cuda)")
    parser.add_argument("--windows-scale", type=float, help="of the spec's windows for items 3 and 4 (default 1)")
    parser.add_argument("--device", default=p.pretrain.device, help="auto | cpu | cuda | mps (default: params)")
    parser.add_argument("--precision", default=p.pretrain.precision, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=p.pretrain.threads, help="torch CPU threads")
    parser.add_argument("--share", type=int, help="concurrent workers on one device (default: 5 on cuda, else 0)")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    device = pick_device(args.device, key="--device", source=None)
    base = QUICK if args.quick else dict(batch_size=p.pretrain.batch_size, steps=2, repeats=5, warmup=1,
                                         windows_scale=1.0, data_repeats=3) | (CUDA if device.type == "cuda" else {})

    def pick(name):
        value = getattr(args, name, None)
        return base[name] if value is None else value

    settings = Settings(
        batch_size=pick("batch_size"), steps=pick("steps"), repeats=pick("repeats"), warmup=pick("warmup"),
        windows_scale=pick("windows_scale"), data_repeats=base["data_repeats"], threads=args.threads,
        precision=args.precision, device=device, dvc=not args.no_dvc, tries=args.tries,
        share=args.share if args.share is not None else (5 if device.type == "cuda" else 0), quick=args.quick,
    )
    for name in ("batch_size", "steps", "repeats", "threads"):
        if getattr(settings, name) < 1:
            raise MoolaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.warmup < 0 or settings.share < 0:
        raise MoolaError("--warmup and --share must be at least 0")
    if not 0 < settings.windows_scale <= 1:
        raise MoolaError(f"--windows-scale must be in (0, 1], got {settings.windows_scale}")
    return settings, args


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    """Seconds of each of `repeats` calls, and the last call's result."""
    runs, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - began)
    return runs, result


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether a bidirectional LSTM trains in bf16 under bf16 autocast here; the reason when it does not.

    Asked of the LSTM itself (its output's dtype), never of torch.cuda.is_bf16_supported(): cuDNN's autocast
    wrapper may run it in float16 on a GPU that supports bf16 (moola.numerics)."""
    from moola.numerics import probe_lstm_dtype

    found, reason = probe_lstm_dtype(device, torch.bfloat16)
    if found and found != "bfloat16":
        return False, f"under bf16 autocast the LSTM runs in {found}"
    try:
        lstm = nn.LSTM(len(FEATURES), 8, batch_first=True, bidirectional=True).to(device)
        with torch.autocast(**autocast_args(device, "bf16")):
            out, _ = lstm(torch.rand(2, 5, len(FEATURES), device=device))
        out.float().sum().backward()
    except RuntimeError as exc:  # oneDNN: "could not create a primitive descriptor for the LSTM ..."
        return False, str(exc).strip().splitlines()[0][:160]
    return True, ""
