"""The pretraining loop at a tiny scale: determinism, divergence, early stopping, and exact resume after a kill."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moola.device import pick_device
from moola.errors import ParamsError, TrainingDiverged
from moola.models import load_encoder_checkpoint, save_encoder_checkpoint
from moola.params import Experiment
from moola.numerics import probe_lstm_dtype
from moola.pretraining import encoder_hyperparams, pretrain
from moola.resume import resume_fingerprint
from moola.stages.pretrain import metrics

SRC = Path(__file__).resolve().parents[1] / "src"

# Shared by the tests and by the driver script the kill test runs in a subprocess.
COMMON = '''
import dataclasses
from pathlib import Path

import numpy as np
import moola
from moola.params import AugmentRecipe, Experiment, load_params

# The repository's params.yaml: every value lives there (the tiny experiment overrides a few).
SPEC = load_params(Path(moola.__file__).resolve().parents[2] / "params.yaml")


def tiny_windows(n, window=24, seed=0):
    """Random-walk OHLC-like windows, min-max normalised per window, float32 (n, window, 4)."""
    rng = np.random.default_rng(seed)
    close = np.cumsum(rng.normal(size=(n, window, 1)), axis=1)
    x = close + rng.normal(scale=0.3, size=(n, window, 4))
    low, high = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    return ((x - low) / (high - low)).astype(np.float32)


def tiny_experiment(epochs=2, mask="patch", **overrides):
    train = dict(hidden_size=8, decoder_hidden=8, batch_size=16, patch_size=4, device="cpu",
                 learning_rate=1e-2, threads=1, resume_every_seconds=0)
    train.update(overrides)
    return Experiment("exp_tiny", mask, dataclasses.replace(SPEC.pretrain, **train), epochs, AugmentRecipe(0.12, 4),
                      "warp12_x4")
'''
exec(COMMON)

DRIVER = COMMON + '''
import sys
from moola.models import save_encoder_checkpoint
from moola.pretraining import encoder_hyperparams, pretrain

out, resume, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
exp = tiny_experiment(epochs=epochs)
result = pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, 7, resume_path=resume, fingerprint="driver")
save_encoder_checkpoint(out, result.model, encoder_hyperparams(exp, 24), result.training)
'''


def quiet(_: str) -> None:
    pass


def train_and_save(path: Path, exp: Experiment, seed: int = 7, **kwargs) -> str:
    kwargs.setdefault("log", quiet)
    result = pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, seed, **kwargs)
    save_encoder_checkpoint(path, result.model, encoder_hyperparams(exp, 24), result.training)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mask", ["random", "block", "patch"])
def test_same_params_same_encoder_bytes(tmp_path, mask):
    exp = tiny_experiment(mask=mask)
    first = train_and_save(tmp_path / "a.pt", exp)
    assert first == train_and_save(tmp_path / "b.pt", exp)
    assert first != train_and_save(tmp_path / "c.pt", exp, seed=8)


def test_result_reports_history_and_best_epoch(tmp_path):
    lines: list[str] = []
    result = pretrain(tiny_windows(64), tiny_windows(12, seed=1), tiny_experiment(epochs=3), 7, log=lines.append)
    assert [e for e, _, _ in result.history] == [1, 2, 3]
    assert all(np.isfinite([t for _, t, _ in result.history] + [v for _, _, v in result.history]))
    assert result.best_val_loss == min(v for _, _, v in result.history)
    assert result.history[result.best_epoch - 1][2] == result.best_val_loss
    assert (result.train_samples, result.val_samples, result.batches_per_epoch) == (64, 12, 4)
    assert len(lines) == 3 and "epoch 1/3" in lines[0] and "val loss" in lines[0] and "samples/s" in lines[0]
    assert result.history[-1][2] < result.history[0][2]  # it learns


def test_non_finite_loss_stops_training_with_one_line(tmp_path):
    # An absurd learning rate throws the weights to ~1e30 after one step: the squared error overflows.
    exp = tiny_experiment(learning_rate=1e30)
    resume = tmp_path / "resume.pt"
    with pytest.raises(TrainingDiverged) as err:
        pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, 7, log=quiet, resume_path=resume)
    message = str(err.value)
    assert "exp_tiny" in message and "epoch 1" in message and "\n" not in message
    assert not resume.exists()


def test_early_stopping(tmp_path):
    # A learning rate far below float32 resolution leaves the weights unchanged: no epoch beats the first.
    result = pretrain(
        tiny_windows(64), tiny_windows(12, seed=1),
        tiny_experiment(epochs=6, learning_rate=1e-30, early_stopping_patience=2), 7, log=quiet,
    )
    assert result.epochs_run == 3 and result.best_epoch == 1 and result.epochs_planned == 6


def test_resume_from_a_checkpoint_and_discard_a_stale_one(tmp_path):
    exp = tiny_experiment(epochs=3)
    reference = train_and_save(tmp_path / "ref.pt", exp)
    resume = tmp_path / "resume" / "exp_tiny.pt"
    # A run with 2 of the same 3 epochs leaves the state of epoch 2 behind (as a killed run would).
    two = tiny_experiment(epochs=3)
    two = dataclasses.replace(two, epochs=2)
    pretrain(tiny_windows(64), tiny_windows(12, seed=1), two, 7, log=quiet, resume_path=resume, fingerprint="f")
    assert torch.load(resume, weights_only=True)["epoch"] == 2
    lines: list[str] = []
    assert train_and_save(tmp_path / "resumed.pt", exp, resume_path=resume, fingerprint="f", log=lines.append) == reference
    assert any("Resuming" in line and "epoch 2" in line for line in lines)
    assert sum("epoch 3/3" in line for line in lines) == 1 and not any("epoch 2/3" in line for line in lines)
    # Another fingerprint (other params or data): the checkpoint is discarded and training starts over.
    lines.clear()
    assert train_and_save(tmp_path / "fresh.pt", exp, resume_path=resume, fingerprint="other", log=lines.append) == reference
    assert any("Discarding stale" in line for line in lines) and any("epoch 1/3" in line for line in lines)


def test_fingerprint_changes_with_params_and_data():
    exp = tiny_experiment()
    base = resume_fingerprint(exp, 7, {"a": "1:x"}, "cpu")
    assert base == resume_fingerprint(tiny_experiment(), 7, {"a": "1:x"}, "cpu")
    assert base != resume_fingerprint(tiny_experiment(learning_rate=0.02), 7, {"a": "1:x"}, "cpu")
    assert base != resume_fingerprint(exp, 8, {"a": "1:x"}, "cpu")
    assert base != resume_fingerprint(exp, 7, {"a": "1:y"}, "cpu")


def run_driver(tmp_path: Path, out: Path, resume: Path, epochs: int) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [sys.executable, str(driver), str(out), str(resume), str(epochs)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_killed_run_resumes_to_identical_bytes(tmp_path):
    epochs = 40
    resume = tmp_path / "resume" / "exp_tiny.pt"
    killed = run_driver(tmp_path, tmp_path / "never.pt", resume, epochs)
    deadline = time.monotonic() + 120
    while not resume.exists():  # the checkpoint of epoch 1 appears
        assert killed.poll() is None, killed.stdout.read()
        assert time.monotonic() < deadline, "no resume checkpoint within 120 s"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "never.pt").exists()
    done = torch.load(resume, weights_only=True)["epoch"]
    assert 1 <= done < epochs

    resumed = run_driver(tmp_path, tmp_path / "resumed.pt", resume, epochs)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"Resuming from {resume}: epoch {done} done" in output
    assert f"epoch {done + 1}/{epochs}" in output and f"epoch {done}/{epochs}:" not in output

    # The uninterrupted run, in this process: also shows that the bytes do not depend on the process.
    exp = tiny_experiment(epochs=epochs)
    result = pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, 7, log=quiet)
    save_encoder_checkpoint(tmp_path / "straight.pt", result.model, encoder_hyperparams(exp, 24), result.training)
    assert (tmp_path / "resumed.pt").read_bytes() == (tmp_path / "straight.pt").read_bytes()
    assert load_encoder_checkpoint(tmp_path / "resumed.pt", expect_hidden=8).hyperparams["window"] == 24


# Recorded with the per-batch loop of commit 5bd7bb5 (masks drawn per batch, loss.item() per step, boolean-mask
# indexing), before the loop stopped waiting on the host: sha256 over the best encoder's state_dict (name, then
# tensor bytes, in state_dict order) and every epoch's losses as float.hex(). 70 windows in batches of 16: the
# last batch is partial. The same values came out with threads=2.
#
# fp32 bytes are promised per CPU type (docs/guarantees.md): oneDNN and MKL pick their kernels by the CPU, so the
# last bits differ between CPU types. Two sets are recorded. Set "a" is 5bd7bb5's, first recorded on an AMD EPYC with
# AVX2 only; an Intel Xeon with AVX512-BF16 and AMX (torch capability AVX512) gave the same bytes on 2026-12-06.
# Set "b" was recorded on an AMD EPYC Zen 5 (avx512f, avx512_bf16, no AMX) from this loop, after checking that the
# code of 727dd06 gives the same bytes there (the loop is unchanged since); a Zen 4 gave them too. Torch's CPU
# capability alone does not tell the two apart (the Xeon and the Zens all say AVX512): the CPU's vendor with it does.
REFERENCES = {
    "a": {
        "random": ("970f8978bb02eef7529173bacdf7f59a59936b1b4213a30ebdcc7a20cb6402bf",
          [
            (1, '0x1.ce9c3d8af8af9p-2', '0x1.6ac92e0000000p-2'),
            (2, '0x1.0bff41ccccccdp-2', '0x1.6883800000000p-3'),
            (3, '0x1.127a750000000p-3', '0x1.94d7ae0000000p-4'),
          ]),
        "block": ("0a4568901e7b3cf91eff9897a7c5c6817b55598ea804cef284617864fe4261ef",
          [
            (1, '0x1.f5c115e2be2bep-2', '0x1.8826420000000p-2'),
            (2, '0x1.32c6475f15f16p-2', '0x1.70c5c20000000p-3'),
            (3, '0x1.2b8d83c57c57cp-3', '0x1.5ecfb00000000p-4'),
          ]),
        "patch": ("41bff06965755fe9c2933fb354ab7906fb1c732ef95e37fc412fb3c243516477",
          [
            (1, '0x1.d6004e3a83a84p-2', '0x1.6545d60000000p-2'),
            (2, '0x1.152bc4ea0ea0fp-2', '0x1.6c50f60000000p-3'),
            (3, '0x1.26bd11ccccccdp-3', '0x1.abfeea0000000p-4'),
          ]),
    },
    "b": {
        "random": ("693658f05d8a1704ce36db9e45da4e04a37394dff7a26c7c12e3c15918b2dcd5",
          [
            (1, '0x1.ce9c3db6db6dbp-2', '0x1.6ac92e0000000p-2'),
            (2, '0x1.0bff41ccccccdp-2', '0x1.6883820000000p-3'),
            (3, '0x1.127a752be2be3p-3', '0x1.94d7ae0000000p-4'),
          ]),
        "block": ("f56bae0020fb6737bb010bda016558601e89fdc1bb66cb08f626c81edf3c4d46",
          [
            (1, '0x1.f5c115e2be2bep-2', '0x1.8826420000000p-2'),
            (2, '0x1.32c646ea0ea0fp-2', '0x1.70c5c20000000p-3'),
            (3, '0x1.2b8d835075075p-3', '0x1.5ecfb00000000p-4'),
          ]),
        "patch": ("fa790ba6f48270c312d5c3b675c9899a3e525fadc82f52e1df450dc64d270f7f",
          [
            (1, '0x1.d6004e3a83a84p-2', '0x1.6545d60000000p-2'),
            (2, '0x1.152bc50ea0ea1p-2', '0x1.6c50f60000000p-3'),
            (3, '0x1.26bd1241d41d4p-3', '0x1.abfeea0000000p-4'),
          ]),
    },
}
# (CPU vendor, torch CPU capability) -> the set its fp32 runs give.
CPU_TYPES = {
    ("AuthenticAMD", "AVX2"): "a",
    ("GenuineIntel", "AVX512"): "a",
    ("AuthenticAMD", "AVX512"): "b",
}


def cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


CPU_TYPE = (cpu_vendor(), torch.backends.cpu.get_cpu_capability())


def reference(mask: str) -> tuple[str, list]:
    """This CPU type's recorded bytes; a type with none recorded fails (naming it) rather than pass silently:
    record its set from a checkout whose loop is unchanged (or map it to a set it gives, in CPU_TYPES)."""
    if CPU_TYPE not in CPU_TYPES:
        pytest.fail(f"no fp32 reference bytes recorded for CPU type {CPU_TYPE!r} (vendor, torch CPU capability; "
                    f"recorded: {', '.join(map(str, CPU_TYPES))}): record this machine's set in "
                    f"tests/test_pretraining.py", pytrace=False)
    return REFERENCES[CPU_TYPES[CPU_TYPE]][mask]


def encoder_digest(model) -> str:
    sha = hashlib.sha256()
    for name, tensor in model.encoder.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


@pytest.mark.parametrize("mask", sorted(REFERENCES["a"]))
def test_weights_and_losses_match_the_per_batch_loop_s_reference(mask):
    result = pretrain(tiny_windows(70), tiny_windows(12, seed=1), tiny_experiment(epochs=3, mask=mask), 7, log=quiet)
    digest, history = reference(mask)
    assert [(e, t.hex(), v.hex()) for e, t, v in result.history] == list(history)
    assert encoder_digest(result.model) == digest
    assert result.numerics["lstm_dtype"] == "float32" and result.numerics["tf32"] is False


def test_masks_drawn_an_epoch_ahead_in_a_thread_give_the_same_bytes_and_resume_exactly(tmp_path):
    """What an accelerator does (the next epoch's masks drawn while this one trains), run on the CPU: the same
    weights and losses as the reference, and the generator state saved at the epoch boundary resumes exactly."""
    exp = tiny_experiment(epochs=3, mask="random")
    ahead = pretrain(tiny_windows(70), tiny_windows(12, seed=1), exp, 7, log=quiet, masks_ahead=True)
    digest, history = reference("random")
    assert [(e, t.hex(), v.hex()) for e, t, v in ahead.history] == list(history)
    assert encoder_digest(ahead.model) == digest
    resume = tmp_path / "resume.pt"
    two = dataclasses.replace(exp, epochs=2)
    pretrain(tiny_windows(70), tiny_windows(12, seed=1), two, 7, log=quiet, resume_path=resume, fingerprint="f",
             masks_ahead=True)
    resumed = pretrain(tiny_windows(70), tiny_windows(12, seed=1), exp, 7, log=quiet, resume_path=resume,
                       fingerprint="f", masks_ahead=True)
    assert resumed.history == ahead.history and encoder_digest(resumed.model) == digest


def test_resume_checkpoint_cadence(tmp_path):
    resume = tmp_path / "resume.pt"
    every_two = tiny_experiment(epochs=3, resume_every_epochs=2, resume_every_seconds=0)
    four = dataclasses.replace(every_two, epochs=5)
    pretrain(tiny_windows(64), tiny_windows(12, seed=1), four, 7, log=quiet, resume_path=resume, fingerprint="f")
    assert torch.load(resume, weights_only=True)["epoch"] == 4  # after epochs 2 and 4, not 5
    resume.unlink()
    # Not yet 10 minutes since the start: no checkpoint at all.
    slow = tiny_experiment(epochs=3, resume_every_epochs=1, resume_every_seconds=600)
    pretrain(tiny_windows(64), tiny_windows(12, seed=1), slow, 7, log=quiet, resume_path=resume, fingerprint="f")
    assert not resume.exists()


def test_lstm_outside_autocast_and_loss_scaling_train_and_resume(tmp_path, monkeypatch):
    """The CUDA-only paths, run on the CPU: bf16 autocast with the LSTM kept in float32 (what `precision: bf16`
    does where cuDNN would run float16), with GradScaler, unscale_ before clipping, its state resumed."""
    from moola import pretraining
    from moola.numerics import Numerics

    numerics = Numerics("bf16", torch.bfloat16, False, True, "float32", False, "test")
    monkeypatch.setattr(pretraining, "decide", lambda *a, **k: numerics)
    exp = tiny_experiment(epochs=3)
    straight = pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, 7, log=quiet)
    assert straight.numerics["lstm_dtype"] == "float32" and straight.precision == "bf16"
    assert straight.history[-1][2] < straight.history[0][2]
    two = dataclasses.replace(exp, epochs=2)
    resume = tmp_path / "resume.pt"
    pretrain(tiny_windows(64), tiny_windows(12, seed=1), two, 7, log=quiet, resume_path=resume, fingerprint="f")
    assert torch.load(resume, weights_only=True)["scaler"]["scale"] > 0
    resumed = pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, 7, log=quiet, resume_path=resume,
                       fingerprint="f")
    assert resumed.history == straight.history
    assert encoder_digest(resumed.model) == encoder_digest(straight.model)


def test_an_lstm_seen_in_float16_without_loss_scaling_is_refused(monkeypatch):
    # The probe is the guard; the output's dtype, read in the first epoch, is the check that it held.
    from moola import pretraining

    monkeypatch.setattr(pretraining, "dtype_name", lambda dtype: "float16")
    with pytest.raises(ParamsError, match="pretrain.precision fp32: the LSTM ran in float16 without loss scaling"):
        pretrain(tiny_windows(64), tiny_windows(12, seed=1), tiny_experiment(epochs=1), 7, log=quiet)


REFUSAL = "could not create a primitive descriptor for the LSTM forward propagation primitive"
BF16_HERE = probe_lstm_dtype(torch.device("cpu"), torch.bfloat16)[0] == "bfloat16"


def refusing_cpu(device, autocast_dtype):
    """The probe's answer on a CPU whose oneDNN refuses a bf16 LSTM (what an AVX2-only AMD EPYC said)."""
    return ("", REFUSAL) if autocast_dtype is not None else ("float32", "")


def test_bf16_where_the_cpu_refuses_it_and_fp16_on_a_cpu_run_fp32_with_its_bytes(tmp_path):
    fp32 = train_and_save(tmp_path / "fp32.pt", tiny_experiment())
    lines: list[str] = []
    exp = tiny_experiment(precision="bf16")
    assert train_and_save(tmp_path / "bf16.pt", exp, probe=refusing_cpu, log=lines.append) == fp32
    assert lines[0] == f"exp_tiny: oneDNN refuses a bf16 LSTM on this CPU ({REFUSAL}): running fp32 (the fp32 bytes)"
    assert train_and_save(tmp_path / "fp16.pt", tiny_experiment(precision="fp16")) == fp32
    result = pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, 7, log=quiet, probe=refusing_cpu)
    m = metrics(result, exp)
    assert (m["precision"], m["precision_asked"], m["lstm_dtype"]) == ("fp32", "bf16", "float32")
    assert REFUSAL in m["precision_why"]


