"""The masked autoencoder that pretrains the encoder, and the encoder checkpoint format shared by every stage.

Checkpoint (`torch.save` dict, loadable with `torch.load(path, weights_only=True)`):
  {"format": "moola-encoder/1", "state_dict": <the nn.LSTM's own state_dict>, "hyperparams": {...},
   "training": {"best_val_loss", "best_epoch", "epochs_run"}, "weights_sha256": <hex>,
   "decoder_state_dict": <the rest of the autoencoder: mask_token, decoder.*>}

`decoder_state_dict` is there when the checkpoint was saved from a BiLSTMMaskedAutoencoder (what pretraining
writes): `select` rebuilds the whole autoencoder to score every encoder on one common masked validation set.
Fine-tuning reads `state_dict` only. A checkpoint without it (an nn.LSTM saved alone) is still a valid one.

`weights_sha256` (see `weights_sha256`) makes a checkpoint self-verifying: DVC trusts its state database for a
cached file whose size and modification time did not change, so a flipped bit would otherwise reach fine-tuning.
It covers the decoder's tensors too (`checksummed_tensors`); without a decoder it is the hash of `state_dict` alone.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moola import io
from moola.errors import CheckpointDamaged, CheckpointError

CHECKPOINT_FORMAT = "moola-encoder/1"
REQUIRED_HYPERPARAMS = ("input_size", "hidden_size", "num_layers", "bidirectional")
REQUIRED_TRAINING = ("best_val_loss", "best_epoch", "epochs_run")


class BiLSTMMaskedAutoencoder(nn.Module):
    """Bidirectional LSTM encoder + small MLP decoder, trained to reconstruct masked time steps.

    Masked input steps are replaced by a learnable mask token, so the encoder cannot see what it must rebuild.
    """

    def __init__(self, input_size: int = 4, hidden_size: int = 128, num_layers: int = 1, decoder_hidden: int = 64):
        super().__init__()
        self.encoder = nn.LSTM(
            input_size, hidden_size, num_layers=num_layers, batch_first=True, bidirectional=True
        )
        self.mask_token = nn.Parameter(torch.zeros(input_size))
        self.decoder = nn.Sequential(
            nn.Linear(2 * hidden_size, decoder_hidden), nn.GELU(), nn.Linear(decoder_hidden, input_size)
        )

    # False: the LSTM runs in float32 with autocast off around it (moola.numerics: where cuDNN would run it in
    # float16 under bf16 autocast).
    lstm_in_autocast = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (batch, steps, features), mask (batch, steps) bool -> reconstruction (batch, steps, features)."""
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if self.lstm_in_autocast:
            encoded, _ = self.encoder(x)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                encoded, _ = self.encoder(x.float())
        return self.decoder(encoded)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked steps only (all features); unmasked steps do not count at all."""
    # Indexing (not multiplying by the mask) keeps a non-finite value at an unmasked step out of the loss.
    return (pred[mask].float() - target[mask].float()).pow(2).mean()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- checkpoint ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderCheckpoint:
    state_dict: dict[str, torch.Tensor]
    hyperparams: dict[str, Any]
    training: dict[str, Any]
    decoder_state_dict: dict[str, torch.Tensor] | None = None  # None: saved from an nn.LSTM alone


def make_encoder(hyperparams: dict[str, Any]) -> nn.LSTM:
    """An (untrained) nn.LSTM with the checkpoint's architecture."""
    return nn.LSTM(
        hyperparams["input_size"],
        hyperparams["hidden_size"],
        num_layers=hyperparams["num_layers"],
        batch_first=True,
        bidirectional=hyperparams["bidirectional"],
    )


def weights_sha256(state_dict: dict[str, Any]) -> str:
    """sha256 over the tensors in name order: each name, dtype, shape, then the raw bytes of the contiguous CPU copy."""
    sha256 = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} is a {type(tensor).__name__}, not a tensor")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        sha256.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        sha256.update(flat.view(torch.uint8).numpy().tobytes())
    return sha256.hexdigest()


def checksummed_tensors(state_dict: dict[str, Any], decoder: dict[str, Any] | None) -> dict[str, Any]:
    """What `weights_sha256` is recorded over: the encoder's tensors, and the decoder's under a `decoder/` prefix
    (an nn.LSTM's names have no slash, so the two never collide). Without a decoder: the encoder's alone, so a
    checkpoint saved from an nn.LSTM hashes as before the decoder was kept."""
    return dict(state_dict) | {f"decoder/{k}": v for k, v in (decoder or {}).items()}


