"""Performance harness: the pretraining loop against the bare LSTM that bounds it, and what else costs time.

    python -m moola.bench            # about 5 minutes on 2 CPU cores; prints a table, writes metrics/bench.json
    python -m moola.bench --tries    # also what could move the ceiling: bf16, oneDNN, threads, OpenMP wait
                                     # policy, batch size, layout, decoding masked steps only (10-15 minutes)
    python -m moola.bench --quick    # a sanity run at tiny shapes, under a minute (tests/test_bench.py uses it)

Run from the repository root (it reads params.yaml). Every figure is a median over repeats after a warm-up, timed
with time.perf_counter (accelerators synchronised before each clock read); the ceiling, the model and the real
loop take turns within each repeat, so a change in the machine's load hits all of them alike. Shapes are the
spec's whatever params.yaml's `scale` says. metrics/bench.json describes this machine: it is not a DVC output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from moola import io
from moola.augment import augment_windows
from moola.device import describe
from moola.errors import MoolaError, run_main
from moola.masking import make_mask
from moola.models import BiLSTMMaskedAutoencoder, masked_mse
from moola.params import FEATURES, Params, ScaleParams, load_params
from moola.windows import chronological_split, cut_windows, normalise

BENCH_FORMAT = "moola-bench/1"
DEFAULT_JSON = "metrics/bench.json"
SPEC_EXPERIMENT = "exp1_baseline"  # the shapes measured: its recipe, mask and batch size
TARGET_RATIO = 0.90  # the loop's samples/s as a fraction of the bare LSTM's (issue 8)
# What the temporary repository for the DVC timings holds (as tests/conftest.py copies it).
REPO_FILES = ["src", "params.yaml", "dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "scripts"]
QUICK = dict(batch_size=32, steps=2, repeats=2, warmup=1, windows_scale=0.01, data_repeats=1)


@dataclass(frozen=True)
class Settings:
    batch_size: int
    steps: int  # timed training steps per repeat
    repeats: int
    warmup: int  # untimed steps first (oneDNN / cuDNN set up their kernels on the first call)
    windows_scale: float  # of data.unlabeled_windows for prepare, augment and the DVC repository (1.0 = spec)
    data_repeats: int
    threads: int
    precision: str  # asked for; the loop decides what runs (pretraining applies bf16 on cuda only)
    device: torch.device
    dvc: bool
    tries: bool
    share: int  # concurrent workers for the shared-device measurement (0 = skip)
    quick: bool


# --- small helpers ------------------------------------------------------------------------------------------


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


def resolve_device(requested: str) -> torch.device:
    """auto -> cuda, then mps, then cpu; an absent device is a one-line error."""
    from moola.device import pick_device

    if requested == "auto":
        return pick_device("auto")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if requested not in available:
        raise MoolaError(f"--device must be one of auto, cpu, cuda, mps, got {requested!r}")
    if not available[requested]:
        raise MoolaError(f"--device {requested}: this machine has no {requested} device (use auto or cpu)")
    return torch.device(requested)


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
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return info


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


def model_stepper(batch: int, window: int, exp, device: torch.device, precision: str,
                  decode_masked_only: bool = False) -> Stepper:
    """The pretraining model itself (mask token, MLP decoder, masked loss) on random tensors: no data, no loop.

    decode_masked_only: run the decoder on the masked steps alone, the only ones the loss reads (a try: the same
    loss in exact arithmetic, not the same fp32 bytes).
    """
    cfg = exp.train
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, window, len(FEATURES), generator=generator).to(device)
    mask = make_mask(exp.mask, batch, window, ratio=cfg.mask_ratio, generator=generator,
                     patch_size=cfg.patch_size, block_spans=cfg.block_spans).to(device)
    model = BiLSTMMaskedAutoencoder(len(FEATURES), cfg.hidden_size, cfg.num_layers, cfg.decoder_hidden)

    def loss(m: BiLSTMMaskedAutoencoder) -> torch.Tensor:
        if not decode_masked_only:
            return masked_mse(m(x, mask), x, mask)
        encoded, _ = m.encoder(torch.where(mask.unsqueeze(-1), m.mask_token.to(x.dtype), x))
        return (m.decoder(encoded[mask]).float() - x[mask]).pow(2).mean()

    return Stepper(model, loss, batch, device, precision, cfg.learning_rate)


# --- the real loop ------------------------------------------------------------------------------------------


def loop_experiment(p: Params, s: Settings, epochs: int = 1):
    """exp1_baseline as pretraining runs it, at the bench's batch size, device, precision and threads."""
    exp = p.experiment(SPEC_EXPERIMENT)
    train = dataclasses.replace(exp.train, batch_size=s.batch_size, device=s.device.type, precision=s.precision,
                                threads=s.threads, early_stopping_patience=0)
    return dataclasses.replace(exp, train=train, epochs=epochs)


