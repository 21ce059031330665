"""What arithmetic a training run really uses: autocast dtype, the LSTM's dtype, TF32, determinism on CUDA.

The LSTM's dtype under autocast is decided by asking torch (a tiny LSTM under the same autocast, and its output's
dtype), never by `torch.cuda.is_bf16_supported()`: cuDNN's autocast wrapper for `_cudnn_rnn` casts input, weights
and hidden state to float16 whatever dtype autocast was given (aten/src/ATen/cudnn/AutocastRNN.cpp,
`_cudnn_rnn_cast_reflatten`: `cached_cast(at::kHalf, ...)`), unless the build's cuDNN path accepts bfloat16.
float16 without loss scaling flushes the encoder's ~1e-7 gradients to zero, so `precision: bf16` never runs the
LSTM in float16: where autocast would, the LSTM runs in float32 outside autocast (the decoder keeps bf16).
`precision: fp16` is float16 on purpose, with torch.amp.GradScaler.

On a CPU, `precision: bf16` is decided the same way: the probe runs a tiny LSTM forward and backward under bf16
autocast. oneDNN builds a bf16 LSTM on some CPUs and not on others (measured: it refused on an AVX2-only AMD EPYC,
"could not create a primitive descriptor for the LSTM forward propagation primitive"; it accepted on an Intel Xeon
with AVX512-BF16 and AMX and on an AMD EPYC Zen 5 with AVX512-BF16). Where it accepts, the whole step runs under
autocast; where it refuses (or the LSTM would not compute in bfloat16), the run is plain fp32, with the fp32
bytes, and says why. fp16 and mps stay fp32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# cuBLAS reads this when CUDA's runtime starts (torch/testing/_internal/common_utils.py, above
# `DeterministicGuard`): it must be in the environment before the first CUDA call. PyTorch's nn.LSTM docs ask
# for it for deterministic cuDNN RNNs too.
CUBLAS_WORKSPACE = ":4096:8"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def set_cublas_workspace(environ=os.environ) -> str:
    """Put CUBLAS_WORKSPACE_CONFIG=:4096:8 into `environ` unless the user set one; returns the value in force."""
    return environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def probe_lstm_dtype(device: torch.device, autocast_dtype: torch.dtype | None, input_size: int = 4) -> tuple[str, str]:
    """(dtype name, "") of a bidirectional LSTM's output under autocast(autocast_dtype) on `device`.

    ("", reason) when the LSTM refuses to run so, forward or backward (oneDNN's CPU LSTM refuses bf16 on some
    CPUs: module docstring). Its own generator: the caller's random streams are not touched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lstm = nn.LSTM(input_size, 8, batch_first=True, bidirectional=True).to(device)
        x = torch.rand(2, 5, input_size).to(device)
    try:
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out, _ = lstm(x)
        out.float().sum().backward()
    except RuntimeError as exc:
        return "", str(exc).strip().splitlines()[0][:160]
    return dtype_name(out.dtype), ""


