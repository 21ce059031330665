"""Pretraining: teach a bidirectional LSTM to rebuild masked steps of unlabeled windows.

`pretrain(train, val, experiment, seed)` is the whole loop; it takes arrays, not files. Same inputs, params and
torch version => the same weights, byte for byte, on the CPU. With `resume_path` it keeps a resume checkpoint
(moola.resume) and, when started again with the same fingerprint, goes on from there as if it had never stopped.

No step waits on the host: the masks of a whole epoch are drawn on the CPU in one call (on an accelerator one
epoch ahead, in a background thread), copied pinned and non-blocking, the masked steps are picked with index
tensors computed on the CPU, and the losses stay on the device until the epoch's end, where they are read once
(and checked for NaN/inf). Same masks, same arithmetic, same order as drawing and reading per batch: the CPU
bytes are those of the per-batch loop (tests/test_pretraining.py holds its reference hashes).

`pretrain` reads top to bottom: `setup` (a Trainer: data, model, optimiser, scaler, generators), `open_resume`, a
MaskPrefetcher, then per epoch `train_one_epoch`, `validate`, the record of the epoch and `save_resume`.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from moola.device import describe, pick_device, use_threads
from moola.errors import DataError, ParamsError, TrainingDiverged
from moola.masking import make_mask
from moola.models import BiLSTMMaskedAutoencoder
from moola.numerics import Numerics, apply_cuda_settings, decide, dtype_name, probe_lstm_dtype
from moola.params import FEATURES, PARAMS_FILE, Experiment, PretrainParams
from moola.resume import Progress, ResumeCheckpoint, cpu_copy
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


# --- the setup ----------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What one pretraining run trains with, built by `setup`: data, model, optimiser, scaler, generators."""

    experiment: Experiment
    device: torch.device
    numerics: Numerics
    cuda_settings: dict
    train_x: torch.Tensor
    val_x: torch.Tensor
    model: BiLSTMMaskedAutoencoder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: dict  # torch.autocast keyword arguments
    seen: dict[str, str]  # "lstm_dtype": the dtype the LSTM's first output had (filled by `hook`)
    hook: RemovableHandle
    shuffle_gen: torch.Generator
    mask_gen: torch.Generator
    val_masks: EpochMasks  # on the device
    show_bar: bool

    @property
    def cfg(self) -> PretrainParams:
        return self.experiment.train

    @property
    def n_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def batches(self) -> int:
        return math.ceil(self.n_train / self.cfg.batch_size)

    def draw(self, n: int, generator: torch.Generator) -> EpochMasks:
        """n rows of training masks, on the host (pinned on CUDA). Called from the mask thread too: reads only."""
        _, window, features = self.train_x.shape
        return _on_host(draw_masks(self.experiment.mask, self.cfg, n, window, features, generator), self.device)


def _on_host(masks: EpochMasks, device: torch.device) -> EpochMasks:
    return masks.pinned() if device.type == "cuda" else masks


def _note_lstm_dtype(seen: dict[str, str], module, inputs, output) -> None:
    # The dtype the LSTM really computed in, from its output (metadata: no sync). Returns None: the output
    # stays as it is. dtype_name is looked up at call time (a test replaces it).
    seen.setdefault("lstm_dtype", dtype_name(output[0].dtype))


def setup(train, val, experiment: Experiment, seed: int, device: torch.device | None, log: Log, probe) -> Trainer:
    """Device, numerics, seeds, data, model, optimiser, scaler and generators, in the order that decides the bytes:
    the global seeds are set before the model's weights are drawn."""
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
    _, window, features = train_x.shape

    model = BiLSTMMaskedAutoencoder(features, cfg.hidden_size, cfg.num_layers, cfg.decoder_hidden).to(device)
    model.lstm_in_autocast = numerics.lstm_in_autocast
    # fp16: loss scaling; the fused AdamW takes GradScaler's found-inf flag on the device (no .item() per step,
    # torch/amp/grad_scaler.py, GradScaler.step, `_step_supports_amp_scaling`).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if numerics.grad_scaler else {}))
    scaler = torch.amp.GradScaler(device.type) if numerics.grad_scaler else None
    autocast = numerics.autocast(device)
    seen: dict[str, str] = {}
    hook = model.encoder.register_forward_hook(partial(_note_lstm_dtype, seen))

    # Shuffling and training masks each have their own generator, saved in the resume checkpoint.
    shuffle_gen = torch.Generator().manual_seed(_stream_seed(seed, "shuffle"))
    mask_gen = torch.Generator().manual_seed(_stream_seed(seed, "mask"))
    val_masks = _on_host(validation_masks(experiment.mask, cfg, len(val_x), window, features, seed), device).to(device)
    return Trainer(experiment=experiment, device=device, numerics=numerics, cuda_settings=cuda_settings,
                   train_x=train_x, val_x=val_x, model=model, optimizer=optimizer, scaler=scaler, autocast=autocast,
                   seen=seen, hook=hook, shuffle_gen=shuffle_gen, mask_gen=mask_gen, val_masks=val_masks,
                   show_bar=sys.stderr.isatty())


