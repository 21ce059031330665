"""Stage `select`: the lowest validation loss among stable, compatible encoders, with a reason for every one,
ranked on one common masked validation set (select.compare_on: common) or on each experiment's own masks (own)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT, run
from moola import io, paths
from moola.errors import DataError, ParamsError
from moola.masking import make_mask
from moola.models import BiLSTMMaskedAutoencoder, save_encoder_checkpoint
from moola.params import load_params, parse_params
from moola.pretraining import _stream_seed
from moola.selection import Candidate, assess, choose
from moola.stages import select as select_stage
from moola.windows import Windows, windows_table

EXPERIMENTS = ["exp1_baseline", "exp2_conservative", "exp3_aggressive", "exp4_block_mask", "exp5_random_mask"]
WINDOW, N_TRAIN, N_VAL = 105, 6, 5  # params.yaml's data.window; a tiny unlabeled file


def healthy(epochs=30, start=0.03):
    val = start * 0.9 ** np.arange(epochs)
    return 0.9 * val, val


def autoencoder(hidden: int = 128, constant: float | None = None, seed: int = 0) -> BiLSTMMaskedAutoencoder:
    """A random autoencoder; with `constant`, one whose reconstruction is that value at every step (the last
    decoder layer zeroed, its bias set), so that its masked MSE on any windows is known in closed form."""
    torch.manual_seed(seed)
    model = BiLSTMMaskedAutoencoder(4, hidden, 1, decoder_hidden=8)
    if constant is not None:
        with torch.no_grad():
            model.decoder[2].weight.zero_()
            model.decoder[2].bias.fill_(constant)
    return model


def write_experiment(root: Path, exp: str, train, val, hidden: int = 128, model: nn.Module | None = None) -> None:
    save_encoder_checkpoint(
        root / paths.encoder(exp),
        autoencoder(hidden) if model is None else model,
        {"input_size": 4, "hidden_size": hidden, "num_layers": 1, "bidirectional": True, "experiment": exp},
        {"best_val_loss": float(np.nanmin(val)), "best_epoch": int(np.nanargmin(val)) + 1, "epochs_run": len(val)},
    )
    best = float(np.min(val)) if np.isfinite(val).all() else None
    mask = {"exp4_block_mask": "block", "exp5_random_mask": "random"}.get(exp, "patch")
    io.write_json(root / select_stage.metrics_path(exp), {
        "experiment": exp, "mask": mask, "best_val_loss": best, "final_val_loss": float(val[-1]) if best else None,
        "epochs_run": len(val),
    })
    rows = [f"{i + 1},{float(t)!r},{float(v)!r}" for i, (t, v) in enumerate(zip(train, val))]
    lines = ["epoch,train_loss,val_loss", *rows]
    io.write_text(root / select_stage.curve_path(exp), "\n".join(lines) + "\n")


def unlabeled_windows(seed: int = 0) -> Windows:
    """N_TRAIN training then N_VAL validation windows (min-max normalised random walks), as prepare writes them."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(N_TRAIN + N_VAL, WINDOW, 1)), axis=1) + rng.normal(scale=0.3, size=(1, 1, 4))
    low, high = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    n = N_TRAIN + N_VAL
    return Windows(
        values=((x - low) / (high - low)).astype(np.float32), window_id=np.arange(n, dtype=np.int64),
        start=np.datetime64("2020-01-01T00:00", "ns") + np.arange(n) * np.timedelta64(10, "m"),
        split=np.array(["train"] * N_TRAIN + ["val"] * N_VAL, dtype=object),
    )


def set_compare_on(root: Path, basis: str) -> None:
    text = (root / "params.yaml").read_text()
    assert "compare_on: common" in text
    (root / "params.yaml").write_text(text.replace("compare_on: common", f"compare_on: {basis}"))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    p = load_params(tmp_path / "params.yaml")
    assert list(p.experiments) == EXPERIMENTS and p.data.window == WINDOW and p.select.compare_on == "common"
    io.write_parquet(tmp_path / paths.UNLABELED, windows_table(unlabeled_windows()))
    return tmp_path


