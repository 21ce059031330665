"""`moola doctor`: the CPU path for real (versions, numerics, then the benchmark from the checkout, or the one line
where there is none), and the GPU-box verdict with its inputs faked (an nvidia-smi that lists a GPU, next to this
CPU-only torch). The benchmark's own figures are tests/test_bench.py's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moola.doctor import cuda_verdict
from moola.numerics import probe_lstm_dtype

ROOT = Path(__file__).resolve().parents[1]


def doctor(*args: str, path_prefix: str = "", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DVC_NO_ANALYTICS": "1",
           "PATH": path_prefix + str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([sys.executable, "-m", "moola.cli", "doctor", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def checks_printed(text: str) -> None:
    """Doctor's checks on this CPU, whatever follows them: versions, the LSTM's dtype, TF32 and the bf16 line."""
    assert f"torch {torch.__version__}" in text and "device cpu" in text
    assert "precision fp32: autocast off, LSTM runs in float32" in text
    assert "TF32 off (pretrain.tf32: False)" in text
    bf16_line(text)


def bf16_line(text: str) -> None:
    """On a CPU: whether bf16 runs here, as pretraining decides it."""
    if probe_lstm_dtype(torch.device("cpu"), torch.bfloat16)[0] == "bfloat16":
        assert "bf16 on this CPU: available" in text and "python -m benchmarks.measure_precision" in text
    else:
        assert "bf16 on this CPU: not available" in text


def test_verdict_fails_only_where_a_gpu_is_there_and_torch_cannot_use_it():
    problem = cuda_verdict(True, False, "auto", "2.13.0+cpu", None)
    assert "NVIDIA GPU" in problem and "a CPU-only build" in problem and "would train on the CPU" in problem
    assert "\n" not in problem
    assert "built for CUDA 12.1" in cuda_verdict(True, False, "cuda", "2.1.0", "12.1")
    assert cuda_verdict(True, True, "auto", "2.13.0", "12.8") is None  # all is well
    assert cuda_verdict(False, False, "auto", "2.13.0+cpu", None) is None  # a CPU box: the CPU it is
    assert cuda_verdict(True, False, "cpu", "2.13.0+cpu", None) is None  # asked for the CPU on purpose


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_a_box_with_an_nvidia_gpu_and_a_cpu_torch_fails_in_one_line(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "NVIDIA H100 80GB HBM3, 570.86.15, 81559 MiB"\n')
    smi.chmod(0o755)
    proc = doctor("--quick", "--json", str(tmp_path / "never.json"), path_prefix=str(fake) + os.pathsep)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: this box has an NVIDIA GPU") and len(proc.stderr.strip().splitlines()) == 1
    assert "speed:" not in proc.stdout  # stopped before the benchmark
    assert not (tmp_path / "never.json").exists()


def test_without_the_checkout_the_checks_run_and_one_line_says_where_speed_is_measured(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")  # an installed moola: no benchmarks/ here
    proc = doctor("--quick", "--json", str(tmp_path / "never.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    checks_printed(text)
    speed = [line for line in text.splitlines() if line.startswith("speed:")]
    assert len(speed) == 1 and "`python -m benchmarks`" in speed[0] and "from a checkout" in speed[0]
    assert text.rstrip().endswith(speed[0])
    assert not (tmp_path / "never.json").exists()


@pytest.mark.slow
def test_in_the_checkout_it_runs_the_benchmark_with_its_options(tmp_path):
    out = tmp_path / "bench.json"
    proc = doctor("--quick", "--share", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    checks_printed(text)
    command = f"python -m benchmarks --no-dvc --quick --share 1 --json {out}"
    assert f"speed: $ {command}" in text
    # The benchmark's table, after doctor's lines.
    assert text.index("speed: $") < text.index("1 bare nn.LSTM")
    for row in ("2 pretraining loop", "ratio 2/1", "1 workers sharing", "4 dvc", "skipped"):
        assert row in text, f"{row!r} missing from:\n{text}"
    r = json.loads(out.read_text())
    assert r["format"] == "moola-bench/1" and r["command"] == command
    assert r["dvc"] == {"skipped": "--no-dvc"} and r["share"]["workers"] == 1
    assert r["training"]["lstm_dtype"] == "float32" and r["training"]["ratio_loop_to_bare"] > 0
