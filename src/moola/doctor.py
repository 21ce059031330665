"""`moola doctor`: a GPU box's first minute. Will `device: auto` use the GPU, in what arithmetic, and how fast?

    moola doctor                 # versions, the CUDA verdict, the LSTM's real dtype, TF32; then the benchmark
    moola doctor --quick         # the benchmark at tiny shapes (the CPU test)
    moola doctor --share 5 --json metrics/bench.json

Fails with one line, before anything else, when the box has an NVIDIA GPU (nvidia-smi lists one) but torch
cannot use CUDA: `device: auto` would quietly train on the CPU (an image whose torch is too old for moola pulls
a PyPI torch at `pip install -e .` that may not match the driver). On a CPU it also says whether `precision: bf16`
runs there (moola.numerics decides, by running a tiny LSTM).

How fast is the benchmark's to measure, not the package's: where the repository's checkout has benchmarks/ (a GPU
box runs from the checkout), doctor then runs `python -m benchmarks --no-dvc` there, passing on --quick, --steps,
--warmup, --batch-size, --share and --json: the bare LSTM against the real loop and their ratio, workers sharing
the device, prepare and augment, fine-tuning and the full-spec estimate (a few minutes at the spec's shapes, well
under one with --quick); it prints its table and writes metrics/bench.json. Where there is no benchmarks/ (an
installed moola), doctor says so in one line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from moola.device import describe, pick_device, use_threads
from moola.errors import MoolaError, run_main
from moola.numerics import apply_cuda_settings, decide, tf32_state
from moola.params import load_params

# The settings checked: those of the experiment the benchmark times (exp1_baseline is pretrain's defaults).
EXPERIMENT = "exp1_baseline"
# Passed on to the benchmark as they are given (its own defaults otherwise: 5 workers sharing a GPU, for one).
PASSED_ON = ("steps", "warmup", "batch_size", "share", "json")


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


def benchmark_command(args: argparse.Namespace) -> list[str]:
    """`python -m benchmarks` for the speed: all but its DVC timings, with doctor's options passed on."""
    cmd = [sys.executable, "-m", "benchmarks", "--no-dvc", *(["--quick"] if args.quick else [])]
    for name in PASSED_ON:
        value = getattr(args, name)
        if value is not None:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


def measure_speed(args: argparse.Namespace, root: Path, say) -> dict:
    """The benchmark, run from the checkout at `root` when it has benchmarks/; one line saying where it is if not.
    A failing benchmark has printed its own error: doctor then exits with its code."""
    if not (root / "benchmarks" / "__main__.py").is_file():
        say(f"speed: not measured here ({(root / 'benchmarks').resolve()} is absent): `python -m benchmarks` "
            "measures it, from a checkout of the repository")
        return {"measured": False}
    cmd = benchmark_command(args)
    say("speed: $ " + " ".join(["python", *cmd[1:]]))
    # The moola this process runs, whatever PYTHONPATH says.
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": package_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = subprocess.run(cmd, cwd=root, env=env).returncode
    if code != 0:
        raise SystemExit(code)
    return {"measured": True, "command": cmd[1:]}


def run_doctor(argv: list[str] | None = None, root: Path = Path(".")) -> dict:
    parser = argparse.ArgumentParser(prog="moola doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the benchmark at tiny shapes, a few steps (the CPU test)")
    parser.add_argument("--steps", type=int, help="the benchmark's timed steps per repeat (its default: 20 on cuda)")
    parser.add_argument("--warmup", type=int, help="the benchmark's untimed steps first (its default: 20 on cuda)")
    parser.add_argument("--batch-size", type=int, help="the benchmark's batch (its default: pretrain.batch_size)")
    parser.add_argument("--share", type=int, help="workers sharing the device at once (its default: 5 on cuda, else 0)")
    parser.add_argument("--json", help="where the benchmark writes (its default metrics/bench.json)")
    args = parser.parse_args(argv)

    p = load_params(root / "params.yaml")
    cfg = p.experiment(EXPERIMENT).train
    smi = nvidia_smi()
    problem = cuda_verdict(smi is not None and bool(smi["gpus"]), torch.cuda.is_available(), cfg.device,
                           torch.__version__, torch.version.cuda)
    if problem:
        raise MoolaError(problem)
    device = pick_device(cfg.device)
    use_threads(device, cfg.threads)
    cuda = apply_cuda_settings(device, cfg.tf32, cfg.deterministic)
    numerics = decide(device, cfg.precision, cfg.tf32)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    v = versions(device, smi)
    say(f"torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, driver {v['driver']}; device {v['device']}")
    say(f"precision {cfg.precision}: autocast {numerics.record()['autocast_dtype'] or 'off'}, LSTM runs in "
        f"{numerics.lstm_dtype}{', loss scaling' if numerics.grad_scaler else ''}"
        + (f" ({numerics.note})" if numerics.note else ""))
    say(f"TF32 {'on' if numerics.tf32 else 'off'} (pretrain.tf32: {cfg.tf32}): {tf32_state()}")
    found = {"versions": v, "numerics": numerics.record(), "cuda_settings": cuda}
    if device.type == "cpu":
        bf16 = decide(device, "bf16", False)
        found["cpu_bf16"] = {"available": bf16.ran == "bf16", "why": bf16.why}
        if bf16.ran == "bf16":
            say("bf16 on this CPU: available (oneDNN runs the LSTM in bfloat16); whether it pays here: "
                "`python -m benchmarks.measure_precision` (from a checkout)")
        else:
            say(f"bf16 on this CPU: not available ({bf16.why})")
    found["speed"] = measure_speed(args, root, say)
    return found


def main(argv: list[str] | None = None) -> None:
    run_main(lambda: run_doctor(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
