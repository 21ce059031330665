"""Where training runs: the best accelerator present, or the one params.yaml asks for."""

from __future__ import annotations

import os

import torch

from moola.errors import ParamsError
from moola.numerics import set_cublas_workspace

# Before anything touches CUDA: cuBLAS reads it once, when CUDA's runtime starts (determinism, moola.numerics).
set_cublas_workspace()


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(
    requested: str = "auto", key: str = "pretrain.device", source: str | None = "params.yaml"
) -> torch.device:
    """"auto" -> cuda, then mps, then cpu; a named device that is absent is a ParamsError naming `key` (and the
    file it came from, `source`; None for a command-line option such as --device)."""
    where = f"{source}: {key}" if source else key
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
    if requested not in available:
        raise ParamsError(f"{where} must be one of auto, cpu, cuda, mps, got {requested!r}")
    if not available[requested]:
        raise ParamsError(f"{where} is '{requested}' but this machine has no {requested} device (use auto or cpu)")
    return torch.device(requested)


def thread_budget(environ=os.environ) -> int | None:
    """MOOLA_THREAD_BUDGET, set by moola parallel for each job: cores / jobs at once (at least 1); None outside."""
    budget = environ.get("MOOLA_THREAD_BUDGET", "")
    return max(1, int(budget)) if budget.isdigit() else None


def use_threads(device: torch.device, threads: int) -> None:
    """Fix torch's CPU threads on the CPU: results then do not depend on the size of the machine (the thread
    count changes the bytes, so it is always the param's). On an accelerator the CPU's threads decide no number:
    a moola parallel job keeps to its budget."""
    if device.type == "cpu":
        torch.set_num_threads(threads)
    elif (budget := thread_budget()) is not None:
        torch.set_num_threads(budget)


def describe(device: torch.device) -> str:
    """The device for a log line: 'cuda (NVIDIA H100 80GB HBM3)', 'mps', 'cpu (2 threads)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    return device.type