# --- the resume hook ----------------------------------------------------------------------------------------


def open_resume(t: Trainer, path: str | Path | None, fingerprint: str, log: Log) -> tuple[ResumeCheckpoint, Progress]:
    """The resume checkpoint at `path` and the progress it restores into `t` (epoch 0 when none matches)."""
    resume = ResumeCheckpoint(path, fingerprint, t.numerics, t.cfg.resume_every_epochs, t.cfg.resume_every_seconds,
                              log)
    return resume, resume.restore(t.model, t.optimizer, t.scaler, t.shuffle_gen, t.mask_gen)


def save_resume(resume: ResumeCheckpoint, t: Trainer, progress: Progress, mask_state: torch.Tensor) -> None:
    """At an epoch's end, when due. `mask_state`: the mask generator at this epoch boundary (MaskPrefetcher.state),
    not its state now, which a background draw of the next epoch may already have moved."""
    resume.save_if_due(progress, t.model, t.optimizer, t.scaler, t.shuffle_gen, mask_state)


# --- the training masks, one epoch ahead or not -------------------------------------------------------------


class MaskPrefetcher:
    """Each epoch's training masks, drawn from one generator in epoch order.

    With `ahead`, the next epoch's masks are drawn in a background thread while this one trains (on an
    accelerator, so that no step waits for them). The draws are the same either way: one draw at a time, each
    from where the last one left the generator; the main thread reads the generator only between draws.
    """

    def __init__(self, draw: Callable[[int, torch.Generator], EpochMasks], n: int, generator: torch.Generator,
                 ahead: bool):
        self._draw, self._n, self._generator = draw, n, generator
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moola-masks") if ahead else None
        self._upcoming: Future | None = None
        # The generator's state at the last epoch boundary: what the resume checkpoint keeps.
        self.state = generator.get_state()

    def next(self, more: bool) -> EpochMasks:
        """This epoch's masks; when `more` epochs follow and drawing ahead, starts drawing the next epoch's."""
        if self._upcoming is not None:
            masks, self._upcoming = self._upcoming.result(), None
        else:
            masks = self._draw(self._n, self._generator)
        self.state = self._generator.get_state()  # after this epoch's masks, before the next epoch's
        if self._pool is not None and more:
            self._upcoming = self._pool.submit(self._draw, self._n, self._generator)
        return masks

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# --- one epoch ----------------------------------------------------------------------------------------------


def _diverged(name: str, epoch: int, which: str, value: float, where: str = "") -> TrainingDiverged:
    return TrainingDiverged(
        f"{name}: training diverged at epoch {epoch}{where}: the {which} loss is {value}; "
        f"no encoder written (try a lower learning_rate or precision fp32)"
    )


def _weighted_mean(values: list[float], counts: list[int]) -> float:
    """The mean over every masked value from per-batch means: summed in float64 in batch order, as they were when
    each batch's loss was read on its own."""
    total, count = 0.0, 0
    for value, n in zip(values, counts):
        total += value * n
        count += n
    return total / count


def optimizer_step(t: Trainer, loss: torch.Tensor) -> None:
    t.optimizer.zero_grad(set_to_none=True)
    if t.scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip)
        t.optimizer.step()
    else:
        t.scaler.scale(loss).backward()
        t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip)
        t.scaler.step(t.optimizer)
        t.scaler.update()


def _refuse_float16_without_scaling(t: Trainer) -> None:
    if t.seen.get("lstm_dtype") == "float16" and t.scaler is None:
        # What the probe should have prevented (moola.numerics): float16 gradients without loss scaling.
        raise ParamsError(
            f"{PARAMS_FILE}: pretrain.precision {t.cfg.precision}: the LSTM ran in float16 without loss "
            "scaling, which flushes its small gradients to zero; use precision fp16 (scaled) or fp32"
        )


def train_one_epoch(t: Trainer, prefetcher: MaskPrefetcher, epoch: int) -> tuple[float, float]:
    """One pass over the shuffled training windows: (the training loss over every masked value, seconds taken).
    Raises TrainingDiverged when a batch's loss is NaN or infinite."""
    cfg, exp = t.cfg, t.experiment
    started = time.perf_counter()
    t.model.train()
    order = _pin(torch.randperm(t.n_train, generator=t.shuffle_gen), t.device).to(t.device, non_blocking=True)
    host_masks = prefetcher.next(more=epoch < exp.epochs)
    masks = host_masks.to(t.device)
    losses = torch.empty(t.batches, device=t.device)
    bar = _bar(t.batches, f"{exp.name} {epoch}/{exp.epochs}") if t.show_bar else None
    for b in range(t.batches):
        rows = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
        x = t.train_x[order[rows]]
        with torch.autocast(**t.autocast):
            pred = t.model(x, masks.mask[rows])
        loss = masked_mse_at(pred, x, masks.batch(b))
        optimizer_step(t, loss)
        losses[b] = loss.detach()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _refuse_float16_without_scaling(t)
    loss_values = losses.tolist()  # the epoch's one read of the training losses
    elapsed = time.perf_counter() - started
    for b, value in enumerate(loss_values):
        if not math.isfinite(value):
            raise _diverged(exp.name, epoch, "training", value, f" (batch {b + 1} of {t.batches})")
    return _weighted_mean(loss_values, host_masks.values), elapsed


