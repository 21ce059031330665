"""The pretraining-budget curve: its report on predictions made up to know the answer, its fits on real tensors, and
the stage for real (replicates with their snapshots, the curve, its plots, dvc.lock), over the session's reference
run: what `dvc repro budget_curve` runs, and budget_curve run again without finetune's and label_curve's outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef
from torch import nn

from conftest import run
from moola import finetuning, pretraining_budget
from moola.pretraining_budget import BudgetResult, budget_report, run_budget, snapshot_key
from moola.evaluation import HELDOUT_LIFT_METRICS
from moola.models import load_encoder_checkpoint
from moola.params import load_params
from pipeline_runs import stages_run, workspace_md5s
from test_fits import CFG, HIDDEN, data  # the same small fits as tests/test_fits.py

pytest_plugins = ["pipeline_runs"]

LIFTS = ("lift", "lift_same_schedule")

# --- the report -------------------------------------------------------------------------------------------------


def made_up(n: int = 300) -> tuple[np.ndarray, BudgetResult]:
    """Held-out labels and predictions with known error rates: pretrained after 2 epochs is wrong on 15% of the
    windows, after 1 epoch on 40%, like scratch (40%); the schedule-matched scratch row on 35%."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)

    def guesses(error: float, shape: tuple[int, ...]) -> np.ndarray:
        return np.where(rng.random(shape + (n,)) < error, 1 - labels, labels)

    result = BudgetResult(
        epochs=[1, 2], replicates=["r1", "r2"], seeds=[1337, 1338, 1339],
        pretrained={1: guesses(0.40, (2, 3)), 2: guesses(0.15, (2, 3))},
        scratch={"scratch": guesses(0.40, (3,)), "scratch_same_schedule": guesses(0.35, (3,))},
    )
    return labels, result


def mean_over_pairs(score, labels: np.ndarray, predicted: np.ndarray) -> float:
    rows = predicted.reshape(-1, predicted.shape[-1])
    return float(np.mean([score(labels, row) for row in rows]))


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(labels == predicted))


def test_budget_report_layout_and_its_lift_is_the_mean_difference_over_pairs():
    labels, result = made_up()
    report, table = budget_report(labels, result, resamples=200, seed=0, block="auto")
    assert set(report) == {"epochs", "replicates", "seeds", "heldout_windows", "block", "resamples", "covers",
                           "scratch", "by_epoch"}
    assert (report["epochs"], report["replicates"], report["seeds"]) == ([1, 2], ["r1", "r2"], [1337, 1338, 1339])
    assert (report["heldout_windows"], report["block"], report["resamples"]) == (300, 7, 200)  # 300 ** (1/3) ~ 6.7
    assert report["covers"] == ["held-out windows (blocks of 7)", "fine-tuning seeds (3)",
                                "pretraining replicates (2)"]
    assert set(report["scratch"]) == {"scratch", "scratch_same_schedule"}
    assert set(report["by_epoch"]) == {"1", "2"}
    for entry in report["by_epoch"].values():
        assert set(entry["pretrained"]) == set(HELDOUT_LIFT_METRICS)
        for name in LIFTS:
            assert set(entry[name]) == {*HELDOUT_LIFT_METRICS, "verdict"}
            for metric in HELDOUT_LIFT_METRICS:
                lift = entry[name][metric]
                assert lift["ci_low"] <= lift["point"] <= lift["ci_high"], (name, metric)
                assert lift["covers"] == report["covers"]

    # The point of a lift: the mean over (replicate, seed) pairs of pretrained's score minus scratch's mean.
    two = report["by_epoch"]["2"]
    for score, metric in ((accuracy, "accuracy"), (balanced_accuracy_score, "balanced_accuracy"),
                          (matthews_corrcoef, "mcc")):
        pretrained = mean_over_pairs(score, labels, result.pretrained[2])
        assert two["pretrained"][metric]["point"] == pytest.approx(pretrained, abs=1e-6), metric
        for name, row in zip(LIFTS, pretraining_budget.SCRATCH_ROWS):
            expected = pretrained - mean_over_pairs(score, labels, result.scratch[row])
            assert two[name][metric]["point"] == pytest.approx(expected, abs=1e-6), (name, metric)
    # 25 points of accuracy over 300 windows and 6 pairs: an interval well clear of 0; after 1 epoch, nothing.
    assert two["lift"]["accuracy"]["point"] == pytest.approx(0.25, abs=0.06)
    assert two["lift"]["accuracy"]["ci_low"] > 0 and two["lift"]["accuracy"]["contains_zero"] is False
    assert abs(report["by_epoch"]["1"]["lift"]["accuracy"]["point"]) < 0.08

    # The plot table: one row per (epoch, lift), the report's numbers.
    assert list(table.columns) == ["epoch", "lift"] + [
        f"{m}{suffix}" for m in HELDOUT_LIFT_METRICS for suffix in ("", "_low", "_high")]
    assert list(zip(table["epoch"], table["lift"])) == [(e, name) for e in (1, 2) for name in LIFTS]
    for row in table.to_dict("records"):
        for metric in HELDOUT_LIFT_METRICS:
            lift = report["by_epoch"][str(row["epoch"])][row["lift"]][metric]
            assert (row[metric], row[f"{metric}_low"], row[f"{metric}_high"]) == (
                lift["point"], lift["ci_low"], lift["ci_high"])