def loop_epoch(train: np.ndarray, val: np.ndarray, exp, seed: int, device: torch.device) -> dict:
    """One epoch of the real pretraining loop (moola.pretraining.pretrain): training rate, and the rest of it."""
    from moola.pretraining import pretrain

    lines: list[str] = []
    sync(device)
    began = time.perf_counter()
    result = pretrain(train, val, exp, seed, device=device, log=lines.append)
    sync(device)
    wall = time.perf_counter() - began
    return {
        "samples_per_second": result.samples_per_second,
        "train_seconds": result.seconds,
        # Validation over the whole validation split, plus the call's setup (model, masks, tensors).
        "other_seconds": wall - result.seconds,
        "precision": result.precision,
        "val_loss": result.history[-1][2],
    }


def bench_training(p: Params, s: Settings, train: np.ndarray, val: np.ndarray) -> dict:
    """Items 1 and 2: the bare LSTM, the model alone, and the real loop, taking turns within each repeat."""
    window = train.shape[1]
    exp = loop_experiment(p, s)
    needed = s.steps * s.batch_size
    if len(train) < needed:
        raise MoolaError(f"--steps {s.steps} x --batch-size {s.batch_size} needs {needed} training samples, "
                         f"the augmented data has {len(train)}")
    loop_train = train[:needed]
    # Warm-up: the loop first, so that the ceiling runs in the precision the loop really uses.
    warm = loop_epoch(train[: max(1, s.warmup) * s.batch_size], val, exp, p.seed, s.device)
    precision = warm["precision"]
    bare = bare_lstm_stepper(s.batch_size, window, exp.train.hidden_size, s.device, precision,
                             exp.train.learning_rate, s.threads)
    model = model_stepper(s.batch_size, window, exp, s.device, precision)
    for stepper in (bare, model):
        stepper.run(s.warmup)
    rates: dict[str, list[float]] = {"bare": [], "model": [], "loop": []}
    other: list[float] = []
    for _ in range(s.repeats):
        rates["bare"].append(needed / bare.run(s.steps))
        rates["model"].append(needed / model.run(s.steps))
        run = loop_epoch(loop_train, val, exp, p.seed, s.device)
        rates["loop"].append(run["samples_per_second"])
        other.append(run["other_seconds"])
    paired = [loop / bare for loop, bare in zip(rates["loop"], rates["bare"])]
    paired_model = [loop / model for loop, model in zip(rates["loop"], rates["model"])]
    return {
        "precision": precision,
        "bare_lstm": {"samples_per_second": median(rates["bare"]), "runs": rates["bare"]},
        "model": {"samples_per_second": median(rates["model"]), "runs": rates["model"]},
        "loop": {
            "samples_per_second": median(rates["loop"]),
            "runs": rates["loop"],
            "validation_and_setup_seconds": median(other),
            "validation_windows": len(val),
        },
        "ratio_loop_to_bare": median(paired),
        "ratio_runs": paired,
        "ratio_loop_to_model": median(paired_model),
        "target_ratio": TARGET_RATIO,
        "target_met": median(paired) >= TARGET_RATIO,
    }


# --- data: prepare and augment against a per-window Python loop ---------------------------------------------


def windows_per_window_loop(prices: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """The plain version of cut_windows + normalise: one window at a time."""
    low_col, high_col = FEATURES.index("low"), FEATURES.index("high")
    out = np.empty((len(starts), window, len(FEATURES)), dtype=np.float32)
    for i, start in enumerate(starts):
        w = prices[start : start + window]
        low, high = w[:, low_col].min(), w[:, high_col].max()
        out[i] = (w - low) / (high - low) if high > low else 0.5
    return out


def augment_per_window_loop(windows: np.ndarray, multiplier: int, time_warp_sigma: float, jitter_sigma: float,
                            scaling_sigma: float, knots: int, seed: int) -> np.ndarray:
    """The plain version of augment_windows: the same transforms, one window and one feature at a time."""
    n, length, features = windows.shape
    steps = np.arange(length, dtype=np.float64)
    anchor_x = np.linspace(0.0, length - 1, knots + 2)
    out = np.empty((multiplier * n, length, features), dtype=np.float32)
    for copy in range(multiplier):
        rng = np.random.default_rng([seed, copy + 1])
        for i in range(n):
            speed = np.interp(steps, anchor_x, np.clip(rng.normal(1.0, time_warp_sigma, knots + 2), 0.05, None))
            position = np.cumsum(speed) - speed[0]
            position *= (length - 1) / position[-1]
            warped = np.stack([np.interp(position, steps, windows[i, :, f]) for f in range(features)], axis=1)
            warped = (warped - 0.5) * rng.normal(1.0, scaling_sigma) + 0.5
            out[copy * n + i] = warped + rng.normal(0.0, jitter_sigma, size=warped.shape)
    return out


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    runs, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - began)
    return runs, result