def _stage_that_writes(path: Path) -> str:
    """The DVC stage that writes a checkpoint at `path` (by the pipeline's file names), for restore advice."""
    if path.name == "encoder.pt" and path.parent.name == "selected":
        return "select"
    replicate = re.fullmatch(r"seed(\d+)", path.parent.name)
    if replicate and path.parent.parent.name == "replicates":  # encoder.pt and the epoch_<e>.pt snapshots
        return f"replicate@{replicate.group(1)}"
    found = re.fullmatch(r"(.+)_encoder\.pt", path.name)
    return f"pretrain@{found.group(1)}" if found else "<the stage that writes it>"


def save_encoder_checkpoint(
    path: str | Path, model: nn.Module, hyperparams: dict[str, Any], training: dict[str, Any]
) -> None:
    """Write the encoder of `model` (a BiLSTMMaskedAutoencoder or an nn.LSTM) atomically, in the shared format;
    of an autoencoder also the rest of it (`decoder_state_dict`)."""
    encoder = model.encoder if isinstance(model, BiLSTMMaskedAutoencoder) else model
    if not isinstance(encoder, nn.LSTM):
        raise TypeError(f"expected a BiLSTMMaskedAutoencoder or an nn.LSTM, got {type(model).__name__}")
    for key in REQUIRED_HYPERPARAMS:
        if key not in hyperparams:
            raise ValueError(f"hyperparams lack '{key}'")
    as_saved = lambda t: t.detach().to("cpu", torch.float32).contiguous().clone()  # noqa: E731
    state_dict = {k: as_saved(v) for k, v in encoder.state_dict().items()}
    decoder = None
    if isinstance(model, BiLSTMMaskedAutoencoder):
        decoder = {k: as_saved(v) for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    io.write_torch(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "state_dict": state_dict,
            "hyperparams": dict(hyperparams),
            "training": dict(training),
            "weights_sha256": weights_sha256(checksummed_tensors(state_dict, decoder)),
        }
        | ({} if decoder is None else {"decoder_state_dict": decoder}),
        what="an encoder checkpoint",
    )


def _shape(t: Any) -> str:
    return "(" + ", ".join(str(d) for d in t) + ")"


