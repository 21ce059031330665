"""SimpleLSTM's shapes and causality, and loading the encoder's forward direction (never the reverse one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moola import io
from moola.classifier import FORWARD_KEYS, SimpleLSTM, load_forward_weights
from moola.errors import CheckpointError
from moola.models import weights_sha256

HIDDEN, HEADS, STEPS = 16, 4, 12


def encoder_checkpoint(hidden: int = HIDDEN, seed: int = 0) -> dict:
    """A checkpoint in the shared moola-encoder/1 format, around a real bidirectional nn.LSTM."""
    torch.manual_seed(seed)
    lstm = nn.LSTM(4, hidden, batch_first=True, bidirectional=True)
    state_dict = {k: v.detach().clone() for k, v in lstm.state_dict().items()}
    return {
        "format": "moola-encoder/1",
        "state_dict": state_dict,
        "weights_sha256": weights_sha256(state_dict),
        "hyperparams": {"input_size": 4, "hidden_size": hidden, "num_layers": 1, "bidirectional": True,
                        "experiment": "test"},
        "training": {"best_val_loss": 0.01, "best_epoch": 3, "epochs_run": 3},
    }


def fresh_model(seed: int = 1) -> SimpleLSTM:
    torch.manual_seed(seed)
    return SimpleLSTM(hidden_size=HIDDEN, attention_heads=HEADS, dropout=0.0)


def test_forward_weights_are_copied_exactly_and_reverse_ones_unused(tmp_path):
    ckpt = encoder_checkpoint()
    path = tmp_path / "encoder.pt"
    io.write_torch(path, ckpt)
    model = fresh_model()
    assert load_forward_weights(model, path) == list(FORWARD_KEYS)
    for key in FORWARD_KEYS:
        assert torch.equal(getattr(model.lstm, key), ckpt["state_dict"][key])

    # Perturb every reverse tensor: a model loaded from it is bit-for-bit the same.
    for key in list(ckpt["state_dict"]):
        if key.endswith("_reverse"):
            ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1.0
    perturbed = fresh_model()
    load_forward_weights(perturbed, ckpt)
    for (name, a), (_, b) in zip(model.state_dict().items(), perturbed.state_dict().items()):
        assert torch.equal(a, b), name


def test_shape_mismatch_names_expected_and_found_shapes(tmp_path):
    model = fresh_model()
    with pytest.raises(CheckpointError, match=r"weight_ih_l0 has shape \(32, 4\), SimpleLSTM expects \(64, 4\)"):
        load_forward_weights(model, encoder_checkpoint(hidden=8))
    path = tmp_path / "small.pt"
    io.write_torch(path, encoder_checkpoint(hidden=8))
    # From a file, the shared loader refuses it first, naming the file and both shapes.
    with pytest.raises(CheckpointError, match=r"small\.pt.*expected 16.*\(64, 16\).*found \(32, 8\)"):
        load_forward_weights(model, path)
    with pytest.raises(CheckpointError, match="not found"):
        load_forward_weights(model, tmp_path / "missing.pt")


def test_output_shapes():
    model = fresh_model().eval()
    x = torch.rand(3, STEPS, 4)
    assert model(x).shape == (3, 2)
    assert model.attended(x).shape == (3, STEPS, HIDDEN)
    # The classifier's fast path (last step only) equals the last step of the full causal sequence.
    torch.testing.assert_close(model(x), model.head(model.attended(x)[:, -1]))


def test_future_steps_do_not_change_earlier_outputs():
    model = fresh_model().eval()
    x = torch.rand(2, STEPS, 4)
    changed = x.clone()
    changed[:, 7:] = torch.rand(2, STEPS - 7, 4)
    with torch.no_grad():
        before, after = model.attended(x), model.attended(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 7:], after[:, 7:])
    # The prediction after the first 7 bars does not depend on anything later.
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :7]), model.head(before[:, 6]), rtol=0, atol=1e-6)


def test_hidden_size_must_split_into_heads():
    with pytest.raises(ValueError, match="divisible"):
        SimpleLSTM(hidden_size=10, attention_heads=4)
