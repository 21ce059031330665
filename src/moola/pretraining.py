"""Pretraining: teach a bidirectional LSTM to rebuild masked steps of unlabeled windows.

`pretrain(train, val, experiment, seed)` is the whole loop; it takes arrays, not files. Same inputs, params and
torch version => the same weights, byte for byte, on the CPU. With `resume_path` it saves its complete state
at the end of every epoch (model, optimiser, every random generator, best-so-far, history) and, when started
again with the same fingerprint, goes on from there as if it had never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moola import io
from moola.device import describe, pick_device, use_threads
from moola.errors import TrainingDiverged
from moola.masking import make_mask
from moola.models import BiLSTMMaskedAutoencoder, masked_mse
from moola.params import FEATURES, Experiment, as_dict

RESUME_DIR = Path(".moola/resume/pretrain")
RESUME_FORMAT = "moola-pretrain-resume/1"
NORMALISATION = "per-window min-max over the window's bars: (x - min(low)) / (max(high) - min(low))"

Log = Callable[[str], None]


def log_line(message: str) -> None:
    print(message, flush=True)


@dataclass
class PretrainResult:
    model: BiLSTMMaskedAutoencoder  # holding the weights of the best validation epoch
    history: list[tuple[int, float, float]]  # (epoch, train_loss, val_loss), epoch from 1
    best_val_loss: float
    best_epoch: int
    epochs_planned: int
    train_samples: int
    val_samples: int
    batches_per_epoch: int
    device: str
    precision: str  # what ran: bf16 only on cuda
    seconds: float  # training time spent in this process (not counting epochs restored from a checkpoint)
    samples_per_second: float

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def training(self) -> dict:
        """The encoder checkpoint's `training` entry."""
        return {"best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch, "epochs_run": self.epochs_run}


@dataclass
class _Progress:
    """What survives an epoch boundary besides the model, optimiser and generators."""

    epoch: int = 0  # last completed epoch
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[tuple[int, float, float]] = field(default_factory=list)


# --- small pure helpers -------------------------------------------------------------------------------------


def resume_path_for(experiment: str, root: str | Path = ".") -> Path:
    return Path(root) / RESUME_DIR / f"{experiment}.pt"


def encoder_hyperparams(experiment: Experiment, window: int) -> dict:
    """The checkpoint's `hyperparams`: what a reader needs to rebuild the encoder and feed it the same data."""
    return {
        "input_size": len(FEATURES),
        "hidden_size": experiment.train.hidden_size,
        "num_layers": experiment.train.num_layers,
        "bidirectional": True,
        "mask_strategy": experiment.mask,
        "mask_ratio": experiment.train.mask_ratio,
        "patch_size": experiment.train.patch_size,
        "window": window,
        "features": list(FEATURES),
        "normalisation": NORMALISATION,
        "experiment": experiment.name,
    }


def file_digest(path: str | Path) -> str:
    """size:sha256 of a file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return f"{Path(path).stat().st_size}:{sha.hexdigest()}"


def resume_fingerprint(experiment: Experiment, seed: int, data_digests: dict[str, str], device: str) -> str:
    """sha256 of everything that decides the run's bytes: resolved params, input files, device type, torch."""
    payload = {
        "experiment": as_dict(experiment),
        "seed": seed,
        "data": data_digests,
        "device": device,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _stream_seed(seed: int, stream: str) -> int:
    """An independent seed per random stream (shuffle, masks, validation masks), all from the one seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_tensor(array) -> torch.Tensor:
    # np.array copies: the augmented file arrives memory-mapped and read-only.
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


# --- the loop -----------------------------------------------------------------------------------------------


def pretrain(
    train,
    val,
    experiment: Experiment,
    seed: int,
    *,
    device: torch.device | None = None,
    resume_path: str | Path | None = None,
    fingerprint: str = "",
    log: Log = log_line,
) -> PretrainResult:
    """Train a BiLSTMMaskedAutoencoder on `train` (n, window, 4), validate on `val` each epoch, keep the best.

    Raises TrainingDiverged as soon as a loss is NaN or infinite.
    """
    cfg = experiment.train
    device = device or pick_device(cfg.device)
    use_threads(device, cfg.threads)
    seed_everything(seed)

    train_x = _as_tensor(train).to(device)
    val_x = _as_tensor(val).to(device)
    n_train, window, features = train_x.shape
    batches = math.ceil(n_train / cfg.batch_size)

    model = BiLSTMMaskedAutoencoder(features, cfg.hidden_size, cfg.num_layers, cfg.decoder_hidden).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # bf16 autocast is for CUDA: oneDNN's CPU LSTM refuses bf16 on many CPUs, and CPU runs promise fp32 bytes.
    bf16 = cfg.precision == "bf16" and device.type == "cuda"
    if cfg.precision == "bf16" and not bf16:
        log(f"{experiment.name}: precision bf16 applies on cuda only; running fp32 on {device.type}")
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    def masks(n: int, generator: torch.Generator) -> torch.Tensor:
        # Drawn on the CPU from a CPU generator: the same masks whatever the device.
        return make_mask(
            experiment.mask, n, window, ratio=cfg.mask_ratio, generator=generator,
            patch_size=cfg.patch_size, block_spans=cfg.block_spans,
        ).to(device)

    # Shuffling and training masks each have their own generator, saved in the resume checkpoint.
    shuffle_gen = torch.Generator().manual_seed(_stream_seed(seed, "shuffle"))
    mask_gen = torch.Generator().manual_seed(_stream_seed(seed, "mask"))
    # Validation masks are drawn once, from the seed alone: every epoch and every experiment with this
    # strategy scores the same hidden steps, so their validation losses compare.
    val_mask = masks(len(val_x), torch.Generator().manual_seed(_stream_seed(seed, "validation")))

    progress = _Progress()
    if resume_path is not None:
        progress = _resume(Path(resume_path), fingerprint, model, optimizer, shuffle_gen, mask_gen, log) or progress

    def diverged(epoch: int, which: str, value: float, where: str = "") -> TrainingDiverged:
        return TrainingDiverged(
            f"{experiment.name}: training diverged at epoch {epoch}{where}: the {which} loss is {value}; "
            f"no encoder written (try a lower learning_rate or precision fp32)"
        )

    show_bar = sys.stderr.isatty()
    seconds = 0.0
    samples_seen = 0
    for epoch in range(progress.epoch + 1, experiment.epochs + 1):
        patience = cfg.early_stopping_patience
        if patience and progress.epoch - progress.best_epoch >= patience:
            log(f"{experiment.name}: early stopping after epoch {progress.epoch} "
                f"(no better validation loss for {patience} epochs; best epoch {progress.best_epoch})")
            break

        # -- train one epoch
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n_train, generator=shuffle_gen).to(device)
        loss_sum, loss_count = 0.0, 0
        bar = _bar(batches, f"{experiment.name} {epoch}/{experiment.epochs}") if show_bar else None
        for b in range(batches):
            x = train_x[order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            mask = masks(len(x), mask_gen)
            with torch.autocast(**autocast):
                pred = model(x, mask)
            loss = masked_mse(pred, x, mask)
            value = loss.item()
            if not math.isfinite(value):
                raise diverged(epoch, "training", value, f" (batch {b + 1} of {batches})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            count = int(mask.sum()) * features
            loss_sum += value * count
            loss_count += count
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - started
        seconds += elapsed
        samples_seen += n_train
        train_loss = loss_sum / loss_count

        # -- validate with the fixed masks
        val_loss = evaluate(model, val_x, val_mask, cfg.batch_size, autocast)
        if not math.isfinite(val_loss):
            raise diverged(epoch, "validation", val_loss)

        progress.epoch = epoch
        progress.history.append((epoch, train_loss, val_loss))
        improved = val_loss < progress.best_val_loss
        if improved:
            progress.best_val_loss, progress.best_epoch = val_loss, epoch
            progress.best_state = _cpu_copy(model.state_dict())
        log(
            f"{experiment.name} epoch {epoch}/{experiment.epochs}: train loss {train_loss:.6f}, "
            f"val loss {val_loss:.6f}{' (best)' if improved else ''}, {n_train / elapsed:,.0f} samples/s"
        )
        if resume_path is not None:
            _save_resume(Path(resume_path), fingerprint, progress, model, optimizer, shuffle_gen, mask_gen)

    assert progress.best_state is not None, "no epoch ran"
    model.load_state_dict(progress.best_state)
    return PretrainResult(
        model=model,
        history=list(progress.history),
        best_val_loss=progress.best_val_loss,
        best_epoch=progress.best_epoch,
        epochs_planned=experiment.epochs,
        train_samples=n_train,
        val_samples=len(val_x),
        batches_per_epoch=batches,
        device=describe(device),
        precision="bf16" if bf16 else "fp32",
        seconds=seconds,
        samples_per_second=samples_seen / seconds if seconds else 0.0,
    )


@torch.no_grad()
def evaluate(model: BiLSTMMaskedAutoencoder, x: torch.Tensor, mask: torch.Tensor, batch_size: int, autocast: dict) -> float:
    """Masked MSE over every masked value of `x` (not a mean of batch means)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, mb = x[start : start + batch_size], mask[start : start + batch_size]
        with torch.autocast(**autocast):
            pred = model(xb, mb)
        n = int(mb.sum()) * x.shape[-1]
        total += masked_mse(pred, xb, mb).item() * n
        count += n
    return total / count


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch")


# --- resume checkpoint --------------------------------------------------------------------------------------


def _rng_states(shuffle_gen: torch.Generator, mask_gen: torch.Generator) -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's key array travels as a tensor: weights_only loading accepts tensors, not numpy arrays.
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "shuffle": shuffle_gen.get_state(),
        "mask": mask_gen.get_state(),
    }


def _set_rng_states(rng: dict, shuffle_gen: torch.Generator, mask_gen: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    shuffle_gen.set_state(rng["shuffle"])
    mask_gen.set_state(rng["mask"])


def _save_resume(path, fingerprint, progress, model, optimizer, shuffle_gen, mask_gen) -> None:
    io.write_torch(
        path,
        {
            "format": RESUME_FORMAT,
            "fingerprint": fingerprint,
            "epoch": progress.epoch,
            "best_val_loss": progress.best_val_loss,
            "best_epoch": progress.best_epoch,
            "best_state": progress.best_state,
            "history": [list(row) for row in progress.history],
            "model": _cpu_copy(model.state_dict()),
            "optimizer": optimizer.state_dict(),
            "rng": _rng_states(shuffle_gen, mask_gen),
        },
    )


def _resume(path: Path, fingerprint, model, optimizer, shuffle_gen, mask_gen, log: Log) -> _Progress | None:
    """Restore everything from a matching checkpoint; discard a stale or unreadable one."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(state, dict) and state.get("format") == RESUME_FORMAT
    except Exception as exc:  # a damaged scratch file is never fatal: it is only a shortcut
        log(f"Discarding unreadable resume checkpoint {path} ({type(exc).__name__})")
        path.unlink()
        return None
    if not ok or state.get("fingerprint") != fingerprint:
        log(f"Discarding stale resume checkpoint {path} (written for other params, data, device or torch)")
        path.unlink()
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_states(state["rng"], shuffle_gen, mask_gen)
    log(f"Resuming from {path}: epoch {state['epoch']} done, best epoch {state['best_epoch']}")
    return _Progress(
        epoch=state["epoch"],
        best_val_loss=state["best_val_loss"],
        best_epoch=state["best_epoch"],
        best_state=state["best_state"],
        history=[(int(e), float(t), float(v)) for e, t, v in state["history"]],
    )
