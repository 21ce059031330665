"""Pretraining: teach a bidirectional LSTM to rebuild masked steps of unlabeled windows.

`pretrain(train, val, experiment, seed)` is the whole loop; it takes arrays, not files. Same inputs, params and
torch version => the same weights, byte for byte, on the CPU. With `resume_path` it keeps a resume checkpoint
(moola.resume) and, when started again with the same fingerprint, goes on from there as if it had never stopped.

No step waits on the host: the masks of a whole epoch are drawn on the CPU in one call (on an accelerator one
epoch ahead, in a background thread), copied pinned and non-blocking, the masked steps are picked with index
tensors computed on the CPU, and the losses stay on the device until the epoch's end, where they are read once
(and checked for NaN/inf). Same masks, same arithmetic, same order as drawing and reading per batch: the CPU
bytes are those of the per-batch loop (tests/test_pretraining.py holds its reference hashes).
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from moola.device import describe, pick_device, use_threads
from moola.errors import DataError, ParamsError, TrainingDiverged
from moola.masking import make_mask
from moola.models import BiLSTMMaskedAutoencoder
from moola.numerics import Numerics, apply_cuda_settings, decide, dtype_name, probe_lstm_dtype
from moola.params import FEATURES, PARAMS_FILE, Experiment, PretrainParams
from moola.resume import ResumeCheckpoint, cpu_copy
from moola.windows import Windows, read_windows

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
    precision: str  # what ran: fp32, bf16 (autocast, cuda or a CPU whose oneDNN runs the LSTM in bf16), fp16 (cuda)
    numerics: dict  # moola.numerics.Numerics.record() plus the LSTM output dtype seen in the first step
    seconds: float  # training time spent in this process (not counting epochs restored from a checkpoint)
    samples_per_second: float
    # epoch -> the encoder's (nn.LSTM) weights at the end of that epoch, for the epochs asked that ran
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def training(self) -> dict:
        """The encoder checkpoint's `training` entry."""
        return {"best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch, "epochs_run": self.epochs_run}


# --- small pure helpers -------------------------------------------------------------------------------------


def encoder_hyperparams(experiment: Experiment, window: int, numerics: dict | None = None) -> dict:
    """The checkpoint's `hyperparams`: what a reader needs to rebuild the encoder and feed it the same data.

    With `numerics` (PretrainResult.numerics) also the dtype the LSTM really trained in and the TF32 setting.
    """
    extra = {} if numerics is None else {"precision": numerics["ran"], "lstm_dtype": numerics["lstm_dtype"],
                                         "tf32": numerics["tf32"]}
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
    } | extra