def common_masks(p) -> np.ndarray:
    """The common set's masks, drawn here from masking alone: the top-level mask with pretrain's settings and the
    validation stream of `seed` (what pretraining draws for an experiment with those settings)."""
    generator = torch.Generator().manual_seed(_stream_seed(p.seed, "validation"))
    return make_mask(p.mask, N_VAL, WINDOW, ratio=p.pretrain.mask_ratio, generator=generator,
                     patch_size=p.pretrain.patch_size, block_spans=p.pretrain.block_spans).numpy()


def test_picks_lowest_stable_and_says_why_for_every_candidate(workspace):
    set_compare_on(workspace, "own")  # the stability rules, ranked on each experiment's own loss
    write_experiment(workspace, "exp1_baseline", *healthy(start=0.03))
    write_experiment(workspace, "exp2_conservative", *healthy(start=0.02))  # the lowest stable one
    train, val = healthy(start=0.01)
    val[-5:] = val.min() * 3  # best 0.0007, then climbs: diverged
    write_experiment(workspace, "exp3_aggressive", train, val)
    train, val = healthy(start=0.01)
    val[10] = np.nan
    write_experiment(workspace, "exp4_block_mask", train, val)
    write_experiment(workspace, "exp5_random_mask", *healthy(start=0.005), hidden=64)  # lowest loss, wrong size

    report = select_stage.select(workspace)
    assert report["selected"] == "exp2_conservative"
    cands = report["candidates"]
    assert report["best_val_loss"] == pytest.approx(0.02 * 0.9**29)
    assert [c["chosen"] for c in cands.values()] == [False, True, False, False, False]
    assert cands["exp1_baseline"]["passed"] and "stable, but best val loss" in cands["exp1_baseline"]["reason"]
    assert cands["exp2_conservative"]["reason"].startswith("chosen: lowest best val loss")
    assert "diverged" in cands["exp3_aggressive"]["reason"]
    assert "max_final_over_best" in cands["exp3_aggressive"]["reason"]
    assert "non-finite loss at epoch 11" in cands["exp4_block_mask"]["reason"]
    assert "forward hidden size 64, SimpleLSTM needs 128" in cands["exp5_random_mask"]["reason"]
    # Own basis: the common loss is still measured and reported, for every encoder that loads.
    assert report["compare_on"] == "own" and report["common_val_loss"] == cands["exp2_conservative"]["common_val_loss"]
    assert all(np.isfinite(c["common_val_loss"]) for c in cands.values())
    assert "(common val loss " in cands["exp1_baseline"]["reason"]

    selected = (workspace / "data/selected/encoder.pt").read_bytes()
    chosen = (workspace / "data/pretrained/exp2_conservative_encoder.pt").read_bytes()
    assert hashlib.md5(selected).digest() == hashlib.md5(chosen).digest()
    assert json.loads((workspace / "metrics/select.json").read_text()) == report


def test_not_learned_and_overfitting_are_rejected():
    sp = load_params(ROOT / "params.yaml").select

    def curve(train, val):
        return pd.DataFrame({"epoch": np.arange(1, len(val) + 1), "train_loss": train, "val_loss": val})

    val = np.linspace(0.1, 0.06, 30)  # still learning, but above 0.05 at epoch 25
    c = assess("slow", {"best_val_loss": 0.06}, curve(val * 0.9, val), 128, None, sp, 128, 0.06)
    assert c.rejections == [f"did not learn: val loss {val[24]:.4g} at epoch 25 > select.max_val_loss_at_check 0.05"]

    train, val = healthy()
    c = assess("overfit", {"best_val_loss": float(val.min())}, curve(train / 5, val), 128, None, sp, 128, 0.01)
    assert len(c.rejections) == 1 and c.rejections[0].startswith("overfits: final val loss")

    # A tour shorter than check_epoch cannot be judged on learning (even well above 0.05), and the note says so.
    train, val = healthy(epochs=3)
    c = assess("tour", {"best_val_loss": float(val.min())}, curve(train + 0.2, val + 0.2), 128, None, sp, 128, 0.3)
    assert c.passed and c.notes == [
        "ran 3 epochs (< select.check_epoch 25): the did-not-learn check does not apply"]

    c = assess("bad", {"best_val_loss": 0.01}, curve(train, val), None, "x.pt: truncated", sp, 128)
    assert c.rejections == ["checkpoint unusable: x.pt: truncated"]


