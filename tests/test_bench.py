"""The benchmark harness (benchmarks/, outside the package) at tiny shapes: its table, its JSON and its helpers
(structure and sanity, not timings), and that it times the data the stages make.

The one test module that imports benchmarks/: it puts the repository root on sys.path itself (the rest of the
suite never imports it)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_repo, run
from moola.augmentation import augment_windows
from moola.params import ScaleParams, load_params
from moola.windows import cut_windows, normalise

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import harness, measure_data, measure_precision, measure_training, report, throughput  # noqa: E402


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """python -m benchmarks from the repository root, as BENCHMARKS.md runs it."""
    return run([sys.executable, "-m", "benchmarks", *args], ROOT, check=False)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


@pytest.mark.integration
@pytest.mark.slow
def test_quick_run_prints_the_table_and_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--quick", "--share", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    for row in ("1 bare nn.LSTM", "2 pretraining loop", "ratio 2/1", "3 prepare", "augment warp12_x4",
                "per-window Python loop", "4 dvc repro prepare augment, no-op", "dvc status",
                "fine-tuning, one fold", "1 workers sharing", "Full-spec `dvc repro`", "pretrain@exp3_aggressive"):
        assert row in table, f"{row!r} missing from:\n{table}"

    r = json.loads(out.read_text())
    assert r["format"] == throughput.REPORT_FORMAT and r["quick"] is True
    assert r["command"].startswith("python -m benchmarks --quick")
    m = r["machine"]
    assert m["torch"] == torch.__version__ and m["cpu"] and positive(m["cpu_cores"]) and m["device"].startswith("cpu")
    assert len(m["load_average_at_start"]) == 3 and len(m["load_average_at_end"]) == 3
    bf16 = harness.bf16_support(torch.device("cpu"))
    assert m["bf16_autocast_lstm"] == (True if bf16[0] else f"no: {bf16[1]}")

    t = r["training"]
    for key in ("bare_lstm", "model", "loop"):
        assert positive(t[key]["samples_per_second"]) and len(t[key]["runs"]) == r["settings"]["repeats"]
        assert all(positive(x) for x in t[key]["runs"])
    assert positive(t["ratio_loop_to_bare"]) and positive(t["ratio_loop_to_model"])
    assert t["precision"] == "fp32" and t["lstm_dtype"] == "float32" and isinstance(t["target_met"], bool)
    assert t["peak_gpu_memory_mib"] is None and r["settings"]["tf32"] is False
    assert t["loop"]["validation_windows"] > 0 and positive(t["loop"]["validation_and_setup_seconds"])

    d = r["data"]
    for key in ("vectorised_windows_per_second", "per_window_loop_windows_per_second", "speedup"):
        assert positive(d["windowing"][key]) and positive(d["augment"][key])
    assert d["augment"]["windows_made"] == 4 * d["augment"]["train_windows"]
    assert positive(d["prepare"]["windows_per_second"])

    v = r["dvc"]
    assert positive(v["noop_repro_seconds"]) and positive(v["status_seconds"]) and positive(v["build_seconds"])
    assert v["output_bytes"] > 0 and v["dvc"].startswith("3.")

    assert positive(r["finetune"]["seconds_per_epoch"])
    assert r["share"]["workers"] == 1 and positive(r["share"]["aggregate_samples_per_second"])

    e = r["estimate"]
    assert set(e["experiments"]) == set(load_params(ROOT / "params.yaml").experiments)
    exp1 = e["experiments"]["exp1_baseline"]
    assert exp1["epochs"] == 75 and exp1["train_samples"] == 47_490  # the spec, whatever was measured
    assert positive(e["total_seconds"]) and e["total_seconds"] > e["pretrain_seconds"]
    assert e["finetune_fold_runs"] == 5 * 3 * (3 + 5)  # three network inits, five ablation encoders


@pytest.mark.slow
def test_absent_device_is_a_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_bench("--device", "cuda", "--json", "/nonexistent/never-written.json")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --device is 'cuda' but this machine has no cuda device (use auto or cpu)"]
    proc = run_bench("--device", "tpu")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --device must be one of auto, cpu, cuda, mps, got 'tpu'"]


def test_dtype_handling_for_every_device_type():
    for kind in ("cpu", "cuda", "mps"):  # pure arguments: no device needed to build them
        device = torch.device(kind)
        assert throughput.autocast_args(device, "bf16") == {"device_type": kind, "dtype": torch.bfloat16,
                                                            "enabled": True}
        assert throughput.autocast_args(device, "fp32")["enabled"] is False
        assert throughput.autocast_args(device, "fp16") == {"device_type": kind, "dtype": torch.float16,
                                                            "enabled": True}
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        throughput.autocast_args(torch.device("cpu"), "fp64")
    throughput.sync(torch.device("cpu"))  # a no-op, never an error


def test_bf16_support_says_what_a_bf16_training_step_really_does():
    cpu = torch.device("cpu")
    ok, reason = harness.bf16_support(cpu)
    stepper = throughput.bare_lstm_stepper(4, 12, 8, cpu, "bf16", 1e-2, threads=1)
    x = torch.rand(4, 12, 4)
    try:
        with torch.autocast(**throughput.autocast_args(cpu, "bf16")):
            lstm_dtype = stepper.model.lstm(x)[0].dtype
        before = stepper.model.lstm.weight_hh_l0.detach().clone()
        stepper.run(1)
        trained = not torch.equal(before, stepper.model.lstm.weight_hh_l0)
    except RuntimeError as exc:  # oneDNN's CPU LSTM refuses bf16 without AVX512-BF16 / AMX
        lstm_dtype, trained, refusal = None, False, str(exc).strip().splitlines()[0]
    if ok:
        assert reason == "" and lstm_dtype == torch.bfloat16 and trained
    else:
        assert reason and "\n" not in reason and len(reason) <= 160
        assert lstm_dtype != torch.bfloat16 or not trained
        if lstm_dtype is None:
            assert reason == refusal[:160]
        else:
            assert reason == f"under bf16 autocast the LSTM runs in {str(lstm_dtype).removeprefix('torch.')}"


def test_bf16_support_refuses_when_autocast_runs_the_lstm_in_another_dtype(monkeypatch):
    # What cuDNN's autocast wrapper does on some GPUs (moola.numerics): asked for bf16, the LSTM runs in float16.
    monkeypatch.setattr("moola.numerics.probe_lstm_dtype", lambda device, dtype: ("float16", ""))
    assert harness.bf16_support(torch.device("cpu")) == (False, "under bf16 autocast the LSTM runs in float16")


def test_steppers_train_and_time_on_random_tensors():
    stepper = throughput.bare_lstm_stepper(4, 12, 8, torch.device("cpu"), "fp32", 1e-2, threads=1)
    before = stepper.model.lstm.weight_hh_l0.detach().clone()
    assert stepper.run(2) > 0
    assert not torch.equal(before, stepper.model.lstm.weight_hh_l0)  # it really trained
    time_major = throughput.bare_lstm_stepper(4, 12, 8, torch.device("cpu"), "fp32", 1e-2, onednn=False,
                                              time_major=True)
    assert time_major.run(1) > 0


@pytest.mark.slow
def test_tries_compare_variants_with_the_baseline(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the OpenMP try's worker processes need no params.yaml: their arguments say it all
    p = load_params(ROOT / "params.yaml")
    s = harness.Settings(batch_size=4, steps=1, repeats=1, warmup=0, windows_scale=0.01, data_repeats=1, threads=1,
                       precision="fp32", device=torch.device("cpu"), dvc=False, tries=True, share=0, quick=True)
    p = dataclasses.replace(p, pretrain=dataclasses.replace(p.pretrain, hidden_size=8))
    tries = measure_training.bench_tries(p, s, 12, (False, "refused here"))
    names = [t["name"] for t in tries]
    assert names[0] == "baseline fp32" and tries[0]["vs_baseline"] == 1.0
    assert {"batch 1", "batch 2", "batch 8", "time-major input (batch_first=False)", "model alone",
            "model, decoder on masked steps only"} <= set(names)
    assert tries[-1] == {"name": "bf16 autocast", "samples_per_second": None, "runs": [], "vs_baseline": None,
                         "note": "not supported here: refused here"}
    assert all(positive(t["samples_per_second"]) for t in tries[:-1])
    passive = [t for t in tries if t["name"].startswith("OMP_WAIT_POLICY=PASSIVE")]
    assert len(passive) == 2 and all(len(t["runs"]) == len(t["baseline_runs"]) == 1 for t in passive)


def test_per_window_baselines_compute_what_the_vectorised_code_does():
    rng = np.random.default_rng(0)
    close = 100 + np.cumsum(rng.normal(size=400))
    prices = np.stack([close, close + 1, close - 1, close + 0.5], axis=1)
    starts = np.arange(0, 300, 10)
    np.testing.assert_allclose(measure_data.windows_per_window_loop(prices, starts, 50),
                               normalise(cut_windows(prices, starts, 50)), atol=1e-6)
    windows = normalise(cut_windows(prices, starts, 50))
    kwargs = dict(multiplier=2, time_warp_sigma=0.12, jitter_sigma=0.01, scaling_sigma=0.05, knots=4, seed=3)
    looped = measure_data.augment_per_window_loop(windows, **kwargs)
    vectorised = augment_windows(windows, **kwargs)[len(windows):]
    assert looped.shape == vectorised.shape and looped.dtype == np.float32
    # Different draws, the same transforms: the copies stay close to the originals alike.
    for copies in (looped, vectorised):
        assert abs(np.abs(copies - np.tile(windows, (2, 1, 1))).mean() - 0.03) < 0.03


def test_cpu_advice_recommends_bf16_only_where_it_runs_and_clearly_pays():
    assert measure_precision.cpu_bf16_advice(False, None, None) == (
        "fp32", "bf16 does not run on this CPU: keep precision fp32 (the default)")
    setting, line = measure_precision.cpu_bf16_advice(True, 500.0, 1500.0)
    assert setting == "bf16" and "3.00x" in line and "-S pretrain.precision=bf16" in line
    setting, line = measure_precision.cpu_bf16_advice(True, 500.0, 550.0)
    assert setting == "fp32" and "only 1.10x" in line


def test_spec_estimate_is_epochs_times_samples_over_rate():
    p = load_params(ROOT / "params.yaml")
    e = report.spec_estimate(p, loop_sps=1000.0, epoch_other_s=2.0, finetune_epoch_s=0.5, prepare_s=3.0,
                               augment_s_per_window=1e-5, train_windows=9498)
    exp1 = e["experiments"]["exp1_baseline"]
    assert exp1["train_samples"] == 9498 * 5 and exp1["seconds"] == pytest.approx(75 * (47.490 + 2.0))
    assert e["experiments"]["exp3_aggressive"]["seconds"] == pytest.approx(100 * (9498 * 6 / 1000 + 2.0))
    # 5 folds x 3 seeds x (3 network inits of finetune + 5 ablation encoders) = 120 fold runs of 60 epochs.
    assert e["finetune_seconds"] == pytest.approx(120 * 60 * 0.5)
    assert e["total_seconds"] == pytest.approx(
        3.0 + 9498 * (4 + 3 + 5) * 1e-5 + e["pretrain_seconds"] + e["finetune_seconds"])


@pytest.mark.integration
@pytest.mark.slow
def test_the_bench_augments_what_the_augment_stage_writes(tmp_path):
    """Same params -> the same windows: the bench times the stages' own data, its seed formula included."""
    scale = 0.01
    repo = make_repo(tmp_path / "repo", {"scale": {"windows": scale}}, git=False)
    recipe = load_params(ROOT / "params.yaml").experiment(throughput.SPEC_EXPERIMENT).augment
    for stage in (["example_market"], ["prepare"], ["augment", "--recipe", recipe]):
        run([sys.executable, "-m", f"moola.stages.{stage[0]}", *stage[1:]], repo)
    written = np.load(repo / f"data/augmented/{recipe}.npy")

    p = load_params(ROOT / "params.yaml")
    p = dataclasses.replace(p, scale=ScaleParams(windows=scale, epochs=1.0))
    s = harness.Settings(batch_size=4, steps=1, repeats=1, warmup=0, windows_scale=scale, data_repeats=1, threads=1,
                         precision="fp32", device=torch.device("cpu"), dvc=False, tries=False, share=0, quick=True)
    figures, arrays = measure_data.bench_data(p, s)
    multiplier = p.augment.recipes[recipe].multiplier
    assert figures["augment"]["recipe"] == recipe
    assert len(written) == (1 + multiplier) * figures["augment"]["train_windows"] > 0
    assert arrays["train"].dtype == written.dtype and np.array_equal(arrays["train"], written)