@dataclass(frozen=True)
class Numerics:
    """The arithmetic of one run, decided once before training; `record()` goes into runtime metrics and
    the checkpoint's hyperparams."""

    precision: str  # what params.yaml asked for
    autocast_dtype: torch.dtype | None  # None: no autocast at all
    lstm_in_autocast: bool  # False: the LSTM runs in float32 with autocast off around it
    grad_scaler: bool  # fp16: loss scaling (GradScaler; unscale_ before clipping)
    lstm_dtype: str  # what the LSTM computes in: float32 | bfloat16 | float16
    tf32: bool  # float32 matmuls and cuDNN LSTM allowed to use TF32 (CUDA only)
    note: str = ""  # why what runs differs from what was asked, if it does (and for bf16 on a CPU, what it means)

    @property
    def why(self) -> str:
        """One line for the records: the note, or that the precision asked is what ran."""
        return self.note or f"{self.precision} as asked"

    @property
    def ran(self) -> str:
        """The precision name that describes what runs (fp32 when autocast is off)."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def autocast(self, device: torch.device) -> dict:
        """torch.autocast keyword arguments."""
        return {"device_type": device.type, "dtype": self.autocast_dtype or torch.float32,
                "enabled": self.autocast_dtype is not None}

    def record(self) -> dict:
        rec = {k: v for k, v in asdict(self).items() if k != "autocast_dtype"}
        rec["autocast_dtype"] = dtype_name(self.autocast_dtype) if self.autocast_dtype else None
        rec["ran"] = self.ran
        rec["why"] = self.why
        return rec


def decide(device: torch.device, precision: str, tf32: bool, probe=probe_lstm_dtype) -> Numerics:
    """The run's numerics for `precision` on `device`; `probe(device, dtype)` answers the LSTM's dtype."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    tf32 = tf32 and device.type == "cuda"
    if precision == "bf16" and device.type == "cpu":
        return _decide_cpu_bf16(device, probe)
    if precision == "fp32" or device.type != "cuda":
        # fp16 without CUDA's loss-scaled path, and anything on mps: fp32, the bytes the project promises.
        where = "cuda and cpu" if precision == "bf16" else "cuda"
        note = "" if precision == "fp32" else f"precision {precision} applies on {where} only; running fp32 on {device.type}"
        return Numerics(precision, None, True, False, "float32", tf32, note)
    dtype = AUTOCAST_DTYPES[precision]
    found, reason = probe(device, dtype)
    if precision == "fp16":
        return Numerics(precision, dtype, True, True, found or "float32", tf32, reason)
    if found == "bfloat16":
        return Numerics(precision, dtype, True, False, "bfloat16", tf32)
    why = f"cuDNN's autocast runs the LSTM in {found}" if found else f"the LSTM refuses bf16 ({reason})"
    return Numerics(
        precision, dtype, False, False, "float32", tf32,
        f"{why}: the LSTM runs in float32 outside autocast, the rest in bf16 (precision fp16 runs it in "
        "float16 with loss scaling)",
    )


def _decide_cpu_bf16(device: torch.device, probe) -> Numerics:
    """bf16 on a CPU: all of the step under autocast where the probe's LSTM computed in bfloat16, else plain fp32
    (not the CUDA fallback of an fp32 LSTM inside bf16 autocast: on a CPU the LSTM is the cost, and fp32 keeps
    the fp32 bytes)."""
    found, reason = probe(device, torch.bfloat16)
    if found == "bfloat16":
        return Numerics("bf16", torch.bfloat16, True, False, "bfloat16", False,
                        "bf16 on cpu: oneDNN runs the LSTM in bfloat16 on this CPU (probed); the weights differ from "
                        "an fp32 run's and may differ on another CPU type")
    why = f"oneDNN refuses a bf16 LSTM on this CPU ({reason})" if not found else (
        f"under bf16 autocast the LSTM runs in {found} on this CPU")
    return Numerics("bf16", None, True, False, "float32", False, f"{why}: running fp32 (the fp32 bytes)")


def apply_cuda_settings(device: torch.device, tf32: bool, deterministic: bool) -> dict:
    """TF32 and cuDNN determinism for a CUDA run, through torch's fp32_precision API only.

    Never reads the legacy `torch.backends.cudnn.allow_tf32`: in torch 2.13 that getter raises once the new
    per-operator flags were set (torch/backends/cudnn/__init__.py, CudnnModule.allow_tf32 -> C++ check).
    Returns what is in force, for the records; on other devices nothing is set.
    """
    if device.type != "cuda":
        return {"tf32": False, "cudnn_deterministic": None}
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.rnn.fp32_precision = precision  # cuDNN RNN's fp32 precision defaults to tf32
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    return {
        "tf32": tf32,
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "cudnn_rnn_fp32_precision": torch.backends.cudnn.rnn.fp32_precision,
        "cudnn_deterministic": deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def tf32_state() -> dict:
    """The TF32 flags as torch reports them now (new API only)."""
    return {
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "cudnn_rnn_fp32_precision": torch.backends.cudnn.rnn.fp32_precision,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def attention_kernels(device: torch.device, deterministic: bool):
    """Context for fine-tuning's attention: on CUDA with determinism asked, SDPA's math kernel only (the flash,
    memory-efficient and cuDNN kernels' backward passes are not deterministic). Elsewhere nothing changes (the
    CPU's bytes stay what they are)."""
    if device.type != "cuda" or not deterministic:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
