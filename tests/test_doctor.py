"""`moola doctor`: the CPU path for real (versions, numerics, timed bare LSTM and loop, the JSON), and the GPU-box
verdict with its inputs faked (an nvidia-smi that lists a GPU, next to this CPU-only torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moola.doctor import cpu_bf16_advice, cuda_verdict
from moola.numerics import probe_lstm_dtype
from moola.throughput import REPORT_FORMAT

ROOT = Path(__file__).resolve().parents[1]


def doctor(*args: str, path_prefix: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DVC_NO_ANALYTICS": "1",
           "PATH": path_prefix + str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([sys.executable, "-m", "moola.cli", "doctor", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


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
    assert not (tmp_path / "never.json").exists()


@pytest.mark.slow
def test_cpu_path_prints_what_runs_and_writes_bench_json_format(tmp_path):
    out = tmp_path / "bench.json"
    proc = doctor("--quick", "--share", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"torch {torch.__version__}" in text and "device cpu" in text
    assert "precision fp32: autocast off, LSTM runs in float32" in text
    assert "TF32 off (pretrain.tf32: False)" in text
    assert "bare LSTM" in text and "real loop" in text and "ratio" in text and "--share 1:" in text
    r = json.loads(out.read_text())
    assert r["format"] == REPORT_FORMAT and r["command"].startswith("moola doctor --quick")
    t = r["training"]
    assert t["bare_lstm"]["samples_per_second"] > 0 and t["loop"]["samples_per_second"] > 0
    assert len(t["bare_lstm"]["runs"]) == len(t["loop"]["runs"]) == r["settings"]["repeats"]
    assert t["ratio_loop_to_bare"] > 0 and t["precision"] == "fp32"
    assert r["doctor"]["numerics"]["lstm_dtype"] == "float32" and r["doctor"]["timer"] == "perf_counter"
    assert r["doctor"]["versions"]["torch"] == torch.__version__
    assert r["doctor"]["versions"]["cublas_workspace_config"] == ":4096:8"
    assert r["share"]["workers"] == 1 and r["share"]["aggregate_samples_per_second"] > 0
    # On a CPU: whether bf16 runs here (the decision pretraining makes), both loop rates where it does, advice.
    c = r["doctor"]["cpu_bf16"]
    assert c["available"] == (probe_lstm_dtype(torch.device("cpu"), torch.bfloat16)[0] == "bfloat16")
    assert f"recommended: precision {c['recommended']}: {c['advice']}" in text
    if c["available"]:
        assert c["fp32"]["runs"] == t["loop"]["runs"] and len(c["bf16"]["runs"]) == r["settings"]["repeats"]
        assert c["speedup"] == c["bf16"]["samples_per_second"] / c["fp32"]["samples_per_second"]
        assert "bf16 on this CPU: available" in text and "x; timed in" in text
    else:
        assert c["recommended"] == "fp32" and "bf16 on this CPU: not available" in text


def test_cpu_advice_recommends_bf16_only_where_it_runs_and_clearly_pays():
    assert cpu_bf16_advice(False, None, None) == ("fp32", "bf16 does not run on this CPU: keep precision fp32 "
                                                          "(the default)")
    setting, line = cpu_bf16_advice(True, 500.0, 1500.0)
    assert setting == "bf16" and "3.00x" in line and "-S pretrain.precision=bf16" in line
    setting, line = cpu_bf16_advice(True, 500.0, 550.0)
    assert setting == "fp32" and "only 1.10x" in line
