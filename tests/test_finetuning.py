"""The out-of-fold training core: freezing, seeding, fold checks and the shape of its predictions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT
from moola import finetuning
from moola.errors import ParamsError
from moola.numerics import Numerics, probe_lstm_dtype
from moola.params import load_params

# finetune: as the repository's params.yaml has it, asking for fp32 (what precision decides is tested below).
SPEC = dataclasses.replace(load_params(ROOT / "params.yaml").finetune, precision="fp32", tf32=False)
HIDDEN = 16
# A small model trained for 3 epochs, 2 of them frozen.
FT = dataclasses.replace(
    SPEC, epochs=3, freeze_epochs=2, batch_size=8, learning_rate=1e-2, encoder_learning_rate=1e-3, weight_decay=1e-4,
    hidden_size=HIDDEN, attention_heads=4, dropout=0.1, grad_clip=1.0, class_weighted=True,
)


def data(n=24, steps=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n - n // 3) + [1] * (n // 3), dtype=np.int64)
    values = rng.random((n, steps, 4)).astype(np.float32)
    values[labels == 1, -3:, 3] += 0.5  # something learnable at the end of the window
    return values, labels, np.arange(100, 100 + n, dtype=np.int64)


def encoder_state():
    torch.manual_seed(5)
    lstm = nn.LSTM(4, HIDDEN, batch_first=True, bidirectional=True)
    return {k: v.detach().clone() for k, v in lstm.state_dict().items()}


def snapshots(init_state):
    x, y, _ = data()
    seen = {}

    def on_epoch(epoch, model, optimizer):
        seen[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    finetuning.train_fold(x[:18], y[:18], x[18:], y[18:], FT, init_state, seed=1, on_epoch=on_epoch)
    return seen


def test_encoder_frozen_then_unfrozen():
    state = encoder_state()
    seen = snapshots(state)
    for epoch in (1, 2):  # frozen: the LSTM is exactly the encoder's forward direction
        for key in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            assert torch.equal(seen[epoch][f"lstm.{key}"], state[key]), (epoch, key)
    assert not torch.equal(seen[3]["lstm.weight_hh_l0"], state["weight_hh_l0"])
    # ...while the head trained from the first epoch.
    assert not torch.equal(seen[1]["head.weight"], seen[2]["head.weight"])


def test_scratch_lstm_trains_from_the_first_epoch():
    seen = snapshots(None)
    assert not torch.equal(seen[1]["lstm.weight_hh_l0"], seen[2]["lstm.weight_hh_l0"])


def test_same_seed_same_predictions_different_seed_different():
    x, y, _ = data()
    run = lambda seed: finetuning.train_fold(x[:18], y[:18], x[18:], y[18:], FT, encoder_state(), seed)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a.proba, b.proba) and a.train_loss == b.train_loss
    assert not np.array_equal(a.proba, c.proba)
    assert len(a.train_loss) == len(a.val_loss) == FT.epochs
    assert np.allclose(a.proba.sum(axis=1), 1.0)


def schedule(init):
    """Per epoch: the LSTM's param group (lr, whether its parameters train) and the head's lr, seen by on_epoch."""
    x, y, _ = data()
    seen = []

    def on_epoch(epoch, model, optimizer):
        lstm_group, other_group = optimizer.param_groups
        assert {id(p) for p in lstm_group["params"]} == {id(p) for p in model.lstm.parameters()}
        trains = {p.requires_grad for p in lstm_group["params"]}
        assert len(trains) == 1
        seen.append((epoch, lstm_group["lr"], trains.pop(), other_group["lr"]))

    finetuning.train_init(init, x[:18], y[:18], x[18:], y[18:], FT, encoder_state(), 1, "cpu", on_epoch=on_epoch)
    return seen


def test_schedule_matched_control_trains_on_the_pretrained_schedule():
    pretrained, same, scratch = (schedule(i) for i in ("pretrained", "scratch_same_schedule", "scratch"))
    # Frozen for freeze_epochs (2 of 3), then the encoder learning rate; the head at the base rate throughout.
    assert pretrained == [(1, 1e-3, False, 1e-2), (2, 1e-3, False, 1e-2), (3, 1e-3, True, 1e-2)]
    assert same == pretrained
    assert scratch == [(1, 1e-2, True, 1e-2), (2, 1e-2, True, 1e-2), (3, 1e-2, True, 1e-2)]


def test_schedule_matched_control_shares_scratchs_lstm_and_every_heads_start():
    x, y, _ = data()
    starts = {}
    for init in finetuning.NETWORK_INITS:
        def first(epoch, model, optimizer, init=init):
            if epoch == 1:
                starts[init] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        finetuning.train_init(init, x[:18], y[:18], None, None, FT, encoder_state(), 1, "cpu", on_epoch=first)
    # Frozen in epoch 1, the two LSTMs on the pretrained schedule are still their starts: scratch's random LSTM
    # (the same fold seed builds the same model) and the encoder's forward direction.
    torch.manual_seed(1)
    fresh = finetuning.SimpleLSTM(HIDDEN, 4, 0.1, input_size=4)
    assert torch.equal(starts["scratch_same_schedule"]["lstm.weight_hh_l0"], fresh.lstm.weight_hh_l0.detach())
    assert torch.equal(starts["pretrained"]["lstm.weight_hh_l0"], encoder_state()["weight_hh_l0"])
    assert not torch.equal(starts["scratch"]["lstm.weight_hh_l0"], fresh.lstm.weight_hh_l0.detach())  # it trained


def test_class_weights_balance_the_classes():
    weights = finetuning.class_weights(np.array([0, 0, 0, 1]))
    assert weights.tolist() == pytest.approx([4 / 6, 4 / 2])


def test_too_many_folds_for_the_smallest_class():
    labels = np.array([0] * 10 + [1] * 3)
    expected = r"finetune\.folds \(5\).*labeled\.parquet \(10 consolidation, 3 retracement\)"
    with pytest.raises(ParamsError, match=expected):
        finetuning.check_folds(labels, 5, "labeled.parquet")
    finetuning.check_folds(labels, 3, "labeled.parquet")


def test_run_oof_predicts_every_window_once_per_seed_and_init():
    x, y, ids = data()
    ft = dataclasses.replace(FT, epochs=2, freeze_epochs=1)
    inits = ("pretrained", "scratch", "scratch_same_schedule", "majority", "logreg")
    logged = []
    other = {k: v + 0.01 for k, v in encoder_state().items()}  # a second pretraining replicate
    result = finetuning.run_oof(x, y, ids, ft, [1337, 1338], 3, inits, {"r1": encoder_state(), "r2": other},
                                log=logged.append, heldout_values=x[:5])
    # Per seed, the mean of that seed's 3 fold models: seeds stay apart so that they can be resampled; the
    # pretrained row has one such set per replicate.
    assert set(result.heldout) == set(inits) and result.heldout["scratch"].shape == (2, 5, 2)
    assert result.heldout["pretrained"].shape == (2, 2, 5, 2)
    assert not np.array_equal(result.heldout["pretrained"][0], result.heldout["pretrained"][1])
    assert np.allclose(result.heldout["logreg"].sum(axis=2), 1.0)
    pred = result.predictions
    assert list(pred.columns) == ["window_id", "fold", "seed", "replicate", "init", "p_consolidation",
                                  "p_retracement", "prediction", "label"]
    rows_per_seed = len(inits) + 1  # pretrained twice (one per replicate)
    assert len(pred) == len(ids) * 2 * rows_per_seed
    counts = pred.groupby(["init", "replicate", "seed", "window_id"]).size()
    assert (counts == 1).all() and len(counts) == len(ids) * 2 * rows_per_seed
    assert set(pred.loc[pred["init"] == "pretrained", "replicate"]) == {"r1", "r2"}
    assert set(pred.loc[pred["init"] != "pretrained", "replicate"]) == {""}
    # Same folds for every init of a seed.
    folds = pred.pivot_table(index=["seed", "window_id"], columns="init", values="fold")
    assert (folds.nunique(axis=1) == 1).all()
    assert list(result.curves.columns) == ["epoch"] + [
        f"{init}_{loss}" for init in finetuning.NETWORK_INITS for loss in ("train_loss", "val_loss")]
    assert len(result.curves) == 2
    assert len(logged) == 2 * rows_per_seed and "fold-averaged accuracy" in logged[0]

    summary = finetuning.summary_report(pred, inits)
    assert set(summary) == set(inits) and set(summary["majority"]["accuracy"]) == {"mean", "std"}
    assert summary["majority"]["recall_retracement"]["mean"] == 0.0
    lifts = finetuning.lift_report(pred, resamples=50, seed=0, block="auto")
    assert set(lifts) == {"lift", "lift_same_schedule"}
    for name, other in (("lift", "scratch"), ("lift_same_schedule", "scratch_same_schedule")):
        lift = lifts[name]
        assert set(lift) == {"accuracy", "balanced_accuracy", "resamples", "verdict"}
        assert lift["accuracy"]["point"] == pytest.approx(
            summary["pretrained"]["accuracy"]["mean"] - summary[other]["accuracy"]["mean"], abs=1e-5
        )
        # 24 windows: blocks of round(24 ** (1/3)) = 3; two seeds; two encoders.
        assert lift["accuracy"]["covers"] == ["out-of-fold windows (blocks of 3)", "fine-tuning seeds (2)",
                                              "pretraining replicates (2)"]
        assert f"pretrained - {other}: " in lift["verdict"]


CPU = torch.device("cpu")
REFUSAL = "could not create a primitive descriptor for the LSTM forward propagation primitive"


def fold(ft, init=None, numerics=None):
    x, y, _ = data()
    return finetuning.train_fold(x[:18], y[:18], x[18:], y[18:], ft, init, seed=1, numerics=numerics)


def test_precision_fp32_and_a_refused_bf16_keep_the_default_bytes():
    plain = fold(FT, encoder_state())
    lines: list[str] = []
    refused = finetuning.finetune_numerics(dataclasses.replace(SPEC, precision="bf16"), CPU, lines.append,
                                           probe=lambda device, dtype: ("", REFUSAL))
    assert refused.ran == "fp32" and lines == [f"fine-tuning: oneDNN refuses a bf16 LSTM on this CPU ({REFUSAL}): "
                                               "running fp32 (the fp32 bytes)"]
    for numerics in (finetuning.finetune_numerics(SPEC, CPU, lines.append), refused):
        again = fold(FT, encoder_state(), numerics)
        assert np.array_equal(again.proba, plain.proba) and again.train_loss == plain.train_loss
    assert len(lines) == 1  # fp32 as asked: nothing to say


def test_bf16_with_the_lstm_outside_autocast_trains():
    """The CUDA fallback (cuDNN would run the LSTM in float16), run on the CPU: SimpleLSTM's LSTM leaves autocast."""
    numerics = Numerics("bf16", torch.bfloat16, False, False, "float32", False, "test")
    run = fold(dataclasses.replace(FT, epochs=6, freeze_epochs=0), numerics=numerics)
    assert run.train_loss[-1] < run.train_loss[0] and np.isfinite(run.proba).all()


@pytest.mark.skipif(probe_lstm_dtype(CPU, torch.bfloat16)[0] != "bfloat16",
                    reason="this CPU's oneDNN does not run the LSTM in bf16 (the fallback is tested above)")
def test_bf16_on_a_cpu_that_runs_it_trains_and_is_deterministic():
    numerics = finetuning.finetune_numerics(dataclasses.replace(SPEC, precision="bf16"), CPU, lambda _: None)
    assert (numerics.ran, numerics.lstm_dtype) == ("bf16", "bfloat16")
    ft = dataclasses.replace(FT, epochs=6, freeze_epochs=0)
    first, second = fold(ft, numerics=numerics), fold(ft, numerics=numerics)
    assert first.train_loss[-1] < first.train_loss[0]
    assert np.array_equal(first.proba, second.proba) and first.train_loss == second.train_loss
    assert not np.array_equal(first.proba, fold(ft).proba)
