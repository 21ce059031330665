"""SimpleLSTM: the causal classifier that receives the forward direction of the pretrained encoder.

A unidirectional LSTM, causal multi-head self-attention over its outputs, and a linear head on the last time
step. Nothing at step t ever sees a step after t, so the classifier can run on a live stream of bars.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from moola.errors import CheckpointError
from moola.params import CLASS_NAMES, FEATURES

# The forward direction of layer 0: the only tensors a unidirectional one-layer LSTM can take from the encoder.
FORWARD_KEYS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


class SimpleLSTM(nn.Module):
    """Causal LSTM + causal self-attention + classification head on the last step."""

    def __init__(
        self,
        hidden_size: int = 128,
        attention_heads: int = 8,
        dropout: float = 0.1,
        input_size: int = len(FEATURES),
        num_classes: int = len(CLASS_NAMES),
    ) -> None:
        super().__init__()
        if hidden_size % attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by attention_heads {attention_heads}")
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=1, batch_first=True)
        self.attention = nn.MultiheadAttention(hidden_size, attention_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)

    # False: the LSTM runs in float32 with autocast off around it (moola.numerics: where cuDNN would run it in
    # float16 under bf16 autocast), as in the pretraining model.
    lstm_in_autocast = True

    def _states(self, x: torch.Tensor) -> torch.Tensor:
        if self.lstm_in_autocast:
            return self.lstm(x)[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.lstm(x.float())[0]

    def attended(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, features) -> (batch, time, hidden): step t attends to steps 0..t only."""
        states = self._states(x)
        steps = states.shape[1]
        # True above the diagonal = "may not attend": the future is masked out.
        future = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(diagonal=1)
        mixed, _ = self.attention(states, states, states, attn_mask=future, need_weights=False)
        return self.norm(states + mixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, features) -> logits (batch, classes), from the last step's attended output.

        Equal to `attended(x)[:, -1]` (the last step may see every step, so it needs no mask), but queries the
        last step only: the other steps' outputs would be computed and thrown away, at 100x the cost.
        """
        states = self._states(x)
        last = states[:, -1:]
        mixed, _ = self.attention(last, states, states, need_weights=False)
        return self.head(self.dropout(self.norm(last + mixed)[:, 0]))


def _encoder_state_dict(encoder: Any, hidden_size: int) -> tuple[Mapping[str, torch.Tensor], str]:
    """The encoder's state_dict and a name for messages, from a path, an EncoderCheckpoint or a checkpoint dict."""
    if isinstance(encoder, (str, os.PathLike)):
        from moola.models import load_encoder_checkpoint

        return load_encoder_checkpoint(encoder, expect_hidden=hidden_size).state_dict, str(encoder)
    state = encoder.get("state_dict") if isinstance(encoder, Mapping) else getattr(encoder, "state_dict", None)
    if not isinstance(state, Mapping):
        raise CheckpointError("encoder checkpoint has no state_dict mapping (expected the moola-encoder/1 format)")
    return state, "encoder checkpoint"


def load_forward_weights(model: SimpleLSTM, encoder: Any) -> list[str]:
    """Copy the encoder's forward-direction LSTM tensors into `model.lstm`; the `_reverse` ones are never read.

    `encoder` is a checkpoint path, an EncoderCheckpoint, or a dict with "state_dict". Returns the copied names.
    """
    state, name = _encoder_state_dict(encoder, model.lstm.hidden_size)
    own = model.lstm.state_dict()
    for key in FORWARD_KEYS:
        if key not in state:
            raise CheckpointError(f"{name}: state_dict has no '{key}' (expected an nn.LSTM encoder's layer 0)")
        expected, found = tuple(own[key].shape), tuple(state[key].shape)
        if expected != found:
            raise CheckpointError(
                f"{name}: {key} has shape {found}, SimpleLSTM expects {expected} "
                f"(hidden_size {model.lstm.hidden_size}, input_size {model.lstm.input_size})"
            )
    with torch.no_grad():
        for key in FORWARD_KEYS:
            getattr(model.lstm, key).copy_(state[key])
    return list(FORWARD_KEYS)
