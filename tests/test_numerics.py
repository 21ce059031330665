"""moola.numerics: what a run's arithmetic really is, decided by asking torch; the CUDA cases with a faked probe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from moola.models import BiLSTMMaskedAutoencoder
from moola.numerics import apply_cuda_settings, attention_kernels, decide, probe_lstm_dtype

CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU
SRC = Path(__file__).resolve().parents[1] / "src"


def answers(dtype: str, reason: str = ""):
    return lambda device, autocast_dtype: (dtype, reason)


def test_bf16_runs_the_lstm_in_bf16_only_where_cudnn_does():
    real = decide(CUDA, "bf16", False, probe=answers("bfloat16"))
    assert (real.autocast_dtype, real.lstm_in_autocast, real.lstm_dtype, real.grad_scaler) == (
        torch.bfloat16, True, "bfloat16", False)
    # cuDNN's autocast wrapper casts to float16: the LSTM leaves autocast and runs float32, never float16.
    half = decide(CUDA, "bf16", False, probe=answers("float16"))
    assert (half.autocast_dtype, half.lstm_in_autocast, half.lstm_dtype) == (torch.bfloat16, False, "float32")
    assert "float16" in half.note and half.record()["ran"] == "bf16"
    refused = decide(CUDA, "bf16", False, probe=answers("", "no kernel"))
    assert not refused.lstm_in_autocast and "no kernel" in refused.note


def test_fp16_is_float16_with_loss_scaling_and_fp32_is_plain():
    fp16 = decide(CUDA, "fp16", True, probe=answers("float16"))
    assert (fp16.autocast_dtype, fp16.grad_scaler, fp16.lstm_dtype, fp16.tf32) == (torch.float16, True, "float16", True)
    fp32 = decide(CUDA, "fp32", False, probe=answers("never asked"))
    assert (fp32.autocast_dtype, fp32.lstm_dtype, fp32.ran, fp32.tf32) == (None, "float32", "fp32", False)


def test_cpu_runs_bf16_only_where_the_lstm_computes_in_it_else_fp32_with_the_reason():
    """The CPU decision with the probe's answer simulated: oneDNN's refusal (what an AVX2-only EPYC said), an LSTM
    left in float32, and acceptance."""
    cpu = torch.device("cpu")
    refusal = "could not create a primitive descriptor for the LSTM forward propagation primitive"
    refused = decide(cpu, "bf16", True, probe=answers("", refusal))
    assert (refused.ran, refused.autocast_dtype, refused.lstm_dtype, refused.tf32) == ("fp32", None, "float32", False)
    assert refusal in refused.note and "running fp32" in refused.note and refused.why == refused.note
    stays = decide(cpu, "bf16", False, probe=answers("float32"))
    assert stays.ran == "fp32" and "runs in float32" in stays.note
    runs = decide(cpu, "bf16", False, probe=answers("bfloat16"))
    assert (runs.ran, runs.autocast_dtype, runs.lstm_in_autocast, runs.lstm_dtype, runs.grad_scaler) == (
        "bf16", torch.bfloat16, True, "bfloat16", False)
    assert runs.autocast(cpu) == {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": True}
    assert runs.record()["why"] == runs.note and "differ" in runs.note


def test_cpu_fp32_and_fp16_never_ask_the_probe_and_run_fp32():
    cpu = torch.device("cpu")
    for precision in ("fp32", "fp16"):
        n = decide(cpu, precision, True, probe=answers("never asked"))
        assert (n.ran, n.lstm_dtype, n.tf32) == ("fp32", "float32", False)
        assert (n.note == "") == (precision == "fp32")
    assert decide(cpu, "fp32", False).why == "fp32 as asked"
    assert "applies on cuda only" in decide(cpu, "fp16", False).note
    assert "applies on cuda and cpu only" in decide(torch.device("mps"), "bf16", False, probe=answers("x")).note
    assert probe_lstm_dtype(cpu, None) == ("float32", "")
    assert apply_cuda_settings(cpu, True, True) == {"tf32": False, "cudnn_deterministic": None}
    assert isinstance(attention_kernels(cpu, True), type(attention_kernels(cpu, False)))


def test_this_cpu_s_real_answer_decides_and_leaves_the_random_streams_alone():
    """For real: whatever this CPU's oneDNN does with a bf16 LSTM, the decision follows it (bf16 where it computes in
    bfloat16, else fp32 with oneDNN's reason); the probe does not move the caller's random numbers."""
    cpu = torch.device("cpu")
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    found, reason = probe_lstm_dtype(cpu, torch.bfloat16)
    assert torch.equal(torch.rand(3), expected)
    n = decide(cpu, "bf16", False)
    if found == "bfloat16":
        assert (n.ran, n.lstm_dtype, reason) == ("bf16", "bfloat16", "")
    else:
        assert n.ran == "fp32" and n.lstm_dtype == "float32" and (reason or found) in n.note


def test_the_lstm_outside_autocast_computes_in_float32():
    model = BiLSTMMaskedAutoencoder(4, 8, 1, 8)
    x, mask = torch.rand(2, 6, 4), torch.zeros(2, 6, dtype=torch.bool)
    model.lstm_in_autocast = False
    seen = []
    model.encoder.register_forward_hook(lambda m, i, out: seen.append(out[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16  # the decoder stays in autocast


def test_tf32_flags_are_set_through_the_new_api_only():
    """The setters apply on any build (torch's context); reading the legacy cudnn.allow_tf32 afterwards raises in
    torch 2.13, which is why moola never reads it. A fresh process: the flags are global."""
    code = (
        "import torch\nfrom moola.numerics import apply_cuda_settings, tf32_state\n"
        "r = apply_cuda_settings(torch.device('cuda'), False, True)\n"
        "assert r['matmul_fp32_precision'] == 'ieee' and r['cudnn_rnn_fp32_precision'] == 'ieee', r\n"
        "assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark\n"
        "assert tf32_state()['float32_matmul_precision'] == 'highest'\n"
        "r = apply_cuda_settings(torch.device('cuda'), True, True)\n"
        "assert r['cudnn_rnn_fp32_precision'] == 'tf32' and r['matmul_fp32_precision'] == 'tf32', r\n"
        "import os; assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"} | {"PYTHONPATH": str(SRC)}
    # moola.numerics alone does not set the variable; moola.device (imported by every stage) does, at import.
    done = subprocess.run([sys.executable, "-c", "import moola.device\n" + code], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
