"""Stage `select`: the lowest validation loss among stable, compatible encoders, with a reason for every one."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import ROOT, run
from moola import io
from moola.errors import DataError
from moola.models import save_encoder_checkpoint
from moola.params import load_params
from moola.selection import Candidate, assess, choose
from moola.stages import select as select_stage

EXPERIMENTS = ["exp1_baseline", "exp2_conservative", "exp3_aggressive", "exp4_block_mask", "exp5_random_mask"]


def healthy(epochs=30, start=0.03):
    val = start * 0.9 ** np.arange(epochs)
    return 0.9 * val, val


def write_experiment(root: Path, exp: str, train, val, hidden: int = 128) -> None:
    torch.manual_seed(0)
    save_encoder_checkpoint(
        root / select_stage.encoder_path(exp),
        nn.LSTM(4, hidden, batch_first=True, bidirectional=True),
        {"input_size": 4, "hidden_size": hidden, "num_layers": 1, "bidirectional": True, "experiment": exp},
        {"best_val_loss": float(np.nanmin(val)), "best_epoch": int(np.nanargmin(val)) + 1, "epochs_run": len(val)},
    )
    best = float(np.min(val)) if np.isfinite(val).all() else None
    io.write_json(root / select_stage.metrics_path(exp), {
        "experiment": exp, "best_val_loss": best, "final_val_loss": float(val[-1]) if best else None,
        "epochs_run": len(val),
    })
    rows = [f"{i + 1},{float(t)!r},{float(v)!r}" for i, (t, v) in enumerate(zip(train, val))]
    lines = ["epoch,train_loss,val_loss", *rows]
    io.write_text(root / select_stage.curve_path(exp), "\n".join(lines) + "\n")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    assert list(load_params(tmp_path / "params.yaml").experiments) == EXPERIMENTS
    return tmp_path


def test_picks_lowest_stable_and_says_why_for_every_candidate(workspace):
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

    selected = (workspace / "data/selected/encoder.pt").read_bytes()
    chosen = (workspace / "data/pretrained/exp2_conservative_encoder.pt").read_bytes()
    assert hashlib.md5(selected).digest() == hashlib.md5(chosen).digest()
    assert json.loads((workspace / "metrics/select.json").read_text()) == report


def test_not_learned_and_overfitting_are_rejected():
    sp = load_params(ROOT / "params.yaml").select

    def curve(train, val):
        return pd.DataFrame({"epoch": np.arange(1, len(val) + 1), "train_loss": train, "val_loss": val})

    val = np.linspace(0.1, 0.06, 30)  # still learning, but above 0.05 at epoch 25
    c = assess("slow", {"best_val_loss": 0.06}, curve(val * 0.9, val), 128, None, sp, 128)
    assert c.rejections == [f"did not learn: val loss {val[24]:.4g} at epoch 25 > select.max_val_loss_at_check 0.05"]

    train, val = healthy()
    c = assess("overfit", {"best_val_loss": float(val.min())}, curve(train / 5, val), 128, None, sp, 128)
    assert len(c.rejections) == 1 and c.rejections[0].startswith("overfits: final val loss")

    # A tour shorter than check_epoch cannot be judged on learning (even well above 0.05), and the note says so.
    train, val = healthy(epochs=3)
    c = assess("tour", {"best_val_loss": float(val.min())}, curve(train + 0.2, val + 0.2), 128, None, sp, 128)
    assert c.passed and c.notes == [
        "ran 3 epochs (< select.check_epoch 25): the did-not-learn check does not apply"]

    c = assess("bad", {"best_val_loss": 0.01}, curve(train, val), None, "x.pt: truncated", sp, 128)
    assert c.rejections == ["checkpoint unusable: x.pt: truncated"]


def test_exact_tie_goes_to_the_fallback():
    sp = load_params(ROOT / "params.yaml").select
    a = Candidate("exp2_conservative", 0.01)
    b = Candidate("exp1_baseline", 0.01)
    assert choose([a, b], sp.fallback).name == "exp1_baseline"


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
    path = workspace / select_stage.encoder_path("exp1_baseline")
    weight = torch.load(path, weights_only=True)["state_dict"]["weight_hh_l0"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    data[data.find(weight[:64]) + 101] ^= 0x20  # one bit inside a weight tensor
    path.write_bytes(bytes(data))
    from moola.errors import CheckpointDamaged

    with pytest.raises(CheckpointDamaged, match="exp1_baseline_encoder.pt: weights fail their checksum") as err:
        select_stage.select(workspace)
    assert "dvc repro -f -s pretrain@exp1_baseline" in str(err.value)
    assert not (workspace / select_stage.SELECTED_ENCODER).exists()
