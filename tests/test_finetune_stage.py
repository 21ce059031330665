"""What `finetune` and `select` wrote after a real `dvc repro` of the whole pipeline.

The run is the session's shared reference run (pipeline_runs.reference_run: TINY scale, a small model, 2 folds);
these tests work on a copy of it. Bad-input checks run last and restore what they change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import shutil

from conftest import ROOT, run
from moola.answer import headline
from moola.evaluation import METRICS
from moola.models import save_encoder_checkpoint
from moola.params import CLASS_NAMES, load_params
from moola.windows import read_windows

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ["prepare", "augment", "pretrain", "select", "finetune"]
MISSING = [s for s in STAGES if not (ROOT / "src/moola/stages" / f"{s}.py").exists()]
INITS = ["pretrained", "scratch", "scratch_same_schedule", "majority", "logreg"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


pytest_plugins = ["pipeline_runs"]


@pytest.fixture(scope="module")
def pipeline(reference_run, tmp_path_factory) -> Path:
    if MISSING:
        pytest.skip(f"stages not written yet: {', '.join(MISSING)}")
    repo = tmp_path_factory.mktemp("finetune") / "repo"
    shutil.copytree(reference_run.repo, repo, symlinks=True)  # workspace, git and DVC cache: a private copy
    return repo


def test_finetune_metrics_layout(pipeline):
    p = load_params(pipeline / "params.yaml")
    report = json.loads((pipeline / "metrics/finetune.json").read_text())
    for init in INITS:
        assert set(report[init]) == set(METRICS), init
        for metric in METRICS:
            assert set(report[init][metric]) == {"mean", "std"}
    assert report["majority"]["recall_retracement"]["mean"] == 0.0
    for name, other in (("lift", "scratch"), ("lift_same_schedule", "scratch_same_schedule")):
        for metric in ("accuracy", "balanced_accuracy"):
            lift = report[name][metric]
            assert lift["ci_low"] <= lift["point"] <= lift["ci_high"]
            assert isinstance(lift["contains_zero"], bool)
            expected = report["pretrained"][metric]["mean"] - report[other][metric]["mean"]
            assert lift["point"] == pytest.approx(expected, abs=1e-5)
        assert report[name]["resamples"] == p.finetune.bootstrap and "one window of 89" in report[name]["verdict"]
    assert set(report["criteria"]) == {"accuracy_above_64pct", "retracement_recall_above_40pct",
                                       "every_class_recall_above_30pct", "all_met"}
    assert report["windows"] == 89 and report["folds"] == p.finetune.folds and report["seeds"] == p.finetune.seeds
    assert report["epochs"] == p.finetune.epochs == 2 and report["freeze_epochs"] == p.finetune.freeze_epochs == 1
    assert (report["precision"], report["precision_why"]) == ("fp32", "fp32 as asked")

    selected = json.loads((pipeline / "metrics/select.json").read_text())
    assert report["selected_encoder"] == selected["selected"]
    assert md5(pipeline / "data/selected/encoder.pt") == md5(pipeline / selected["encoder"])
    assert set(selected["candidates"]) == set(p.experiments)
    # The headline is finetune.json's held-out numbers, and the selected encoder's own best validation loss.
    answer = json.loads((pipeline / "metrics/answer.json").read_text())
    checkpoint = torch.load(pipeline / "data/selected/encoder.pt", weights_only=True)
    assert answer == headline(report, selected["selected"], checkpoint["training"]["best_val_loss"])
    lift = report["heldout"]["lift"]["accuracy"]
    assert answer["lift_acc"] == round(lift["point"], 3) and answer["test_windows"] == report["heldout"]["windows"]
    assert answer["selected_val_loss"] == pytest.approx(selected["candidates"][selected["selected"]]["best_val_loss"],
                                                       rel=1e-3)


def test_select_ranked_every_encoder_on_one_common_validation_set(pipeline):
    """select scored the five real encoders on the validation split pretraining used, masked as the top-level
    mask's experiments were validated: for those, the common loss is their own best validation loss, exactly, when
    both ran on the CPU. The pick is the lowest common loss among the stable ones; the report shows both losses;
    a re-run gives the same bytes and leaves `dvc status` clean."""
    from moola.report import report as report_table

    p = load_params(pipeline / "params.yaml")
    selected = json.loads((pipeline / "metrics/select.json").read_text())
    assert selected["compare_on"] == p.select.compare_on == "common"
    unlabeled = read_windows(pipeline / "data/prepared/unlabeled_windows.parquet")
    common = selected["common_validation"]
    assert common["windows"] == int((unlabeled.split == "val").sum()) == 14
    assert (common["mask"], common["seed"], common["batch_size"]) == (p.mask, p.seed, p.pretrain.batch_size)
    cands = selected["candidates"]
    for exp, c in cands.items():
        own = json.loads((pipeline / f"metrics/pretrain/{exp}.json").read_text())
        assert c["best_val_loss"] == own["best_val_loss"] and np.isfinite(c["common_val_loss"]), exp
        assert c["own_masks_are_common"] == (p.experiment(exp).mask == p.mask), exp
        ran_on = json.loads((pipeline / f"metrics/runtime/pretrain_{exp}.json").read_text())["device"]
        if c["own_masks_are_common"] and ran_on.startswith("cpu"):
            assert c["common_val_loss"] == own["best_val_loss"], exp  # the same windows, masks and arithmetic
    assert [c["own_masks_are_common"] for c in cands.values()] == [True, True, True, False, False]
    stable = {exp: c["common_val_loss"] for exp, c in cands.items() if c["passed"]}
    assert selected["selected"] == min(stable, key=stable.get)
    assert selected["common_val_loss"] == cands[selected["selected"]]["common_val_loss"]

    table = report_table(pipeline, ablation=False)
    chosen_line = f"Selected encoder: {selected['selected']} (lowest common val loss {selected['common_val_loss']:.5f}"
    assert chosen_line in table
    assert f"{cands['exp5_random_mask']['common_val_loss']:>10.5f}" in table

    outputs = ["metrics/select.json", "data/selected/encoder.pt"]
    before = {path: md5(pipeline / path) for path in outputs}
    run(["dvc", "repro", "-f", "-s", "select"], pipeline)
    assert {path: md5(pipeline / path) for path in outputs} == before
    assert "Data and pipelines are up to date" in run(["dvc", "status"], pipeline).stdout


def test_oof_predictions_cover_every_window_once_per_seed_init_and_replicate(pipeline):
    p = load_params(pipeline / "params.yaml")
    labeled = read_windows(pipeline / "data/prepared/labeled_windows.parquet")
    oof = pd.read_parquet(pipeline / "data/finetune/oof_predictions.parquet")
    assert list(oof.columns) == ["window_id", "fold", "seed", "replicate", "init", "p_consolidation",
                                 "p_retracement", "prediction", "label"]
    # The pretrained init once per pretraining replicate (its encoder), every other init once.
    replicates = [f"seed{s}" for s in p.replicates.seeds]
    assert replicates == ["seed101", "seed102"]
    assert len(oof) == 89 * len(p.finetune.seeds) * (len(INITS) - 1 + len(replicates))
    assert sorted(oof["init"].unique()) == sorted(INITS)
    assert sorted(oof.loc[oof["init"] == "pretrained", "replicate"].unique()) == replicates
    assert set(oof.loc[oof["init"] != "pretrained", "replicate"]) == {""}
    counts = oof.groupby(["init", "replicate", "seed", "window_id"]).size()
    assert (counts == 1).all() and len(counts) == len(oof)
    # Two encoders, two fine-tunings: their predictions differ.
    pretrained = oof[oof["init"] == "pretrained"].pivot(index=["seed", "window_id"], columns="replicate",
                                                         values="p_consolidation")
    assert not np.allclose(pretrained["seed101"], pretrained["seed102"])
    assert set(oof["window_id"]) == set(labeled.window_id.tolist())
    truth = dict(zip(labeled.window_id.tolist(), labeled.label.tolist()))
    assert (oof["label"] == oof["window_id"].map(truth)).all()
    assert np.allclose(oof["p_consolidation"] + oof["p_retracement"], 1.0)
    assert set(oof["fold"]) == set(range(p.finetune.folds))

    for init in ("pretrained", "scratch", "scratch_same_schedule"):
        confusion = pd.read_csv(pipeline / f"plots/finetune/confusion_{init}.csv")
        assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 89
        assert set(confusion["actual"]) <= set(CLASS_NAMES) and set(confusion["predicted"]) <= set(CLASS_NAMES)
    curves = pd.read_csv(pipeline / "plots/finetune/curves.csv")
    assert list(curves.columns) == ["epoch"] + [
        f"{init}_{loss}" for init in ("pretrained", "scratch", "scratch_same_schedule")
        for loss in ("train_loss", "val_loss")]
    assert curves["epoch"].tolist() == [1, 2]


def test_ablation_rows_carry_their_encoders_pretraining_loss(pipeline):
    p = load_params(pipeline / "params.yaml")
    for exp in p.experiments:
        row = json.loads((pipeline / f"metrics/ablation/{exp}.json").read_text())
        checkpoint = torch.load(pipeline / f"data/pretrained/{exp}_encoder.pt", weights_only=True)
        assert row["experiment"] == exp
        assert row["pretrain"] == {k: checkpoint["training"][k] for k in ("best_val_loss", "best_epoch", "epochs_run")}
        assert set(row["pretrained"]) == set(METRICS) and "scratch" not in row
        assert row["windows"] == 89 and set(row["criteria"]) >= {"all_met"}
    shown = run(["dvc", "metrics", "show", "metrics/finetune.json", "metrics/ablation"], pipeline).stdout
    assert "pretrained.accuracy.mean" in shown and "lift.accuracy.ci_low" in shown


def test_rerun_gives_the_same_bytes_and_repro_is_a_no_op(pipeline):
    outputs = ["data/finetune/oof_predictions.parquet", "metrics/finetune.json", "metrics/answer.json",
               "plots/finetune/curves.csv", "plots/finetune/confusion_pretrained.csv",
               "plots/finetune/lift_per_seed.csv", "dvc.lock"]
    before = {path: md5(pipeline / path) for path in outputs}
    run(["dvc", "repro", "-f", "-s", "finetune"], pipeline, timeout=900)
    assert {path: md5(pipeline / path) for path in outputs} == before
    assert "Data and pipelines are up to date" in run(["dvc", "status"], pipeline).stdout


def stage_error(repo: Path, *args: str) -> str:
    proc = run(["python", "-m", "moola.stages.finetune", *args], repo, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_inputs_fail_in_one_line_and_leave_outputs_alone(pipeline):
    outputs = ["metrics/finetune.json", "data/finetune/oof_predictions.parquet", "metrics/ablation/exp1_baseline.json"]
    before = {path: md5(pipeline / path) for path in outputs}
    params_file = pipeline / "params.yaml"
    original = params_file.read_text()
    p = load_params(params_file)
    hidden = p.finetune.hidden_size
    try:
        params_file.write_text(original.replace(f"folds: {p.finetune.folds}", "folds: 40"))
        message = stage_error(pipeline)
        assert "finetune.folds (40)" in message and "consolidation" in message and "retracement" in message
    finally:
        params_file.write_text(original)

    assert "encoder checkpoint not found" in stage_error(
        pipeline, "--encoder", "data/pretrained/nope.pt", "--ablation", "exp1_baseline")
    torch.manual_seed(0)
    small = pipeline / "small_encoder.pt"
    save_encoder_checkpoint(small, nn.LSTM(4, 64, batch_first=True, bidirectional=True),
                            {"input_size": 4, "hidden_size": 64, "num_layers": 1, "bidirectional": True},
                            {"best_val_loss": 0.01, "best_epoch": 1, "epochs_run": 1})
    message = stage_error(pipeline, "--encoder", str(small), "--ablation", "exp1_baseline")
    assert f"hidden_size is 64, expected {hidden}" in message
    assert f"({4 * hidden}, {hidden})" in message and "(256, 64)" in message
    assert "not an experiment" in stage_error(pipeline, "--ablation", "exp9")
    small.unlink()
    assert {path: md5(pipeline / path) for path in outputs} == before
