"""Pretraining replicates: their params are refused at load when a snapshot could never be reached, and a snapshot is
the encoder exactly as a run stopped after that epoch would have left it, killed and resumed or not."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from moola.errors import ParamsError
from moola.params import Experiment, parse_params
from moola.pretraining import pretrain
from moola.stages.replicate import replicate_experiment, snapshot_training
from test_pretraining import tiny_experiment, tiny_windows

ROOT = Path(__file__).resolve().parents[1]


def spec() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def refused(raw: dict, message: str) -> str:
    """The one-line ParamsError that parse_params raises for `raw`, checked to contain `message`."""
    with pytest.raises(ParamsError, match=re.escape(message)) as info:
        parse_params(raw)
    text = str(info.value)
    assert "\n" not in text and text.startswith("params.yaml: ")
    return text


@pytest.mark.parametrize(
    "replicates, message",
    [
        ({"seeds": []}, "replicates.seeds must be a non-empty list, got []"),  # zero replicates
        ({"seeds": [101, 102, 101]}, "replicates.seeds must be distinct, got [101, 102, 101]"),
        ({"snapshot_epochs": [1, 4, 2]}, "replicates.snapshot_epochs must be increasing epochs"),
        ({"snapshot_epochs": [1, 2, 2, 4]}, "replicates.snapshot_epochs must be increasing epochs"),
        ({"snapshot_epochs": [0, 1, 2]}, "replicates.snapshot_epochs must be increasing epochs, each at least 1"),
        ({"snapshot_epochs": [-1, 2]}, "replicates.snapshot_epochs must be increasing epochs, each at least 1"),
        ({"epochs": -1}, "replicates.epochs must be at least 0, got -1"),
        ({"epochs": 10, "snapshot_epochs": [1, 2, 20]},
         "replicates.snapshot_epochs [1, 2, 20] goes beyond replicates.epochs (10)"),
    ],
)
def test_bad_replicates_are_one_line_errors_naming_the_key(replicates, message):
    raw = spec()
    raw["replicates"].update(replicates)
    refused(raw, message)


def test_snapshots_past_the_shortest_experiment_are_refused_when_replicates_run_the_selected_one():
    """replicates.epochs 0 runs whichever experiment select picks: every snapshot must exist in the shortest."""
    raw = spec()
    raw["scale"]["epochs"] = 0.1  # exp2_conservative: 50 -> 5 epochs, the shortest
    assert raw["replicates"]["epochs"] == 0
    text = refused(raw, "replicates.snapshot_epochs [1, 2, 4, 8, 16, 32] goes beyond the 5 epochs of "
                        "exp2_conservative")
    assert "expected epochs up to 5" in text
    raw["replicates"]["snapshot_epochs"] = [1, 2, 4, 5]  # the last epoch itself is reachable
    assert parse_params(raw).budget_epochs("exp2_conservative") == [1, 2, 4, 5]
    # A number of epochs of their own frees the replicates from the experiments' lengths.
    raw["replicates"].update(epochs=40, snapshot_epochs=[1, 8, 32])
    p = parse_params(raw)
    assert p.budget_epochs("exp2_conservative") == p.budget_epochs("exp3_aggressive") == [1, 8, 32, 40]


def test_budget_epochs_are_the_snapshots_and_the_last_epoch():
    p = parse_params(spec())
    assert p.replicates.seeds == [101, 102, 103] and p.replicates.epochs == 0
    assert p.budget_epochs("exp1_baseline") == [1, 2, 4, 8, 16, 32, 75]
    assert p.budget_epochs("exp3_aggressive") == [1, 2, 4, 8, 16, 32, 100]
    # A replicate is the selected experiment in every setting but its epochs.
    exp = replicate_experiment(p, "exp2_conservative")
    assert exp == p.experiment("exp2_conservative") and exp.epochs == 50
    raw = spec()
    raw["replicates"]["epochs"] = 40
    p = parse_params(raw)
    exp = replicate_experiment(p, "exp3_aggressive")
    assert exp.epochs == 40 and exp.train == p.experiment("exp3_aggressive").train
    assert p.budget_epochs("exp3_aggressive") == [1, 2, 4, 8, 16, 32, 40]


# --- snapshots ------------------------------------------------------------------------------------------------


def quiet(_: str) -> None:
    pass


def run(exp: Experiment, snapshot_epochs, **kwargs):
    kwargs.setdefault("log", quiet)
    return pretrain(tiny_windows(64), tiny_windows(12, seed=1), exp, 7, snapshot_epochs=snapshot_epochs, **kwargs)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight():
    """Three epochs, uninterrupted, with snapshots after epochs 1 and 2."""
    return run(tiny_experiment(3), [1, 2])


def test_a_snapshot_is_the_encoder_of_a_run_stopped_at_that_epoch(straight):
    assert list(straight.snapshots) == [1, 2]
    # The encoder's (nn.LSTM) weights only, what a snapshot checkpoint holds (stages.replicate.save_snapshot).
    assert list(straight.snapshots[1]) == list(nn.LSTM(4, 8, batch_first=True, bidirectional=True).state_dict())
    assert not torch.equal(straight.snapshots[1]["weight_hh_l0"], straight.snapshots[2]["weight_hh_l0"])
    # Training went on after epoch 2: a snapshot that shared storage with the live weights would hold epoch 3's.
    stopped = run(dataclasses.replace(tiny_experiment(3), epochs=2), [2])
    assert list(stopped.snapshots) == [2] and stopped.history == straight.history[:2]
    assert same_weights(stopped.snapshots[2], straight.snapshots[2])
    # An epoch the run never reaches has no snapshot (the params refuse asking for one: see above).
    assert list(run(dataclasses.replace(tiny_experiment(3), epochs=2), [1, 3]).snapshots) == [1]


def test_a_killed_and_resumed_run_keeps_the_same_snapshots(tmp_path, straight):
    resume = tmp_path / "resume" / "exp_tiny.pt"
    # A run of 1 of the same 3 epochs leaves the state of epoch 1 behind, as a run killed after it would.
    run(dataclasses.replace(tiny_experiment(3), epochs=1), [1, 2], resume_path=resume, fingerprint="f")
    saved = torch.load(resume, weights_only=True)
    assert saved["epoch"] == 1 and list(saved["snapshots"]) == ["1"]
    lines: list[str] = []
    resumed = run(tiny_experiment(3), [1, 2], resume_path=resume, fingerprint="f", log=lines.append)
    assert any("Resuming" in line and "epoch 1 done" in line for line in lines)
    assert not any("epoch 1/3" in line for line in lines)  # epoch 1 was not trained again
    assert list(resumed.snapshots) == [1, 2] and resumed.history == straight.history
    for epoch in (1, 2):
        assert same_weights(resumed.snapshots[epoch], straight.snapshots[epoch]), epoch
    assert list(torch.load(resume, weights_only=True)["snapshots"]) == ["1", "2"]  # kept for the next kill


def test_snapshot_training_reports_the_run_up_to_its_epoch_not_the_best_overall():
    history = [(1, 0.50, 0.40), (2, 0.40, 0.30), (3, 0.30, 0.35), (4, 0.20, 0.10)]
    assert snapshot_training(history, 3) == {"best_val_loss": 0.30, "best_epoch": 2, "epochs_run": 3,
                                             "weights_after_epoch": 3, "val_loss": 0.35}
    assert snapshot_training(history, 1) == {"best_val_loss": 0.40, "best_epoch": 1, "epochs_run": 1,
                                             "weights_after_epoch": 1, "val_loss": 0.40}
    assert snapshot_training(history, 4)["best_epoch"] == 4