def _read_checkpoint_file(path: Path) -> Any:
    """The object a checkpoint file holds, loaded weights-only on the CPU; a missing, foreign or unreadable file
    is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: encoder checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"a {found.group(1)} object" if found else "objects"
        raise CheckpointError(
            f"{path}: not a moola encoder checkpoint (holds {what}, which weights_only loading refuses)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().split(". ")[0] or type(exc).__name__
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({first})") from None


def _check_structure(path: Path, raw: Any) -> None:
    """The loaded object is a dict in CHECKPOINT_FORMAT whose fields are mappings."""
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: format is {found!r}, expected {CHECKPOINT_FORMAT!r}")
    for key, kind in (("state_dict", dict), ("hyperparams", dict), ("training", dict)):
        if not isinstance(raw.get(key), kind):
            raise CheckpointError(f"{path}: field '{key}' missing or not a mapping")
    decoder = raw.get("decoder_state_dict")
    if decoder is not None and not isinstance(decoder, dict):
        raise CheckpointError(f"{path}: field 'decoder_state_dict' is not a mapping")


def _check_weights_checksum(path: Path, raw: dict, state_dict: dict, decoder: dict | None) -> None:
    """The tensors hash to the recorded `weights_sha256`: a damaged file (or one with no checksum to verify)
    is a CheckpointDamaged with the way to restore or re-make it."""
    stage = _stage_that_writes(path)
    recorded = raw.get("weights_sha256")
    if not isinstance(recorded, str):
        raise CheckpointDamaged(
            f"{path}: holds no weights checksum (written by an older moola, so it cannot be verified); "
            f"re-run the stage that writes it: `dvc repro -f -s {stage}`"
        )
    try:
        found = weights_sha256(checksummed_tensors(state_dict, decoder))
    except (TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: state_dict is not a mapping of tensors ({exc})") from None
    if found != recorded:
        raise CheckpointDamaged(
            f"{path}: weights fail their checksum (sha256 recorded {recorded[:12]}..., found {found[:12]}...): the "
            f"file is damaged; {io.restore_advice(path, stage)}"
        )


def _check_required_fields(path: Path, hyperparams: dict, training: dict) -> None:
    """hyperparams and training hold every key that loading and the stages read."""
    for key in REQUIRED_HYPERPARAMS:
        if key not in hyperparams:
            raise CheckpointError(f"{path}: hyperparams lack '{key}' (found: {', '.join(map(str, hyperparams))})")
    for key in REQUIRED_TRAINING:
        if key not in training:
            raise CheckpointError(f"{path}: training lacks '{key}'")


def _check_architecture(path: Path, hyperparams: dict, state_dict: dict, expect_hidden: int | None) -> None:
    """The hyperparams describe an nn.LSTM (of hidden size `expect_hidden`, if given) whose state_dict has exactly
    the checkpoint's keys and shapes."""
    arch = {k: hyperparams[k] for k in REQUIRED_HYPERPARAMS}
    hidden = hyperparams["hidden_size"]
    if expect_hidden is not None and hidden != expect_hidden:
        found = state_dict.get("weight_hh_l0")
        found_shape = _shape(found.shape) if isinstance(found, torch.Tensor) else "none"
        raise CheckpointError(
            f"{path}: encoder hidden_size is {hidden}, expected {expect_hidden} "
            f"(weight_hh_l0 expected shape {_shape((4 * expect_hidden, expect_hidden))}, found {found_shape}); "
            f"checkpoint architecture: {arch}"
        )
    try:
        expected = {k: tuple(v.shape) for k, v in make_encoder(hyperparams).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: hyperparams {arch} do not describe an LSTM ({exc})") from None
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path}: state_dict keys do not match the architecture {arch}: "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    for key, shape in expected.items():
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            found = _shape(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(
                f"{path}: {key} has shape {found}, expected {_shape(shape)} for the architecture {arch}"
            )


def load_encoder_checkpoint(path: str | Path, expect_hidden: int | None = None) -> EncoderCheckpoint:
    """Read and verify an encoder checkpoint; any problem is a CheckpointError naming the file."""
    path = Path(path)
    raw = _read_checkpoint_file(path)
    _check_structure(path, raw)
    hyperparams, training, state_dict = raw["hyperparams"], raw["training"], raw["state_dict"]
    decoder = raw.get("decoder_state_dict")
    _check_weights_checksum(path, raw, state_dict, decoder)
    _check_required_fields(path, hyperparams, training)
    _check_architecture(path, hyperparams, state_dict, expect_hidden)
    return EncoderCheckpoint(state_dict=dict(state_dict), hyperparams=dict(hyperparams), training=dict(training),
                             decoder_state_dict=None if decoder is None else dict(decoder))


def load_autoencoder(checkpoint: EncoderCheckpoint, path: str | Path) -> BiLSTMMaskedAutoencoder:
    """The whole masked autoencoder of a verified checkpoint (load_encoder_checkpoint), in eval mode on the CPU;
    a CheckpointError naming `path` if the checkpoint holds no decoder or one that does not fit its encoder."""
    decoder = checkpoint.decoder_state_dict
    if decoder is None:
        stage = _stage_that_writes(Path(path))
        raise CheckpointError(
            f"{path}: holds the encoder only (no 'decoder_state_dict': saved from an nn.LSTM, or by a moola that "
            f"did not keep the decoder); re-run the stage that writes it: `dvc repro -f -s {stage}`"
        )
    hp = checkpoint.hyperparams
    first = decoder.get("decoder.0.weight")
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        raise CheckpointError(f"{path}: decoder_state_dict has no 2-d 'decoder.0.weight' (expected the MLP decoder)")
    model = BiLSTMMaskedAutoencoder(hp["input_size"], hp["hidden_size"], hp["num_layers"], int(first.shape[0]))
    whole = {f"encoder.{k}": v for k, v in checkpoint.state_dict.items()} | dict(decoder)
    try:
        model.load_state_dict(whole)  # strict: every key present, none left over, every shape right
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()  # torch: a header line, then one line per problem
        detail = " ".join(line.strip() for line in lines[1:3]) or lines[0]
        raise CheckpointError(f"{path}: decoder_state_dict does not fit the encoder ({detail})") from None
    return model.eval()