def bench_data(p: Params, s: Settings) -> tuple[dict, dict]:
    """Item 3: prepare and augment (vectorised) against per-window loops; returns the figures and the arrays."""
    from moola.market import example_data
    from moola.stages.prepare import prepare
    from moola.windows import unlabeled_starts, validate_bars

    d = p.data
    n_windows = p.unlabeled_windows + d.labeled_windows

    def example_then_prepare():
        bars, labels, _ = example_data(p.seed, d.window, d.stride, d.unlabeled_windows, d.labeled_windows,
                                       d.min_final_segment)
        out = prepare(p, validate_bars(bars), labels)
        return bars, (out.unlabeled, out.labeled)

    prepare_runs, (bars, (unlabeled, labeled)) = timed(example_then_prepare, s.data_repeats)
    prices = bars[list(FEATURES)].to_numpy()
    starts = unlabeled_starts(len(bars), d.window, d.stride, p.unlabeled_windows)

    vector_runs, vectorised = timed(lambda: normalise(cut_windows(prices, starts, p.data.window)), s.data_repeats)
    loop_runs, looped = timed(lambda: windows_per_window_loop(prices, starts, p.data.window), s.data_repeats)
    if not np.allclose(vectorised, looped, atol=1e-6):
        raise AssertionError("the per-window windowing loop disagrees with cut_windows + normalise")

    train = unlabeled.values[unlabeled.split == "train"]
    val = unlabeled.values[unlabeled.split == "val"]
    recipe_name = p.experiment(SPEC_EXPERIMENT).train.augment
    recipe = p.augment.recipes[recipe_name]
    kwargs = dict(multiplier=recipe.multiplier, time_warp_sigma=recipe.time_warp_sigma,
                  jitter_sigma=p.augment.jitter_sigma, scaling_sigma=p.augment.scaling_sigma,
                  knots=p.augment.time_warp_knots, seed=zlib.crc32(recipe_name.encode()) ^ p.seed)
    augment_runs, augmented = timed(lambda: augment_windows(train, **kwargs), s.data_repeats)
    # The loop is slow by design: time it on a slice and give its rate.
    sample = train[: min(len(train), 1000)]
    augment_loop_runs, _ = timed(lambda: augment_per_window_loop(sample, **kwargs), s.data_repeats)
    made = len(train) * recipe.multiplier
    figures = {
        "prepare": {
            "windows": n_windows,
            "seconds": median(prepare_runs),
            "windows_per_second": n_windows / median(prepare_runs),
            "note": "the example_market and prepare cores: market generation, windowing, normalisation, split",
        },
        "windowing": {
            "windows": len(starts),
            "vectorised_windows_per_second": len(starts) / median(vector_runs),
            "per_window_loop_windows_per_second": len(starts) / median(loop_runs),
            "speedup": median(loop_runs) / median(vector_runs),
        },
        "augment": {
            "recipe": recipe_name,
            "train_windows": len(train),
            "windows_made": made,
            "seconds": median(augment_runs),
            "vectorised_windows_per_second": made / median(augment_runs),
            "per_window_loop_windows_per_second": len(sample) * recipe.multiplier / median(augment_loop_runs),
            "per_window_loop_windows_timed": len(sample) * recipe.multiplier,
        },
    }
    figures["augment"]["speedup"] = (figures["augment"]["vectorised_windows_per_second"]
                                     / figures["augment"]["per_window_loop_windows_per_second"])
    arrays = {"train": augmented, "val": val, "labeled": labeled, "train_windows": len(train)}
    return figures, arrays


# --- fine-tuning: seconds per epoch of one fold --------------------------------------------------------------