def test_budget_report_points_do_not_depend_on_the_windows_time_order():
    """`order` decides which windows make a bootstrap block, never a point estimate."""
    labels, result = made_up()
    report, _ = budget_report(labels, result, resamples=100, seed=0, block=5)
    backwards, _ = budget_report(labels, result, resamples=100, seed=0, block=5, order=np.arange(300)[::-1])
    assert report["covers"][0] == "held-out windows (blocks of 5)"
    for epoch in ("1", "2"):
        for name in LIFTS:
            for metric in HELDOUT_LIFT_METRICS:
                assert backwards["by_epoch"][epoch][name][metric]["point"] == pytest.approx(
                    report["by_epoch"][epoch][name][metric]["point"], abs=1e-6)


# --- the fits ---------------------------------------------------------------------------------------------------



def snapshots(replicates: list[str], epochs: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """A distinct encoder state per (replicate, epoch), keyed as the stage keys them."""
    out = {}
    for r, replicate in enumerate(replicates):
        for epoch in epochs:
            torch.manual_seed(100 * r + epoch)
            lstm = nn.LSTM(4, HIDDEN, batch_first=True, bidirectional=True)
            out[snapshot_key(replicate, epoch)] = {k: v.detach().clone() for k, v in lstm.state_dict().items()}
    return out


@pytest.fixture
def keep_torch_threads():
    """run_fits sets this process's torch threads to the fits' own when it trains in process: put them back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_run_budget_shapes_and_scratch_rows_that_no_snapshot_changes(keep_torch_threads):
    values, labels = data()
    heldout, _ = data(7, seed=1)
    replicates, seeds = ["r1", "r2"], [5, 6]
    weights = snapshots(replicates, [1, 3])
    assert snapshot_key("r2", 3) == "r2@3" and len(weights) == 4
    full = run_budget(values, labels, heldout, CFG, weights, [1, 3], replicates, seeds)
    assert (full.epochs, full.replicates, full.seeds) == ([1, 3], replicates, seeds)
    assert set(full.pretrained) == {1, 3} and set(full.scratch) == set(pretraining_budget.SCRATCH_ROWS)
    assert all(full.pretrained[e].shape == (2, 2, 7) for e in (1, 3))
    assert all(full.scratch[row].shape == (2, 7) for row in pretraining_budget.SCRATCH_ROWS)
    assert set(np.unique(np.concatenate([full.pretrained[1].ravel(), full.scratch["scratch"].ravel()]))) <= {0, 1}

    # (replicate, seed) in that order: each cell is the fit from that replicate's snapshot with that seed's start.
    torch.set_num_threads(1)  # what run_fits trained with (threads=1)
    for r, replicate in enumerate(replicates):
        for s, seed in enumerate(seeds):
            fitted = finetuning.train_init("pretrained", values, labels, None, None, CFG, weights[f"{replicate}@3"],
                                           pretraining_budget._train_seed(seed), "cpu", x_heldout=heldout)
            assert np.array_equal(full.pretrained[3][r, s], fitted.heldout_proba.argmax(axis=1)), (replicate, seed)

    # Only epoch 3's snapshots: the same scratch rows (they never see an encoder) and the same epoch-3 row.
    only_last = {k: v for k, v in weights.items() if k.endswith("@3")}
    part = run_budget(values, labels, heldout, CFG, only_last, [3], replicates, seeds)
    assert list(part.pretrained) == [3] and np.array_equal(part.pretrained[3], full.pretrained[3])
    for row in pretraining_budget.SCRATCH_ROWS:
        assert np.array_equal(part.scratch[row], full.scratch[row]), row


# --- the stage, for real -----------------------------------------------------------------------------------------

SEEDS = (101, 102)  # conftest.TINY's replicates.seeds
BUDGET_OUTPUTS = ("plots/budget_curve.csv", "metrics/budget_curve.json")


@pytest.fixture(scope="module")
def repro(reference_run, tmp_path_factory) -> tuple[Path, str, str]:
    """A copy of the session's reference run (pipeline_runs: conftest.TINY, a 16-unit model, every stage run by one
    `dvc repro`; budget_curve ignores its 2 folds): (repo, what `dvc repro budget_curve` would run, the output of
    budget_curve run again).

    The plan is `dvc repro --dry --force budget_curve`: every stage of budget_curve's pipeline, printed, none run.
    Then finetune's and label_curve's outputs leave the workspace and budget_curve really runs again (--force: not
    restored from the run-cache), so it is seen to need neither."""
    repo = tmp_path_factory.mktemp("budget") / "repo"
    shutil.copytree(reference_run.repo, repo, symlinks=True)
    plan = run(["dvc", "repro", "--dry", "--force", "budget_curve"], repo).stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in ("finetune", "label_curve"):
        for out in lock[stage]["outs"]:
            (repo / out["path"]).unlink()
    return repo, plan, run(["dvc", "repro", "--force", "--single-item", "budget_curve"], repo).stdout


def budget_epochs(repo: Path) -> tuple[str, list[int]]:
    """(the selected experiment, the curve's epochs: replicates.snapshot_epochs [1] and the last)."""
    selected = json.loads((repo / "metrics/select.json").read_text())["selected"]
    return selected, load_params(repo / "params.yaml").budget_epochs(selected)


@pytest.mark.integration
@pytest.mark.slow
def test_every_replicate_keeps_its_encoder_and_its_snapshots(repro):
    repo, plan, output = repro
    planned = set(stages_run(plan))
    assert {"select", "replicate@101", "replicate@102", "budget_curve"} <= planned
    assert not {"finetune", "label_curve"} & planned  # budget_curve needs neither
    assert stages_run(output) == ["budget_curve"]
    selected, epochs = budget_epochs(repo)
    last = epochs[-1]
    assert epochs == [1, last] and 2 <= last <= 4  # TINY: 2 to 4 pretraining epochs, whichever is selected
    for seed in SEEDS:
        folder = repo / f"data/replicates/seed{seed}"
        assert sorted(p.name for p in folder.iterdir()) == ["encoder.pt", "epoch_001.pt", f"epoch_{last:03d}.pt"]
        best = load_encoder_checkpoint(folder / "encoder.pt", expect_hidden=16)
        assert best.hyperparams["experiment"] == selected and best.hyperparams["replicate_seed"] == seed
        for epoch in epochs:
            snap = load_encoder_checkpoint(folder / f"epoch_{epoch:03d}.pt", expect_hidden=16)
            assert snap.training["weights_after_epoch"] == snap.training["epochs_run"] == epoch
            assert snap.hyperparams["replicate_seed"] == seed and snap.hyperparams["experiment"] == selected
        # After the last epoch, the best so far is the run's best: what encoder.pt holds.
        assert snap.training["best_epoch"] == best.training["best_epoch"]
        assert snap.training["best_val_loss"] == best.training["best_val_loss"]
        report = json.loads((repo / f"metrics/replicates/seed{seed}.json").read_text())
        assert report["snapshot_epochs"] == epochs and report["epochs_run"] == last
        assert report["replicate_seed"] == seed and report["experiment"] == selected
    first = [load_encoder_checkpoint(repo / f"data/replicates/seed{s}/epoch_001.pt").state_dict for s in SEEDS]
    assert not torch.equal(first[0]["weight_hh_l0"], first[1]["weight_hh_l0"])  # the seed makes a new run


@pytest.mark.integration
@pytest.mark.slow
def test_budget_curve_scores_every_snapshot_epoch(repro, reference_run):
    repo, _, _ = repro
    # Run again (no finetune or label_curve outputs in the workspace): the bytes of the reference run's.
    assert workspace_md5s(repo, BUDGET_OUTPUTS) == {path: reference_run.outputs[path] for path in BUDGET_OUTPUTS}
    selected, epochs = budget_epochs(repo)
    curve = json.loads((repo / "metrics/budget_curve.json").read_text())
    assert curve["experiment"] == selected and curve["epochs"] == epochs
    assert curve["replicates"] == [f"seed{s}" for s in SEEDS] and curve["seeds"] == [1337]
    assert (curve["heldout_windows"], curve["labeled_windows"], curve["epochs_finetune"]) == (300, 89, 2)
    # One fine-tuning seed (TINY): the intervals cover the replicates and the held-out windows, not the seed.
    assert curve["covers"] == ["held-out windows (blocks of 7)", "pretraining replicates (2)"]
    assert set(curve["by_epoch"]) == {str(e) for e in epochs}
    table = pd.read_csv(repo / "plots/budget_curve.csv")
    assert sorted(zip(table["epoch"].tolist(), table["lift"])) == sorted((e, name) for e in epochs for name in LIFTS)
    for row in table.to_dict("records"):
        lift = curve["by_epoch"][str(row["epoch"])][row["lift"]]["accuracy"]
        assert row["accuracy"] == pytest.approx(lift["point"], abs=1e-6)
        assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_records_the_replicates_and_plots_the_curve(repro):
    repo, _, _ = repro
    assert "Data and pipelines are up to date" in run(["dvc", "status", "--with-deps", "budget_curve"], repo).stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for seed in SEEDS:
        outs = {out["path"] for out in lock[f"replicate@{seed}"]["outs"]}
        assert outs == {f"data/replicates/seed{seed}", f"metrics/replicates/seed{seed}.json",
                        f"plots/replicates/seed{seed}.csv"}
    assert {out["path"] for out in lock["budget_curve"]["outs"]} == {"plots/budget_curve.csv",
                                                                     "metrics/budget_curve.json"}
    assert "data/replicates" in {dep["path"] for dep in lock["budget_curve"]["deps"]}

    _, epochs = budget_epochs(repo)
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    fields = {"Held-out lift in accuracy": "accuracy", "Held-out lift in balanced accuracy": "balanced_accuracy",
              "Held-out lift in MCC": "mcc"}
    names = sorted(name for name in shown["data"] if name.startswith("Held-out lift in"))
    assert len(names) == 3
    for prefix, field in fields.items():
        name = next(n for n in names if n.startswith(prefix + " "))
        content = next(e["content"] for e in shown["data"][name] if e.get("content"))
        values = content["data"]["values"]
        assert len(values) == 2 * len(epochs), name
        assert {v["lift"] for v in values} == set(LIFTS), name
        assert {int(float(v["epoch"])) for v in values} == set(epochs), name
        assert {v["field"] for v in values} == {field}, name