@pytest.mark.skipif(BF16_HERE, reason="this CPU runs the LSTM in bf16 (its refusal is simulated above)")
def test_bf16_on_a_cpu_that_refuses_it_for_real_runs_fp32(tmp_path):
    lines: list[str] = []
    fp32 = train_and_save(tmp_path / "fp32.pt", tiny_experiment())
    assert train_and_save(tmp_path / "bf16.pt", tiny_experiment(precision="bf16"), log=lines.append) == fp32
    assert "running fp32 (the fp32 bytes)" in lines[0]


@pytest.mark.skipif(not BF16_HERE, reason="this CPU's oneDNN does not run the LSTM in bf16 (see the fallback tests)")
def test_bf16_on_a_cpu_that_runs_it_trains_is_deterministic_and_resumes_exactly(tmp_path):
    exp = tiny_experiment(epochs=3, precision="bf16")
    lines: list[str] = []
    runs = []
    for name, log in (("a", lines.append), ("b", quiet)):
        result = pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, 7, log=log)
        save_encoder_checkpoint(tmp_path / f"{name}.pt", result.model, encoder_hyperparams(exp, 24, result.numerics),
                                result.training)
        runs.append(result)
    a, b = runs
    assert (a.precision, a.numerics["lstm_dtype"], a.numerics["autocast_dtype"]) == ("bf16", "bfloat16", "bfloat16")
    assert lines[0].startswith("exp_tiny: bf16 on cpu: oneDNN runs the LSTM in bfloat16")
    assert a.history[-1][1] < a.history[0][1] and a.history[-1][2] < a.history[0][2]  # it trains
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes() and a.history == b.history
    fp32 = pretrain(tiny_windows(64), tiny_windows(12, seed=1), tiny_experiment(epochs=3), 7, log=quiet)
    assert encoder_digest(fp32.model) != encoder_digest(a.model)  # bf16 is not fp32's bytes
    m = metrics(a, exp)
    assert (m["precision"], m["precision_asked"], m["lstm_dtype"]) == ("bf16", "bf16", "bfloat16")
    two = dataclasses.replace(exp, epochs=2)
    resume = tmp_path / "resume.pt"
    pretrain(tiny_windows(64), tiny_windows(12, seed=1), two, 7, log=quiet, resume_path=resume, fingerprint="f")
    resumed = pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, 7, log=quiet, resume_path=resume,
                       fingerprint="f")
    assert resumed.history == a.history and encoder_digest(resumed.model) == encoder_digest(a.model)


def test_device_choice():
    auto = pick_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert auto.type == expected and pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match="finetune.device is 'cuda' but this machine has no cuda device"):
            pick_device("cuda", key="finetune.device")