@torch.no_grad()
def evaluate(model: BiLSTMMaskedAutoencoder, x: torch.Tensor, masks: EpochMasks, batch_size: int,
             autocast: dict) -> float:
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
    return _weighted_mean(losses.tolist(), masks.values)


def validate(t: Trainer, epoch: int) -> float:
    """The validation loss with the fixed validation masks; TrainingDiverged when NaN or infinite."""
    val_loss = evaluate(t.model, t.val_x, t.val_masks, t.cfg.batch_size, t.autocast)
    if not math.isfinite(val_loss):
        raise _diverged(t.experiment.name, epoch, "validation", val_loss)
    return val_loss


def _out_of_patience(experiment: Experiment, progress: Progress, log: Log) -> bool:
    patience = experiment.train.early_stopping_patience
    if patience and progress.epoch - progress.best_epoch >= patience:
        log(f"{experiment.name}: early stopping after epoch {progress.epoch} "
            f"(no better validation loss for {patience} epochs; best epoch {progress.best_epoch})")
        return True
    return False


def _record_epoch(progress: Progress, model: BiLSTMMaskedAutoencoder, epoch: int, train_loss: float,
                  val_loss: float, snapshot_epochs: Sequence[int]) -> bool:
    """History, snapshot and best-so-far after `epoch`; whether it is the best yet."""
    progress.epoch = epoch
    progress.history.append((epoch, train_loss, val_loss))
    if epoch in snapshot_epochs:
        progress.snapshots[epoch] = cpu_copy(model.encoder.state_dict())
    improved = val_loss < progress.best_val_loss
    if improved:
        progress.best_val_loss, progress.best_epoch = val_loss, epoch
        progress.best_state = cpu_copy(model.state_dict())
    return improved


def _result(t: Trainer, progress: Progress, seconds: float, samples_seen: int) -> PretrainResult:
    """The model with the best epoch's weights loaded, and what ran."""
    assert progress.best_state is not None, "no epoch ran"
    t.model.load_state_dict(progress.best_state)
    record = t.numerics.record() | {"cuda": t.cuda_settings}
    if "lstm_dtype" in t.seen:  # what really ran wins over what the probe predicted (they agree when all is well)
        record["lstm_dtype"] = t.seen["lstm_dtype"]
    return PretrainResult(
        model=t.model,
        history=list(progress.history),
        best_val_loss=progress.best_val_loss,
        best_epoch=progress.best_epoch,
        epochs_planned=t.experiment.epochs,
        train_samples=t.n_train,
        val_samples=len(t.val_x),
        batches_per_epoch=t.batches,
        device=describe(t.device),
        precision=t.numerics.ran,
        numerics=record,
        seconds=seconds,
        samples_per_second=samples_seen / seconds if seconds else 0.0,
        snapshots=dict(sorted(progress.snapshots.items())),
    )


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
    t = setup(train, val, experiment, seed, device, log, probe)
    resume, progress = open_resume(t, resume_path, fingerprint, log)
    if masks_ahead is None:
        masks_ahead = t.device.type != "cpu"
    prefetcher = MaskPrefetcher(t.draw, t.n_train, t.mask_gen, masks_ahead)
    seconds, samples_seen = 0.0, 0
    try:
        for epoch in range(progress.epoch + 1, experiment.epochs + 1):
            if _out_of_patience(experiment, progress, log):
                break
            train_loss, elapsed = train_one_epoch(t, prefetcher, epoch)
            seconds += elapsed
            samples_seen += t.n_train
            val_loss = validate(t, epoch)
            improved = _record_epoch(progress, t.model, epoch, train_loss, val_loss, snapshot_epochs)
            log(
                f"{experiment.name} epoch {epoch}/{experiment.epochs}: train loss {train_loss:.6f}, "
                f"val loss {val_loss:.6f}{' (best)' if improved else ''}, {t.n_train / elapsed:,.0f} samples/s"
            )
            save_resume(resume, t, progress, prefetcher.state)
    finally:
        t.hook.remove()
        prefetcher.close()
    return _result(t, progress, seconds, samples_seen)


def masked_validation_loss(model: BiLSTMMaskedAutoencoder, val, masks: EpochMasks, batch_size: int) -> float:
    """`evaluate` on the CPU in float32 (what pretraining computes on a CPU): select's score of every encoder on
    the common validation set. Torch's CPU threads are the caller's to fix (moola.device.use_threads)."""
    fp32 = {"device_type": "cpu", "dtype": torch.float32, "enabled": False}
    return evaluate(model.to("cpu"), _as_tensor(val), masks, batch_size, fp32)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch")
