"""Training steps on random tensors, timed: the bare LSTM that bounds the pretraining loop, alone or in several
processes sharing one device; random-walk windows for the loop; and the record of the machine they ran on.

The benchmarks' common ground (`python -m benchmarks` and its measure_* modules); not part of the moola package,
which holds no measurement (`moola doctor` runs `python -m benchmarks` for speed). A shared-device worker is this
module run as a process:

    python -m benchmarks.throughput --device cuda --batch-size 2048 --steps 100 ...   # prints one JSON line
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import moola
from moola.device import describe, pick_device
from moola.errors import MoolaError, run_main
from moola.params import FEATURES

REPORT_FORMAT = "moola-bench/1"  # metrics/bench.json, written by python -m benchmarks
DEFAULT_JSON = "metrics/bench.json"
SPEC_EXPERIMENT = "exp1_baseline"  # the shapes measured: its recipe, mask and batch size
TARGET_RATIO = 0.90  # the loop's samples/s as a fraction of the bare LSTM's (issue 8)


def median(values) -> float:
    return float(statistics.median(values))


def sync(device: torch.device) -> None:
    """Wait for queued kernels: an accelerator's clock read is meaningless before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast_args(device: torch.device, precision: str) -> dict:
    """torch.autocast keyword arguments for `precision` (fp32 | bf16 | fp16) on `device`."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return {"device_type": device.type, "dtype": dtype, "enabled": precision != "fp32"}


# --- the machine --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in wanted if f in flags]


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": describe(device),
        "onednn": torch.backends.mkldnn.is_available(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        from moola.doctor import nvidia_smi

        smi = nvidia_smi() or {}
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["driver"], info["gpus"] = smi.get("driver"), smi.get("gpus", [])
    return info


# --- random inputs --------------------------------------------------------------------------------------------


def synthetic_windows(n: int, window: int, seed: int) -> np.ndarray:
    """Random-walk OHLC windows, min-max normalised per window: the loop's input without the pipeline."""
    rng = np.random.default_rng(seed)
    close = np.cumsum(rng.normal(size=(n, window, 1)), axis=1)
    x = close + rng.normal(scale=0.3, size=(n, window, len(FEATURES)))
    low, high = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    return ((x - low) / (high - low)).astype(np.float32)


# --- training steps on random tensors -----------------------------------------------------------------------


class BareLSTM(nn.Module):
    """The ceiling: the pretraining encoder's nn.LSTM and a linear decoder, nothing else."""

    def __init__(self, hidden_size: int, batch_first: bool = True):
        super().__init__()
        self.lstm = nn.LSTM(len(FEATURES), hidden_size, batch_first=batch_first, bidirectional=True)
        self.decoder = nn.Linear(2 * hidden_size, len(FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.lstm(x)[0])


class Stepper:
    """Training steps (forward, loss, backward, AdamW) of one model on fixed random tensors."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], batch: int,
                 device: torch.device, precision: str, learning_rate: float, threads: int | None = None,
                 onednn: bool = True):
        self.model, self.loss, self.batch, self.device = model.to(device), loss, batch, device
        self.autocast = autocast_args(device, precision)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate)
        self.threads, self.onednn = threads, onednn

    def step(self) -> None:
        with torch.autocast(**self.autocast):
            loss = self.loss(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps, under this stepper's own threads and oneDNN setting."""
        previous = torch.get_num_threads()
        if self.threads and self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            with _onednn(self.onednn):
                sync(self.device)
                began = time.perf_counter()
                for _ in range(steps):
                    self.step()
                sync(self.device)
                return time.perf_counter() - began
        finally:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def _onednn(enabled: bool):
    """Switch oneDNN (mkldnn) off for a block; on is the default and needs no switching."""
    if enabled:
        yield
        return
    with warnings.catch_warnings():  # torch warns about TF32 on Intel GPUs whenever the flags are set
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def bare_lstm_stepper(batch: int, window: int, hidden: int, device: torch.device, precision: str, lr: float,
                      threads: int | None = None, onednn: bool = True, time_major: bool = False) -> Stepper:
    generator = torch.Generator().manual_seed(0)
    shape = (window, batch, len(FEATURES)) if time_major else (batch, window, len(FEATURES))
    x = torch.rand(shape, generator=generator).to(device)
    target = torch.rand(shape, generator=generator).to(device)
    model = BareLSTM(hidden, batch_first=not time_major)
    return Stepper(model, lambda m: nn.functional.mse_loss(m(x).float(), target), batch, device, precision, lr,
                   threads, onednn)


# --- bare-LSTM workers sharing one device -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRun:
    """What one worker process times: the bare LSTM at these shapes, `repeats` times `steps` steps."""

    device: str
    batch_size: int
    steps: int
    repeats: int
    warmup: int
    precision: str
    threads: int
    window: int
    hidden: int
    learning_rate: float

    def argv(self) -> list[str]:
        return [arg for f in dataclasses.fields(self) for arg in (_option(f.name), str(getattr(self, f.name)))]


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def worker_main(argv: list[str] | None = None) -> None:
    """One worker: the bare LSTM's median samples/s (and peak GPU memory) as one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(WorkerRun):
        parser.add_argument(_option(f.name), type={"int": int, "float": float}.get(f.type, str), required=True)
    w = WorkerRun(**vars(parser.parse_args(argv)))
    device = pick_device(w.device, key="--device", source=None)
    stepper = bare_lstm_stepper(w.batch_size, w.window, w.hidden, device, w.precision, w.learning_rate, w.threads)
    stepper.run(w.warmup)
    rates = [w.steps * w.batch_size / stepper.run(w.steps) for _ in range(w.repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"samples_per_second": median(rates), "peak_memory_mib": peak}), flush=True)


def start_workers(run: WorkerRun, count: int, env: dict[str, str | None] | None = None,
                  peaks: list | None = None) -> list[float]:
    """`count` worker processes at once; the median samples/s of each. `env` sets (None: unsets) what only a
    process start can, such as OpenMP's wait policy."""
    cmd = [sys.executable, "-m", "benchmarks.throughput", *run.argv()]
    # Whatever the working directory: this checkout's benchmarks/ and the moola this process imported.
    roots = [str(Path(__file__).resolve().parents[1]), str(Path(moola.__file__).resolve().parents[1])]
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
             for _ in range(count)]
    rates = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise MoolaError(f"a throughput worker failed (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
        answer = json.loads(out.strip().splitlines()[-1])
        rates.append(answer["samples_per_second"])
        if peaks is not None:
            peaks.append(answer.get("peak_memory_mib"))
    return rates


def share_device(run: WorkerRun, workers: int, single: float) -> dict:
    """`workers` bare-LSTM processes at once on the same device: the aggregate against one alone (`single`)."""
    peaks: list = []
    rates = start_workers(run, workers, peaks=peaks)
    return {"workers": workers, "per_worker_samples_per_second": rates, "aggregate_samples_per_second": sum(rates),
            "aggregate_vs_single": sum(rates) / single,
            "peak_memory_mib": [None if m is None else round(m, 1) for m in peaks] if any(peaks) else None}


if __name__ == "__main__":
    run_main(worker_main)