def _stream_seed(seed: int, stream: str) -> int:
    """An independent seed per random stream (shuffle, masks, validation masks), all from the one seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_unlabeled(path: str | Path, window: int) -> tuple[Windows, np.ndarray]:
    """The unlabeled windows file and its validation split (prepare's chronologically last data.val_fraction),
    checked: what pretraining validates on, and what select scores every encoder on. One-line DataErrors."""
    windows = read_windows(path)
    if windows.split is None:
        raise DataError(f"{path}: no 'split' column (expected the unlabeled windows file)")
    if windows.values.shape[1] != window:
        raise DataError(
            f"{path}: windows of {windows.values.shape[1]} bars, expected data.window={window} "
            "(stale: run `dvc repro prepare`)"
        )
    val = windows.values[windows.split == "val"]
    if not np.isfinite(val).all():
        raise DataError(f"{path}: holds NaN or infinite values (expected finite normalised prices)")
    if len(val) == 0:
        raise DataError(f"{path}: no validation windows (raise data.val_fraction or scale.windows)")
    return windows, val


def _as_tensor(array) -> torch.Tensor:
    # np.array copies: the augmented file arrives memory-mapped and read-only.
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


# --- masks of a whole epoch ---------------------------------------------------------------------------------


@dataclass
class EpochMasks:
    """One epoch's masks, cut into its batches: what each step needs without asking the device anything.

    `index` holds, batch after batch, the flat positions (row * window + step, counted inside the batch) of the
    masked steps in row-major order, the order boolean indexing visits them; `offsets[b]:offsets[b + 1]` is batch
    b's share. `values[b]` is the number of masked values (steps x features) of batch b, known on the host.
    """

    mask: torch.Tensor  # (n, window) bool
    index: torch.Tensor  # int64
    offsets: list[int]
    values: list[int]

    @classmethod
    def cut(cls, mask: torch.Tensor, batch_size: int, features: int) -> "EpochMasks":
        n, window = mask.shape
        batches = math.ceil(n / batch_size)
        flat = mask.reshape(-1).nonzero().squeeze(1)  # on the CPU: no device waits for it
        batch_of = flat // window // batch_size
        index = flat - batch_of * (batch_size * window)
        counts = torch.bincount(batch_of, minlength=batches).tolist()
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        return cls(mask, index, offsets, [c * features for c in counts])

    def pinned(self) -> "EpochMasks":
        return EpochMasks(self.mask.pin_memory(), self.index.pin_memory(), self.offsets, self.values)

    def to(self, device: torch.device) -> "EpochMasks":
        if device.type == "cpu":
            return self
        # From pinned host memory on CUDA (made by the drawing thread): the copies are queued and return at once.
        return EpochMasks(self.mask.to(device, non_blocking=True), self.index.to(device, non_blocking=True),
                          self.offsets, self.values)

    def batch(self, b: int) -> torch.Tensor:
        return self.index[self.offsets[b] : self.offsets[b + 1]]


def draw_masks(strategy: str, cfg: PretrainParams, n: int, window: int, features: int,
               generator: torch.Generator) -> EpochMasks:
    """n rows of masks of `strategy` with cfg's ratio, patch size and spans, cut into cfg.batch_size batches.

    Drawn on the CPU from a CPU generator: the same masks whatever the device. One call for n rows draws what
    n/batch calls of batch rows would (each strategy reads the generator row after row)."""
    mask = make_mask(strategy, n, window, ratio=cfg.mask_ratio, generator=generator, patch_size=cfg.patch_size,
                     block_spans=cfg.block_spans)
    return EpochMasks.cut(mask, cfg.batch_size, features)


def validation_masks(strategy: str, cfg: PretrainParams, n: int, window: int, features: int, seed: int) -> EpochMasks:
    """The validation masks, drawn once from the seed alone: every epoch, and every experiment with the same mask
    settings, scores the same hidden steps (select's common validation set is these, for the top-level mask)."""
    generator = torch.Generator().manual_seed(_stream_seed(seed, "validation"))
    return draw_masks(strategy, cfg, n, window, features, generator)


def masked_mse_at(pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """models.masked_mse with the masked steps given as flat positions (EpochMasks.index) instead of a boolean
    mask: the same values in the same order, so the same bytes, but no host sync (boolean indexing must count
    the mask's True values on the host before it can allocate its output)."""
    features = pred.shape[-1]
    picked, wanted = pred.reshape(-1, features)[index], target.reshape(-1, features)[index]
    return (picked.float() - wanted.float()).pow(2).mean()


def _pin(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked on CUDA, where a copy from it is queued and returns at once; as it is elsewhere."""
    return t.pin_memory() if device.type == "cuda" else t


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
    probe=probe_lstm_dtype,
    masks_ahead: bool | None = None,
    snapshot_epochs: Sequence[int] = (),
) -> PretrainResult:
    """Train a BiLSTMMaskedAutoencoder on `train` (n, window, 4), validate on `val` each epoch, keep the best.

    Raises TrainingDiverged, at the end of the epoch where it happened, when a loss is NaN or infinite.
    `probe(device, dtype)` answers the LSTM's dtype under autocast (moola.numerics; a test may fake it).
    `masks_ahead`: draw the next epoch's masks in a background thread (default: on accelerators only; on the CPU
    the thread would take cores from training).
    `snapshot_epochs`: keep the encoder's weights as they are at the end of these epochs (`result.snapshots`; kept
    in the resume checkpoint too, so that a resumed run has the same ones).
    """
    cfg = experiment.train
    device = device or pick_device(cfg.device)
    use_threads(device, cfg.threads)
    cuda_settings = apply_cuda_settings(device, cfg.tf32, cfg.deterministic)
    numerics: Numerics = decide(device, cfg.precision, cfg.tf32, probe)
    if numerics.note:
        log(f"{experiment.name}: {numerics.note}")
    seed_everything(seed)

    train_x = _as_tensor(train).to(device)
    val_x = _as_tensor(val).to(device)
    n_train, window, features = train_x.shape
    batches = math.ceil(n_train / cfg.batch_size)

    model = BiLSTMMaskedAutoencoder(features, cfg.hidden_size, cfg.num_layers, cfg.decoder_hidden).to(device)
    model.lstm_in_autocast = numerics.lstm_in_autocast
    # fp16: loss scaling; the fused AdamW takes GradScaler's found-inf flag on the device (no .item() per step,
    # torch/amp/grad_scaler.py, GradScaler.step, `_step_supports_amp_scaling`).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if numerics.grad_scaler else {}))
    scaler = torch.amp.GradScaler(device.type) if numerics.grad_scaler else None
    autocast = numerics.autocast(device)
    seen: dict[str, str] = {}

    def note_lstm_dtype(module, inputs, output) -> None:
        # The dtype the LSTM really computed in, from its output (metadata: no sync). Returns None: the output
        # stays as it is.
        seen.setdefault("lstm_dtype", dtype_name(output[0].dtype))

    hook = model.encoder.register_forward_hook(note_lstm_dtype)

    def on_host(masks: EpochMasks) -> EpochMasks:
        return masks.pinned() if device.type == "cuda" else masks

    def draw(n: int, generator: torch.Generator) -> EpochMasks:
        return on_host(draw_masks(experiment.mask, cfg, n, window, features, generator))

    # Shuffling and training masks each have their own generator, saved in the resume checkpoint.
    shuffle_gen = torch.Generator().manual_seed(_stream_seed(seed, "shuffle"))
    mask_gen = torch.Generator().manual_seed(_stream_seed(seed, "mask"))
    val_masks = on_host(validation_masks(experiment.mask, cfg, len(val_x), window, features, seed)).to(device)

    resume = ResumeCheckpoint(resume_path, fingerprint, numerics, cfg.resume_every_epochs, cfg.resume_every_seconds,
                              log)
    progress = resume.restore(model, optimizer, scaler, shuffle_gen, mask_gen)

    def diverged(epoch: int, which: str, value: float, where: str = "") -> TrainingDiverged:
        return TrainingDiverged(
            f"{experiment.name}: training diverged at epoch {epoch}{where}: the {which} loss is {value}; "
            f"no encoder written (try a lower learning_rate or precision fp32)"
        )

    # On an accelerator the next epoch's masks are drawn while this one trains. The mask generator's state at
    # an epoch boundary (what the resume checkpoint keeps) is read before the next draw starts.
    if masks_ahead is None:
        masks_ahead = device.type != "cpu"
    ahead = ThreadPoolExecutor(1, thread_name_prefix="moola-masks") if masks_ahead else None
    upcoming: Future | None = None
    mask_state = mask_gen.get_state()
    show_bar = sys.stderr.isatty()
    seconds = 0.0
    samples_seen = 0
    try:
        for epoch in range(progress.epoch + 1, experiment.epochs + 1):
            patience = cfg.early_stopping_patience
            if patience and progress.epoch - progress.best_epoch >= patience:
                log(f"{experiment.name}: early stopping after epoch {progress.epoch} "
                    f"(no better validation loss for {patience} epochs; best epoch {progress.best_epoch})")
                break

            # -- train one epoch
            started = time.perf_counter()
            model.train()
            order = _pin(torch.randperm(n_train, generator=shuffle_gen), device).to(device, non_blocking=True)
            host_masks = upcoming.result() if upcoming is not None else draw(n_train, mask_gen)
            mask_state = mask_gen.get_state()  # after this epoch's masks, before the next epoch's
            if ahead is not None and epoch < experiment.epochs:
                upcoming = ahead.submit(draw, n_train, mask_gen)
            masks = host_masks.to(device)
            losses = torch.empty(batches, device=device)
            bar = _bar(batches, f"{experiment.name} {epoch}/{experiment.epochs}") if show_bar else None
            for b in range(batches):
                rows = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
                x = train_x[order[rows]]
                with torch.autocast(**autocast):
                    pred = model(x, masks.mask[rows])
                loss = masked_mse_at(pred, x, masks.batch(b))
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                losses[b] = loss.detach()
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            if seen.get("lstm_dtype") == "float16" and scaler is None:
                # What the probe should have prevented (moola.numerics): float16 gradients without loss scaling.
                raise ParamsError(
                    f"{PARAMS_FILE}: pretrain.precision {cfg.precision}: the LSTM ran in float16 without loss "
                    "scaling, which flushes its small gradients to zero; use precision fp16 (scaled) or fp32"
                )
            # The epoch's one read of the training losses: the sums run in float64 in batch order, as they did
            # when each batch's loss was read on its own.
            loss_values = losses.tolist()
            elapsed = time.perf_counter() - started
            seconds += elapsed
            samples_seen += n_train
            for b, value in enumerate(loss_values):
                if not math.isfinite(value):
                    raise diverged(epoch, "training", value, f" (batch {b + 1} of {batches})")
            loss_sum, loss_count = 0.0, 0
            for value, count in zip(loss_values, host_masks.values):
                loss_sum += value * count
                loss_count += count
            train_loss = loss_sum / loss_count

            # -- validate with the fixed masks
            val_loss = evaluate(model, val_x, val_masks, cfg.batch_size, autocast)
            if not math.isfinite(val_loss):
                raise diverged(epoch, "validation", val_loss)

            progress.epoch = epoch
            progress.history.append((epoch, train_loss, val_loss))
            if epoch in snapshot_epochs:
                progress.snapshots[epoch] = cpu_copy(model.encoder.state_dict())
            improved = val_loss < progress.best_val_loss
            if improved:
                progress.best_val_loss, progress.best_epoch = val_loss, epoch
                progress.best_state = cpu_copy(model.state_dict())
            log(
                f"{experiment.name} epoch {epoch}/{experiment.epochs}: train loss {train_loss:.6f}, "
                f"val loss {val_loss:.6f}{' (best)' if improved else ''}, {n_train / elapsed:,.0f} samples/s"
            )
            resume.save_if_due(progress, model, optimizer, scaler, shuffle_gen, mask_state)
    finally:
        hook.remove()
        if ahead is not None:
            ahead.shutdown(wait=True, cancel_futures=True)

    assert progress.best_state is not None, "no epoch ran"
    model.load_state_dict(progress.best_state)
    record = numerics.record() | {"cuda": cuda_settings}
    if "lstm_dtype" in seen:  # what really ran wins over what the probe predicted (they agree when all is well)
        record["lstm_dtype"] = seen["lstm_dtype"]
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
        precision=numerics.ran,
        numerics=record,
        seconds=seconds,
        samples_per_second=samples_seen / seconds if seconds else 0.0,
        snapshots=dict(sorted(progress.snapshots.items())),
    )


@torch.no_grad()
def evaluate(model: BiLSTMMaskedAutoencoder, x: torch.Tensor, masks: EpochMasks, batch_size: int, autocast: dict) -> float:
    """Masked MSE over every masked value of `x` (not a mean of batch means); one read of the device."""
    model.eval()
    batches = math.ceil(len(x) / batch_size)
    losses = torch.empty(batches, device=x.device)
    for b in range(batches):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        xb = x[rows]
        with torch.autocast(**autocast):
            pred = model(xb, masks.mask[rows])
        losses[b] = masked_mse_at(pred, xb, masks.batch(b))
    total, count = 0.0, 0
    for value, n in zip(losses.tolist(), masks.values):
        total += value * n
        count += n
    return total / count


def masked_validation_loss(model: BiLSTMMaskedAutoencoder, val, masks: EpochMasks, batch_size: int) -> float:
    """`evaluate` on the CPU in float32 (what pretraining computes on a CPU): select's score of every encoder on
    the common validation set. Torch's CPU threads are the caller's to fix (moola.device.use_threads)."""
    fp32 = {"device_type": "cpu", "dtype": torch.float32, "enabled": False}
    return evaluate(model.to("cpu"), _as_tensor(val), masks, batch_size, fp32)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch")