def bench_finetune(p: Params, s: Settings, labeled) -> dict:
    from moola.device import use_threads
    from moola.finetuning import FinetuneConfig, fold_splits, train_fold

    epochs = 1 if s.quick else 3
    cfg = dataclasses.replace(FinetuneConfig.from_params(p), epochs=epochs, freeze_epochs=0)
    train, test = fold_splits(labeled.label, p.finetune.folds, p.seed)[0]
    use_threads(s.device, p.finetune.threads)

    def one_fold():
        train_fold(labeled.values[train], labeled.label[train], labeled.values[test], labeled.label[test],
                   cfg, None, p.seed, s.device)

    runs, _ = timed(one_fold, s.data_repeats)
    return {"seconds_per_epoch": median(runs) / epochs, "fold_windows": len(train), "epochs_timed": epochs,
            "note": "scratch init, every parameter trained (frozen epochs cost less): an upper bound"}


# --- DVC: the no-op repro and status over spec-scale outputs ------------------------------------------------


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(repo / "src"),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MoolaError(f"dvc {' '.join(args)} failed in {repo} (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc


def make_bench_repo(root: Path, dest: Path, windows_scale: float) -> Path:
    """A committed git + DVC copy of the project (no data, cache or history) at `windows_scale`."""
    import yaml

    dest.mkdir(parents=True)
    for name in REPO_FILES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["scale"] = {**params.get("scale", {}), "windows": windows_scale}
    # The example market's files, whatever this workspace's params point prepare at.
    params.setdefault("data", {}).update(bars="data/example/bars.parquet", labels="data/example/labels.csv")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=bench@moola.invalid", "-c", "user.name=moola bench"]
    for cmd in (["git", "init", "-q", "-b", "main"], None, [*git, "add", "-A"], [*git, "commit", "-q", "-m", "bench"]):
        if cmd is None:
            _dvc(dest, "init", "-q")
            _dvc(dest, "config", "core.analytics", "false")
            continue
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def bench_dvc(root: Path, s: Settings) -> dict:
    """Item 4: build prepare + augment in a temporary repository, then time the no-op repro and status."""
    with tempfile.TemporaryDirectory(prefix="moola-bench-") as tmp:
        repo = make_bench_repo(root, Path(tmp) / "repo", s.windows_scale)
        began = time.perf_counter()
        _dvc(repo, "repro", "prepare", "augment")
        build = time.perf_counter() - began
        out_bytes = sum(f.stat().st_size for d in ("data/prepared", "data/augmented")
                        for f in (repo / d).iterdir())
        noop_runs, status_runs = [], []
        for _ in range(max(2, s.data_repeats)):
            began = time.perf_counter()
            proc = _dvc(repo, "repro", "prepare", "augment")
            noop_runs.append(time.perf_counter() - began)
            if "up to date" not in proc.stdout:
                raise AssertionError(f"the second `dvc repro` was not a no-op:\n{proc.stdout}")
            began = time.perf_counter()
            _dvc(repo, "status")
            status_runs.append(time.perf_counter() - began)
        version = _dvc(repo, "--version").stdout.strip()
    return {
        "dvc": version,
        "windows_scale": s.windows_scale,
        "output_bytes": out_bytes,
        "build_seconds": build,
        "noop_repro_seconds": median(noop_runs),
        "noop_repro_runs": noop_runs,
        "status_seconds": median(status_runs),
        "status_runs": status_runs,
        "scope": "dvc repro prepare augment (the pipeline's bulky outputs); pretraining outputs at spec scale "
                 "take hours on a CPU, so the no-op is timed over what exists",
    }


# --- tries: what could move the ceiling ---------------------------------------------------------------------


def bench_tries(p: Params, s: Settings, window: int, bf16: tuple[bool, str]) -> list[dict]:
    """Variants of the bare LSTM step, taking turns with the baseline within each repeat."""
    exp = loop_experiment(p, s)
    hidden, lr, b = exp.train.hidden_size, exp.train.learning_rate, s.batch_size

    def make(batch: int = b, precision: str = "fp32", threads: int = s.threads, **kw) -> tuple[int, Stepper]:
        return batch, bare_lstm_stepper(batch, window, hidden, s.device, precision, lr, threads, **kw)

    steppers = {"baseline fp32": make()}
    if bf16[0]:
        steppers["bf16 autocast"] = make(precision="bf16")
    if s.device.type == "cpu":
        steppers["oneDNN off (ATen LSTM kernel)"] = make(onednn=False)
        for n in sorted({1, os.cpu_count() or 1} - {s.threads}):
            steppers[f"threads {n}"] = make(threads=n)
    steppers["time-major input (batch_first=False)"] = make(time_major=True)
    for factor in (0.25, 0.5, 2):
        steppers[f"batch {max(1, int(b * factor))}"] = make(batch=max(1, int(b * factor)))
    # Not the LSTM: how much of the model's cost beyond the ceiling is its decoder on steps the loss ignores.
    steppers["model alone"] = (b, model_stepper(b, window, exp, s.device, "fp32"))
    steppers["model, decoder on masked steps only"] = (b, model_stepper(b, window, exp, s.device, "fp32", True))
    for _, stepper in steppers.values():
        stepper.run(s.warmup)
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    # Half the main figures' work per timing (a dozen variants): one batch of the spec's size.
    samples = max(1, s.steps // 2) * b
    for _ in range(s.repeats):
        for name, (batch, stepper) in steppers.items():
            steps = max(1, round(samples / batch))  # the same samples per timing whatever the batch
            rates[name].append(steps * batch / stepper.run(steps))
    base = median(rates["baseline fp32"])
    tries = [{"name": name, "samples_per_second": median(r), "runs": r, "vs_baseline": median(r) / base}
             for name, r in rates.items()]
    if s.device.type == "cpu":
        tries += try_omp_passive(s, window, hidden)
    if not bf16[0]:
        tries.append({"name": "bf16 autocast", "samples_per_second": None, "runs": [], "vs_baseline": None,
                      "note": f"not supported here: {bf16[1]}"})
    return tries


def compare_precision(p: Params, s: Settings, train: np.ndarray, val: np.ndarray, epochs: int) -> dict:
    """fp32 against bf16 (twice, for determinism) in the real loop: final validation losses."""
    from moola.pretraining import pretrain

    histories = {}
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16_again", "bf16")):
        exp = loop_experiment(p, dataclasses.replace(s, precision=precision), epochs=epochs)
        result = pretrain(train, val, exp, p.seed, device=s.device, log=lambda _: None)
        histories[name] = {"precision": result.precision, "history": result.history,
                           "samples_per_second": result.samples_per_second}
    final = {k: v["history"][-1][2] for k, v in histories.items()}
    return {
        "epochs": epochs,
        "train_samples": len(train),
        "final_val_loss": final,
        "relative_difference": abs(final["bf16"] - final["fp32"]) / final["fp32"],
        "bf16_deterministic": histories["bf16"]["history"] == histories["bf16_again"]["history"],
        "histories": histories,
    }


# --- five experiments sharing one device --------------------------------------------------------------------


def worker_main(s: Settings, window: int, hidden: int, lr: float) -> None:
    """One of the concurrent workers: the bare LSTM's median samples/s as one JSON line."""
    stepper = bare_lstm_stepper(s.batch_size, window, hidden, s.device, s.precision, lr, s.threads)
    stepper.run(s.warmup)
    rates = [s.steps * s.batch_size / stepper.run(s.steps) for _ in range(s.repeats)]
    peak = torch.cuda.max_memory_allocated(s.device) / 2**20 if s.device.type == "cuda" else None
    print(json.dumps({"samples_per_second": median(rates), "peak_memory_mib": peak}), flush=True)


def start_workers(s: Settings, count: int, steps: int, repeats: int, window: int, hidden: int,
                  env: dict[str, str | None] | None = None, peaks: list | None = None) -> list[float]:
    """`count` bare-LSTM worker processes at once; the median samples/s of each. `env` sets (None: unsets) what
    only a process start can, such as OpenMP's wait policy."""
    cmd = [sys.executable, "-m", "moola.bench", "--worker", "--device", s.device.type,
           "--batch-size", str(s.batch_size), "--steps", str(steps), "--repeats", str(repeats),
           "--warmup", str(s.warmup), "--precision", s.precision, "--threads", str(s.threads),
           "--window", str(window), "--hidden", str(hidden)]
    package_root = str(Path(__file__).resolve().parents[1])
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": package_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
             for _ in range(count)]
    rates = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise MoolaError(f"a bench worker failed (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
        answer = json.loads(out.strip().splitlines()[-1])
        rates.append(answer["samples_per_second"])
        if peaks is not None:
            peaks.append(answer.get("peak_memory_mib"))
    return rates


def bench_share(s: Settings, single: float, window: int, hidden: int) -> dict:
    """`share` bare-LSTM workers at once on the same device: the aggregate against one alone."""
    peaks: list = []
    rates = start_workers(s, s.share, s.steps, s.repeats, window, hidden, peaks=peaks)
    return {"workers": s.share, "per_worker_samples_per_second": rates, "aggregate_samples_per_second": sum(rates),
            "aggregate_vs_single": sum(rates) / single,
            "peak_memory_mib": [None if m is None else round(m, 1) for m in peaks] if any(peaks) else None}


def try_omp_passive(s: Settings, window: int, hidden: int) -> list[dict]:
    """OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning between parallel regions) against the
    default, in fresh processes taking turns (it can only be set before torch starts): one process alone, and
    two at once (a CPU shared with another training run or a test suite)."""
    steps, repeats = max(1, s.steps // 2), 3
    policies = {"default": {"OMP_WAIT_POLICY": None}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
    alone: dict[str, list[float]] = {"default": [], "passive": []}
    shared: dict[str, list[float]] = {"default": [], "passive": []}
    for _ in range(1 if s.quick else 2):
        for name, env in policies.items():
            alone[name] += start_workers(s, 1, steps, repeats, window, hidden, env)
            shared[name].append(sum(start_workers(s, 2, steps, repeats, window, hidden, env)))
    return [
        {"name": "OMP_WAIT_POLICY=PASSIVE, one process", "samples_per_second": median(alone["passive"]),
         "runs": alone["passive"], "vs_baseline": median(alone["passive"]) / median(alone["default"]),
         "baseline_runs": alone["default"]},
        {"name": "OMP_WAIT_POLICY=PASSIVE, two processes at once (sum)",
         "samples_per_second": median(shared["passive"]), "runs": shared["passive"],
         "vs_baseline": median(shared["passive"]) / median(shared["default"]), "baseline_runs": shared["default"]},
    ]


# --- full-spec estimate -------------------------------------------------------------------------------------


def spec_estimate(p: Params, loop_sps: float, epoch_other_s: float, finetune_epoch_s: float,
                  prepare_s: float, augment_s_per_window: float, train_windows: int) -> dict:
    """Seconds of a full-spec `dvc repro` here: every stage run one after the other, as `dvc repro` does."""
    spec = dataclasses.replace(p, scale=ScaleParams(windows=1.0, epochs=1.0))
    experiments = {}
    for exp in spec.all_experiments():
        samples = train_windows * (1 + exp.recipe.multiplier)
        per_epoch = samples / loop_sps + epoch_other_s
        experiments[exp.name] = {"epochs": exp.epochs, "train_samples": samples,
                                 "seconds_per_epoch": per_epoch, "seconds": exp.epochs * per_epoch}
    pretrain_s = sum(e["seconds"] for e in experiments.values())
    augment_s = sum(train_windows * r.multiplier * augment_s_per_window for r in spec.augment.recipes.values())
    ft = spec.finetune
    # finetune trains pretrained + scratch; each finetune_ablation@<exp> trains the pretrained init only.
    fold_runs = ft.folds * len(ft.seeds) * (2 + len(spec.experiments))
    finetune_s = fold_runs * spec.finetune_epochs * finetune_epoch_s
    total = prepare_s + augment_s + pretrain_s + finetune_s
    return {
        "experiments": experiments,
        "prepare_seconds": prepare_s,
        "augment_seconds": augment_s,
        "pretrain_seconds": pretrain_s,
        "finetune_fold_runs": fold_runs,
        "finetune_seconds": finetune_s,
        "total_seconds": total,
        "total_hours": total / 3600,
        "method": "per experiment: epochs x (train samples / loop samples/s + validation-and-setup seconds); "
                  "fine-tuning: folds x seeds x (2 + experiments) fold runs x epochs x seconds per epoch; "
                  "plus prepare and the three augment recipes",
    }


# --- report -------------------------------------------------------------------------------------------------


def _rate(x: float | None, unit: str = "samples/s") -> str:
    return "n/a" if x is None else f"{x:,.0f} {unit}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def format_table(r: dict) -> str:
    m, st, t = r["machine"], r["settings"], r["training"]
    lines = [
        f"moola bench ({r['command']})",
        f"machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']}, device {m['device']}, "
        f"load {m['load_average_at_start'][0]} at start",
        f"shapes: batch {st['batch_size']} x {st['window']} steps x 4 -> 2 x {st['hidden_size']} (bidirectional), "
        f"{st['steps']} steps x {st['repeats']} repeats after {st['warmup']} warm-up, precision {t['precision']}",
        "",
        f"{'measurement':<60} {'median':>20}  runs",
    ]

    def row(name: str, value: str, runs: list[float] | None = None) -> None:
        runs_text = " ".join(f"{x:,.0f}" if x >= 100 else f"{x:.2f}" for x in runs) if runs else ""
        lines.append(f"{name:<60} {value:>20}  {runs_text}")

    row("1 bare nn.LSTM + linear decoder (random tensors)", _rate(t["bare_lstm"]["samples_per_second"]),
        t["bare_lstm"]["runs"])
    row("  the pretraining model alone (random tensors)", _rate(t["model"]["samples_per_second"]),
        t["model"]["runs"])
    row("2 pretraining loop, real augmented data", _rate(t["loop"]["samples_per_second"]), t["loop"]["runs"])
    row(f"  ratio 2/1 (target >= {TARGET_RATIO:.2f}: {'met' if t['target_met'] else 'NOT met'})",
        f"{t['ratio_loop_to_bare']:.3f}", t["ratio_runs"])
    row("  ratio 2 / model alone (the loop's own overhead)", f"{t['ratio_loop_to_model']:.3f}")
    row(f"  validation ({t['loop']['validation_windows']:,} windows) + setup per epoch",
        _duration(t["loop"]["validation_and_setup_seconds"]))
    d = r["data"]
    row(f"3 prepare, whole core ({d['prepare']['windows']:,} windows)", _rate(d["prepare"]["windows_per_second"],
        "windows/s"))
    row("  windowing + normalise, vectorised", _rate(d["windowing"]["vectorised_windows_per_second"], "windows/s"))
    row(f"  ... per-window Python loop (x{d['windowing']['speedup']:.1f} slower)",
        _rate(d["windowing"]["per_window_loop_windows_per_second"], "windows/s"))
    a = d["augment"]
    row(f"  augment {a['recipe']}: {a['train_windows']:,} x {a['windows_made'] // max(1, a['train_windows'])} "
        f"in {_duration(a['seconds'])}", _rate(a["vectorised_windows_per_second"], "windows/s"))
    row(f"  ... per-window Python loop (x{a['speedup']:.1f} slower)",
        _rate(a["per_window_loop_windows_per_second"], "windows/s"))
    if "noop_repro_seconds" in r["dvc"]:
        v = r["dvc"]
        row(f"4 dvc repro prepare augment, no-op ({v['output_bytes'] / 1e6:,.0f} MB)",
            _duration(v["noop_repro_seconds"]), v["noop_repro_runs"])
        row("  dvc status", _duration(v["status_seconds"]), v["status_runs"])
        row("  (first build, once)", _duration(v["build_seconds"]))
    else:
        row("4 dvc", "skipped")
    row("fine-tuning, one fold, per epoch", _duration(r["finetune"]["seconds_per_epoch"]))
    for tr in r.get("tries", []):
        value = _rate(tr["samples_per_second"])
        if tr["vs_baseline"] is not None:
            value = f"{value} x{tr['vs_baseline']:.2f}"
        row(f"  try: {tr['name']}", value if tr["samples_per_second"] else "unsupported")
    if "precision_comparison" in r:
        c = r["precision_comparison"]
        row("  bf16 vs fp32 final val loss, relative", f"{c['relative_difference']:.4f}")
    if "share" in r:
        sh = r["share"]
        row(f"{sh['workers']} workers sharing {st['device']}, aggregate", _rate(sh["aggregate_samples_per_second"]))
    e = r["estimate"]
    lines += ["", "Full-spec `dvc repro` on this machine, estimated from the loop's rate:"]
    for name, x in e["experiments"].items():
        lines.append(f"  pretrain@{name:<18} {x['epochs']:>4} epochs x {_duration(x['seconds_per_epoch']):>9} "
                     f"= {_duration(x['seconds'])}")
    lines.append(f"  prepare + augment {_duration(e['prepare_seconds'] + e['augment_seconds'])}, fine-tuning "
                 f"({e['finetune_fold_runs']} fold runs) {_duration(e['finetune_seconds'])}; "
                 f"total {_duration(e['total_seconds'])}")
    lines.append(f"wrote {r['json']} (machine-specific; not a DVC output) in {_duration(r['seconds'])}")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, p: Params) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m moola.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a sanity run in seconds")
    parser.add_argument("--tries", action="store_true", help="also bf16, oneDNN off, threads, layout, batch sizes")
    parser.add_argument("--no-dvc", action="store_true", help="skip the DVC timings (item 4)")
    parser.add_argument("--batch-size", type=int, help=f"default: pretrain.batch_size ({p.pretrain.batch_size})")
    parser.add_argument("--steps", type=int, help="timed training steps per repeat (default 2)")
    parser.add_argument("--repeats", type=int, help="repeats, the median is reported (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 1)")
    parser.add_argument("--windows-scale", type=float, help="of the spec's windows for items 3 and 4 (default 1)")
    parser.add_argument("--device", default=p.pretrain.device, help="auto | cpu | cuda | mps (default: params)")
    parser.add_argument("--precision", default=p.pretrain.precision, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=p.pretrain.threads, help="torch CPU threads")
    parser.add_argument("--share", type=int, help="concurrent workers on one device (default: 5 on cuda, else 0)")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=p.data.window, help=argparse.SUPPRESS)  # workers only
    parser.add_argument("--hidden", type=int, default=p.pretrain.hidden_size, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else dict(batch_size=p.pretrain.batch_size, steps=2, repeats=5, warmup=1,
                                         windows_scale=1.0, data_repeats=3)

    def pick(name):
        value = getattr(args, name, None)
        return base[name] if value is None else value

    device = resolve_device(args.device)
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


def run_bench(argv: list[str] | None = None, root: Path = Path(".")) -> dict:
    p = load_params(root / "params.yaml")
    s, args = parse_args(argv, p)
    if args.worker:
        worker_main(s, args.window, args.hidden, p.experiment(SPEC_EXPERIMENT).train.learning_rate)
        return {}
    began = time.perf_counter()
    if s.device.type == "cpu":
        torch.set_num_threads(s.threads)
    # The spec's shapes whatever the workspace's scale (a tour sets it small); bench_data generates the example
    # market itself, whatever files data.bars and data.labels name.
    p = dataclasses.replace(p, scale=ScaleParams(windows=s.windows_scale, epochs=1.0))
    report: dict = {
        "format": BENCH_FORMAT,
        "command": " ".join(["python -m moola.bench", *(argv if argv is not None else sys.argv[1:])]),
        "quick": s.quick,
        "machine": machine_info(s.device),
        "settings": {"batch_size": s.batch_size, "steps": s.steps, "repeats": s.repeats, "warmup": s.warmup,
                     "window": p.data.window, "hidden_size": p.pretrain.hidden_size, "threads": s.threads,
                     "precision": s.precision, "device": s.device.type, "windows_scale": s.windows_scale},
    }
    say = (lambda msg: None) if s.quick else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say("bench: prepare and augment ...")
    report["data"], arrays = bench_data(p, s)
    d = report["data"]
    say(f"  prepare {d['prepare']['seconds']:.2f} s, augment {d['augment']['seconds']:.2f} s")
    say("bench: bare LSTM, model and real loop ...")
    report["training"] = bench_training(p, s, arrays["train"], arrays["val"])
    t = report["training"]
    say(f"  bare {t['bare_lstm']['runs']}, model {t['model']['runs']}, loop {t['loop']['runs']} samples/s; "
        f"ratio {t['ratio_loop_to_bare']:.3f}; load {os.getloadavg()[0]:.2f}")
    say("bench: fine-tuning ...")
    report["finetune"] = bench_finetune(p, s, arrays["labeled"])
    if s.dvc:
        say("bench: dvc ...")
        report["dvc"] = bench_dvc(root.resolve(), s)
        say(f"  no-op repro {report['dvc']['noop_repro_runs']} s, status {report['dvc']['status_runs']} s")
    else:
        report["dvc"] = {"skipped": "--no-dvc"}
    bf16 = bf16_support(s.device)
    report["machine"]["bf16_autocast_lstm"] = bf16[0] if bf16[0] else f"no: {bf16[1]}"
    if s.tries:
        say("bench: tries ...")
        report["tries"] = bench_tries(p, s, p.data.window, bf16)
        for tr in report["tries"]:
            say(f"  {tr['name']}: {tr['runs']} samples/s")
        if bf16[0]:
            probe = loop_epoch(arrays["train"][: s.batch_size], arrays["val"],
                               loop_experiment(p, dataclasses.replace(s, precision="bf16")), p.seed, s.device)
            if probe["precision"] == "bf16":  # the loop applies bf16 on this device: compare the loss curves
                report["precision_comparison"] = compare_precision(
                    p, s, arrays["train"][: 4 * s.batch_size * s.steps], arrays["val"], epochs=3 if s.quick else 5)
    if s.share:
        say(f"bench: {s.share} workers sharing the device ...")
        report["share"] = bench_share(s, report["training"]["bare_lstm"]["samples_per_second"], p.data.window,
                                      p.pretrain.hidden_size)
    report["estimate"] = spec_estimate(
        p, t["loop"]["samples_per_second"], t["loop"]["validation_and_setup_seconds"],
        report["finetune"]["seconds_per_epoch"], d["prepare"]["seconds"] / s.windows_scale,
        d["augment"]["seconds"] / max(1, d["augment"]["windows_made"]),
        # The spec's training split, whatever windows_scale measured.
        int(np.sum(chronological_split(p.data.unlabeled_windows, p.data.val_fraction) == "train")),
    )
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = time.perf_counter() - began
    report["json"] = str(args.json)
    io.write_json(root / args.json if not Path(args.json).is_absolute() else args.json, report)
    print(format_table(report), flush=True)
    return report


def main() -> None:
    run_bench()


if __name__ == "__main__":
    run_main(main)