def test_exact_tie_goes_to_the_fallback():
    sp = load_params(ROOT / "params.yaml").select
    a = Candidate("exp2_conservative", 0.01, common_val_loss=0.02)
    b = Candidate("exp1_baseline", 0.01, common_val_loss=0.02)
    assert choose([a, b], sp.fallback, "common").name == "exp1_baseline"
    assert choose([a, b], sp.fallback, "own").name == "exp1_baseline"


def test_common_loss_is_one_set_of_windows_and_masks_for_every_encoder(workspace):
    """The same weights saved as exp4 (block mask) and exp5 (random mask), with different own-mask losses, score
    the same common loss; a constant-output model scores mean((x - c)^2) over the common set's masked values,
    computed here from the validation rows and masking alone."""
    p = load_params(workspace / "params.yaml")
    for i, exp in enumerate(EXPERIMENTS):
        write_experiment(workspace, exp, *healthy(start=0.01 + 0.01 * i), model=autoencoder(constant=0.2 + 0.1 * i))
    twin = autoencoder(seed=3)
    write_experiment(workspace, "exp4_block_mask", *healthy(start=0.05), model=twin)
    write_experiment(workspace, "exp5_random_mask", *healthy(start=0.002), model=twin)
    report = select_stage.select(workspace)
    cands = report["candidates"]
    assert cands["exp4_block_mask"]["best_val_loss"] != cands["exp5_random_mask"]["best_val_loss"]
    assert cands["exp4_block_mask"]["common_val_loss"] == cands["exp5_random_mask"]["common_val_loss"]

    val = unlabeled_windows().values[N_TRAIN:].astype(np.float64)
    masked = val[common_masks(p)]  # (masked steps, 4)
    for i, exp in enumerate(EXPERIMENTS[:3]):
        expected = float(((masked - (0.2 + 0.1 * i)) ** 2).mean())
        assert cands[exp]["common_val_loss"] == pytest.approx(expected, rel=1e-6)
    common = report["common_validation"]
    assert common == {"windows": N_VAL, "masked_steps": int(common_masks(p).sum()), "mask": p.mask,
                      "mask_ratio": p.pretrain.mask_ratio, "patch_size": p.pretrain.patch_size,
                      "block_spans": p.pretrain.block_spans, "seed": p.seed, "batch_size": p.pretrain.batch_size,
                      "threads": p.pretrain.threads}
    # exp1-3 follow the top-level mask: their own validation masks were the common set's.
    assert [cands[e]["own_masks_are_common"] for e in EXPERIMENTS] == [True, True, True, False, False]
    # Same inputs, same bytes.
    first = (workspace / "metrics/select.json").read_bytes()
    select_stage.select(workspace)
    assert (workspace / "metrics/select.json").read_bytes() == first


def test_the_basis_decides_when_own_and_common_rankings_differ(workspace):
    """exp5's own-mask loss is the lowest (an easy mask), but it reconstructs worst on the common set; exp2 is the
    other way round. common (the default) picks exp2, own picks exp5; both losses are reported either way."""
    constants = {"exp1_baseline": 0.9, "exp2_conservative": 0.5, "exp3_aggressive": 1.2, "exp4_block_mask": 1.5,
                 "exp5_random_mask": 3.0}  # the windows lie in [0, 1]: 0.5 is the nearest to them
    starts = {"exp1_baseline": 0.03, "exp2_conservative": 0.04, "exp3_aggressive": 0.035, "exp4_block_mask": 0.045,
              "exp5_random_mask": 0.01}
    for exp in EXPERIMENTS:
        write_experiment(workspace, exp, *healthy(start=starts[exp]), model=autoencoder(constant=constants[exp]))

    report = select_stage.select(workspace)
    cands = report["candidates"]
    own = {e: c["best_val_loss"] for e, c in cands.items()}
    common = {e: c["common_val_loss"] for e, c in cands.items()}
    assert min(own, key=own.get) == "exp5_random_mask" and min(common, key=common.get) == "exp2_conservative"
    assert report["selected"] == "exp2_conservative" and report["compare_on"] == "common"
    assert report["common_val_loss"] == common["exp2_conservative"]
    assert report["best_val_loss"] == own["exp2_conservative"]
    assert cands["exp2_conservative"]["reason"].startswith("chosen: lowest common val loss")
    assert "(own-mask best val loss " in cands["exp2_conservative"]["reason"]
    assert cands["exp5_random_mask"]["reason"].startswith("stable, but common val loss")
    selected = (workspace / "data/selected/encoder.pt").read_bytes()
    assert selected == (workspace / paths.encoder("exp2_conservative")).read_bytes()

    set_compare_on(workspace, "own")
    report = select_stage.select(workspace)
    assert report["selected"] == "exp5_random_mask" and report["compare_on"] == "own"
    assert {e: c["common_val_loss"] for e, c in report["candidates"].items()} == common

    from moola.report import report as report_table

    table = report_table(workspace, ablation=False)
    assert "Selected encoder: exp5_random_mask (lowest own-mask best val loss" in table
    assert f"common {common['exp5_random_mask']:.5f})" in table


