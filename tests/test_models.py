"""The masked autoencoder, its loss, and the encoder checkpoint format."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import flip_bit_in_weights
from moola.errors import CheckpointDamaged, CheckpointError
from moola.masking import mask_patch
from moola.models import (
    CHECKPOINT_FORMAT,
    BiLSTMMaskedAutoencoder,
    load_encoder_checkpoint,
    make_encoder,
    masked_mse,
    save_encoder_checkpoint,
    weights_sha256,
)


def hyperparams(hidden: int) -> dict:
    return {
        "input_size": 4, "hidden_size": hidden, "num_layers": 1, "bidirectional": True,
        "mask_strategy": "patch", "mask_ratio": 0.15, "patch_size": 5, "window": 20,
        "features": ["open", "high", "low", "close"], "normalisation": "per-window min-max", "experiment": "t",
    }


TRAINING = {"best_val_loss": 0.01, "best_epoch": 2, "epochs_run": 3}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: a second thread only adds waiting on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batch(n: int = 8, length: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, length, 4, generator=g)
    return x, mask_patch(n, length, 0.3, 5, g)


def test_encoder_is_a_plain_bidirectional_lstm():
    torch.manual_seed(0)
    model = BiLSTMMaskedAutoencoder(hidden_size=16, decoder_hidden=8)
    keys = set(model.encoder.state_dict())
    assert keys == {f"{k}_l0{s}" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for s in ("", "_reverse")}
    assert model.encoder.state_dict()["weight_ih_l0"].shape == (64, 4)
    x, mask = batch()
    assert model(x, mask).shape == x.shape


def test_masked_inputs_are_hidden_from_the_encoder():
    torch.manual_seed(0)
    model = BiLSTMMaskedAutoencoder(hidden_size=8, decoder_hidden=8)
    x, mask = batch()
    changed = x.clone()
    changed[mask] = 123.0
    assert torch.equal(model(x, mask), model(changed, mask))
    changed[~mask] += 1.0
    assert not torch.equal(model(x, mask), model(changed, mask))


def test_loss_counts_masked_positions_only():
    x, mask = batch()
    pred = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    loss = masked_mse(pred, x, mask)
    target = x.clone()
    target[~mask] = float("nan")  # even a non-finite value at an unmasked step is ignored
    assert torch.equal(masked_mse(pred, target, mask), loss)
    assert torch.allclose(loss, ((pred - x) ** 2)[mask].mean())
    target = x.clone()
    target[mask] += 0.5
    assert masked_mse(pred, target, mask) != loss


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = BiLSTMMaskedAutoencoder(hidden_size=16, decoder_hidden=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, mask = batch()
    before = masked_mse(model(x, mask), x, mask)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = masked_mse(model(x, mask), x, mask)
    assert after < before


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BiLSTMMaskedAutoencoder(hidden_size=16, decoder_hidden=8)
    path = tmp_path / "enc.pt"
    save_encoder_checkpoint(path, model, hyperparams(16), TRAINING)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["hyperparams"]["hidden_size"] == 16
    ckpt = load_encoder_checkpoint(path, expect_hidden=16)
    assert ckpt.hyperparams == hyperparams(16) and ckpt.training == TRAINING
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value)
    make_encoder(ckpt.hyperparams).load_state_dict(ckpt.state_dict)  # strict: the keys fit a plain nn.LSTM
    # Same tensors, same bytes, whatever the file is called.
    save_encoder_checkpoint(tmp_path / "other.pt", model, hyperparams(16), TRAINING)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(path) == digest(tmp_path / "other.pt")


def test_wrong_hidden_size_names_expected_and_found_shapes(tmp_path):
    path = tmp_path / "enc.pt"
    save_encoder_checkpoint(path, make_encoder(hyperparams(16)), hyperparams(16), TRAINING)
    with pytest.raises(CheckpointError) as err:
        load_encoder_checkpoint(path, expect_hidden=128)
    message = str(err.value)
    assert str(path) in message and "(512, 128)" in message and "(64, 16)" in message


def test_weights_that_do_not_match_their_hyperparams(tmp_path):
    path = tmp_path / "enc.pt"
    save_encoder_checkpoint(path, make_encoder(hyperparams(16)), hyperparams(32), TRAINING)
    with pytest.raises(CheckpointError, match=r"weight_ih_l0 has shape \(64, 4\), expected \(128, 4\)"):
        load_encoder_checkpoint(path)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder_checkpoint(tmp_path / "absent.pt")
    good = tmp_path / "enc.pt"
    save_encoder_checkpoint(good, make_encoder(hyperparams(8)), hyperparams(8), TRAINING)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_encoder_checkpoint(truncated)
    assert str(truncated) in str(err.value)


class NotOurs:
    def __init__(self):
        self.payload = [1, 2, 3]


def test_foreign_pickle_is_refused_without_running_it(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "thing": NotOurs()}, path)
    with pytest.raises(CheckpointError, match="not a moola encoder checkpoint") as err:
        load_encoder_checkpoint(path)
    assert str(path) in str(err.value)


def test_wrong_format(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "someone-else/3", "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="format is 'someone-else/3'"):
        load_encoder_checkpoint(path)
    torch.save(make_encoder(hyperparams(8)).state_dict(), path)  # a bare state_dict
    with pytest.raises(CheckpointError, match="expected 'moola-encoder/1'"):
        load_encoder_checkpoint(path)


def test_a_flipped_bit_in_the_weights_is_refused_with_how_to_restore(tmp_path):
    path = tmp_path / "data/pretrained/exp2_conservative_encoder.pt"
    save_encoder_checkpoint(path, make_encoder(hyperparams(16)), hyperparams(16), TRAINING)
    flip_bit_in_weights(path)
    assert torch.load(path, weights_only=True)["format"] == CHECKPOINT_FORMAT  # torch alone loads it happily
    with pytest.raises(CheckpointDamaged) as err:
        load_encoder_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: weights fail their checksum") and "\n" not in message
    assert f"dvc checkout --relink {path}" in message and f"dvc pull {path}" in message
    assert "dvc repro -f -s pretrain@exp2_conservative" in message


def test_a_checkpoint_without_a_checksum_is_refused_not_trusted(tmp_path):
    path = tmp_path / "data/selected/encoder.pt"
    path.parent.mkdir(parents=True)
    encoder = make_encoder(hyperparams(8))
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": encoder.state_dict(), "hyperparams": hyperparams(8),
                "training": TRAINING}, path)  # what moola wrote before checksums
    with pytest.raises(CheckpointDamaged, match=r"holds no weights checksum .* `dvc repro -f -s select`"):
        load_encoder_checkpoint(path)


def test_weights_checksum_covers_names_shapes_and_bytes():
    encoder = make_encoder(hyperparams(8)).state_dict()
    digest = weights_sha256(encoder)
    assert digest == weights_sha256({k: v.clone() for k, v in reversed(list(encoder.items()))})  # order-free
    renamed = dict(encoder)
    renamed["weight_hh_l0_x"] = renamed.pop("weight_hh_l0")
    reshaped = {**encoder, "bias_ih_l0": encoder["bias_ih_l0"].reshape(2, -1)}
    nudged = {**encoder, "bias_ih_l0": encoder["bias_ih_l0"] + 1e-7}
    assert len({digest, weights_sha256(renamed), weights_sha256(reshaped), weights_sha256(nudged)}) == 4


def test_the_decoder_travels_with_the_encoder_and_its_checksum(tmp_path):
    """An autoencoder's checkpoint keeps its decoder (select scores masked reconstruction with it): the rebuilt
    autoencoder gives the same reconstruction, the checksum covers the decoder's bytes, and fine-tuning's view (the
    encoder's state_dict) is what it was."""
    from moola.classifier import SimpleLSTM, load_forward_weights
    from moola.models import checksummed_tensors, load_autoencoder

    torch.manual_seed(0)
    model = BiLSTMMaskedAutoencoder(hidden_size=16, decoder_hidden=8)
    with torch.no_grad():
        model.mask_token.fill_(0.25)  # not its zero initialisation: a lost mask token would show
    path = tmp_path / "data/pretrained/exp4_block_mask_encoder.pt"
    save_encoder_checkpoint(path, model, hyperparams(16), TRAINING)
    raw = torch.load(path, weights_only=True)
    assert set(raw["decoder_state_dict"]) == {"mask_token", "decoder.0.weight", "decoder.0.bias", "decoder.2.weight",
                                              "decoder.2.bias"}
    assert raw["weights_sha256"] == weights_sha256(checksummed_tensors(raw["state_dict"], raw["decoder_state_dict"]))
    assert raw["weights_sha256"] != weights_sha256(raw["state_dict"])
    ckpt = load_encoder_checkpoint(path, expect_hidden=16)
    x, mask = batch()
    with torch.no_grad():
        assert torch.equal(load_autoencoder(ckpt, path)(x, mask), model.eval()(x, mask))
    assert load_forward_weights(SimpleLSTM(hidden_size=16, attention_heads=2), path) == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]

    # One bit flipped in a decoder tensor: refused like one in the encoder.
    weight = raw["decoder_state_dict"]["decoder.0.weight"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    data[data.find(weight[:32]) + 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match="weights fail their checksum") as err:
        load_encoder_checkpoint(path)
    assert "dvc repro -f -s pretrain@exp4_block_mask" in str(err.value)


def test_an_encoder_saved_alone_loads_but_has_no_autoencoder(tmp_path):
    from moola.models import load_autoencoder

    path = tmp_path / "data/pretrained/exp1_baseline_encoder.pt"
    encoder = make_encoder(hyperparams(8))
    save_encoder_checkpoint(path, encoder, hyperparams(8), TRAINING)
    raw = torch.load(path, weights_only=True)
    assert "decoder_state_dict" not in raw and raw["weights_sha256"] == weights_sha256(raw["state_dict"])
    ckpt = load_encoder_checkpoint(path)
    assert ckpt.decoder_state_dict is None
    with pytest.raises(CheckpointError, match=r"holds the encoder only .* `dvc repro -f -s pretrain@exp1_baseline`"):
        load_autoencoder(ckpt, path)


@pytest.mark.parametrize("name", ["encoder.pt", "epoch_003.pt"])
def test_a_damaged_replicate_checkpoint_names_its_replicate_stage(tmp_path, name):
    path = tmp_path / "data/replicates/seed102" / name
    save_encoder_checkpoint(path, make_encoder(hyperparams(8)), hyperparams(8), TRAINING)
    flip_bit_in_weights(path)
    with pytest.raises(CheckpointDamaged, match=r"`dvc repro -f -s replicate@102`"):
        load_encoder_checkpoint(path)
