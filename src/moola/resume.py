"""Pretraining's resume checkpoint: what a killed run needs to go on as if it had never stopped.

At an epoch's end (at most every `resume_every_epochs` epochs and `resume_every_seconds` seconds) the loop's
complete state is saved: model, optimiser, loss scaler, every random generator, best-so-far and history. A run
started again with the same fingerprint (params, input files, device type, torch) and the same numerics
restores it; any other checkpoint is stale and discarded. The file is scratch state, never a DVC output.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moola import io
from moola.numerics import Numerics
from moola.params import Experiment, as_dict

RESUME_DIR = Path(".moola/resume/pretrain")
RESUME_FORMAT = "moola-pretrain-resume/3"  # /3: snapshots


@dataclass
class Progress:
    """What survives an epoch boundary besides the model, optimiser and generators."""

    epoch: int = 0  # last completed epoch
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[tuple[int, float, float]] = field(default_factory=list)
    # epoch -> the encoder's weights at the end of that epoch (pretrain's snapshot_epochs)
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def resume_path_for(experiment: str, root: str | Path = ".") -> Path:
    return Path(root) / RESUME_DIR / f"{experiment}.pt"


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


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def _rng_states(shuffle_gen: torch.Generator, mask_state: torch.Tensor) -> dict:
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
        # At the epoch boundary: before the next epoch's masks (which a background thread may already be drawing).
        "mask": mask_state,
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


class ResumeCheckpoint:
    """The checkpoint at `path` (None: no checkpoint; restore starts fresh and nothing is saved)."""

    def __init__(self, path: str | Path | None, fingerprint: str, numerics: Numerics, every_epochs: int,
                 every_seconds: float, log: Callable[[str], None]):
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint
        # The arithmetic decided on this box (probe, TF32): a box that decides otherwise starts over.
        self.numerics = json.dumps(numerics.record(), sort_keys=True)
        self.every_epochs, self.every_seconds = every_epochs, every_seconds
        self.log = log
        self.last_save = (0, time.monotonic())

    def restore(self, model, optimizer, scaler, shuffle_gen, mask_gen) -> Progress:
        """Restore everything from a matching checkpoint; discard a stale or unreadable one (then: epoch 0)."""
        progress = self._load(model, optimizer, scaler, shuffle_gen, mask_gen) or Progress()
        self.last_save = (progress.epoch, time.monotonic())
        return progress

    def save_if_due(self, progress: Progress, model, optimizer, scaler, shuffle_gen, mask_state) -> None:
        """At an epoch's end: save when `every_epochs` epochs and `every_seconds` seconds have passed since the
        last save (or the start)."""
        due = (progress.epoch - self.last_save[0] >= self.every_epochs
               and time.monotonic() - self.last_save[1] >= self.every_seconds)
        if self.path is None or not due:
            return
        io.write_torch(
            self.path,
            {
                "format": RESUME_FORMAT,
                "fingerprint": self.fingerprint,
                "numerics": self.numerics,
                "epoch": progress.epoch,
                "best_val_loss": progress.best_val_loss,
                "best_epoch": progress.best_epoch,
                "best_state": progress.best_state,
                "history": [list(row) for row in progress.history],
                "snapshots": {str(epoch): state for epoch, state in progress.snapshots.items()},
                "model": cpu_copy(model.state_dict()),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rng": _rng_states(shuffle_gen, mask_state),
            },
        )
        self.last_save = (progress.epoch, time.monotonic())

    def _load(self, model, optimizer, scaler, shuffle_gen, mask_gen) -> Progress | None:
        path = self.path
        if path is None or not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            ok = isinstance(state, dict) and state.get("format") == RESUME_FORMAT
        except Exception as exc:  # a damaged scratch file is never fatal: it is only a shortcut
            self.log(f"Discarding unreadable resume checkpoint {path} ({type(exc).__name__})")
            path.unlink()
            return None
        same = ok and state.get("numerics") == self.numerics
        if not same or state.get("fingerprint") != self.fingerprint:
            self.log(f"Discarding stale resume checkpoint {path} (written for other params, data, device, precision "
                     "or torch)")
            path.unlink()
            return None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        _set_rng_states(state["rng"], shuffle_gen, mask_gen)
        self.log(f"Resuming from {path}: epoch {state['epoch']} done, best epoch {state['best_epoch']}")
        return Progress(
            epoch=state["epoch"],
            best_val_loss=state["best_val_loss"],
            best_epoch=state["best_epoch"],
            best_state=state["best_state"],
            history=[(int(e), float(t), float(v)) for e, t, v in state["history"]],
            snapshots={int(epoch): weights for epoch, weights in state["snapshots"].items()},
        )