def test_an_encoder_without_a_decoder_cannot_be_ranked_on_the_common_set(workspace):
    for i, exp in enumerate(EXPERIMENTS):
        write_experiment(workspace, exp, *healthy(start=0.01 + 0.01 * i))
    torch.manual_seed(0)
    save_encoder_checkpoint(  # the encoder alone: what moola wrote before it kept the decoder
        workspace / paths.encoder("exp1_baseline"), nn.LSTM(4, 128, batch_first=True, bidirectional=True),
        {"input_size": 4, "hidden_size": 128, "num_layers": 1, "bidirectional": True},
        {"best_val_loss": 0.01, "best_epoch": 30, "epochs_run": 30},
    )
    report = select_stage.select(workspace)
    why = report["candidates"]["exp1_baseline"]["reason"]
    assert why.startswith("rejected: not scored on the common validation set (select.compare_on common): ")
    assert "holds the encoder only" in why and "dvc repro -f -s pretrain@exp1_baseline" in why
    assert report["selected"] != "exp1_baseline"
    set_compare_on(workspace, "own")
    report = select_stage.select(workspace)
    assert report["selected"] == "exp1_baseline" and report["candidates"]["exp1_baseline"]["common_val_loss"] is None
    assert "[no common validation loss: " in report["candidates"]["exp1_baseline"]["reason"]


def test_a_bad_compare_on_is_refused_at_load_naming_the_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["select"]["compare_on"] = "best"
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert str(err.value) == "params.yaml: select.compare_on must be one of 'common', 'own', got 'best'"


def test_no_candidate_passing_is_a_one_line_error_and_writes_nothing(workspace):
    for exp in EXPERIMENTS:
        write_experiment(workspace, exp, np.full(30, 0.09), np.full(30, 0.1))  # flat at 0.1: did not learn
    with pytest.raises(DataError, match="no encoder passed"):
        select_stage.select(workspace)
    proc = run([shutil.which("python") or "python", "-m", "moola.stages.select"], workspace, check=False,
               env={"PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: no encoder passed the select thresholds")
    assert "exp5_random_mask: did not learn: val loss 0.1 at epoch 25" in lines[0]
    assert not (workspace / "data/selected").exists() and not (workspace / "metrics/select.json").exists()


def test_missing_curve_names_the_file(workspace):
    for exp in EXPERIMENTS:
        write_experiment(workspace, exp, *healthy())
    (workspace / select_stage.curve_path("exp3_aggressive")).unlink()
    with pytest.raises(DataError, match=r"plots/pretrain/exp3_aggressive\.csv: not found"):
        select_stage.select(workspace)


def test_a_damaged_encoder_stops_select_instead_of_losing_the_race(workspace):
    for i, exp in enumerate(EXPERIMENTS):
        write_experiment(workspace, exp, *healthy(start=0.01 + 0.01 * i))  # exp1 is the best
    path = workspace / paths.encoder("exp1_baseline")
    weight = torch.load(path, weights_only=True)["state_dict"]["weight_hh_l0"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    data[data.find(weight[:64]) + 101] ^= 0x20  # one bit inside a weight tensor
    path.write_bytes(bytes(data))
    from moola.errors import CheckpointDamaged

    with pytest.raises(CheckpointDamaged, match="exp1_baseline_encoder.pt: weights fail their checksum") as err:
        select_stage.select(workspace)
    assert "dvc repro -f -s pretrain@exp1_baseline" in str(err.value)
    assert not (workspace / paths.SELECTED_ENCODER).exists()
