"""Stage pretrain@<exp> for real: `python -m moola.stages.pretrain` and `dvc repro` / `dvc exp run` in a tiny repository."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, make_repo, run

pytest_plugins = ["pipeline_runs"]

STAGES = ROOT / "src" / "moola" / "stages"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not ((STAGES / "prepare.py").exists() and (STAGES / "augment.py").exists()),
        reason="needs the prepare and augment stage modules (src/moola/stages/prepare.py, augment.py)",
    ),
]

EXPERIMENTS = ["exp1_baseline", "exp2_conservative", "exp3_aggressive", "exp4_block_mask", "exp5_random_mask"]
# TINY scale, a small encoder and one thread (two threads crawl on a busy 2-core machine): these tests are
# about the stage and the pipeline, not the model.
SMALL = {"pretrain": {"hidden_size": 16, "decoder_hidden": 16, "threads": 1}}
METRIC_KEYS = {
    "experiment", "mask", "best_val_loss", "best_epoch", "final_val_loss", "final_train_loss", "epochs_run",
    "epochs_planned", "train_samples", "val_samples", "batches_per_epoch", "parameters", "encoder_parameters",
    "precision", "precision_asked", "lstm_dtype", "precision_why",
}


def pretrain_cmd(exp: str) -> list[str]:
    return ["python", "-m", "moola.stages.pretrain", "--experiment", exp]


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_divergence_is_one_line_and_writes_nothing(tmp_path):
    repo = make_repo(tmp_path / "repo", {"pretrain": {"hidden_size": 8, "decoder_hidden": 8, "threads": 1, "learning_rate": 1e30}},
                     git=False)
    run(["python", "-m", "moola.stages.example_market"], repo)
    run(["python", "-m", "moola.stages.prepare"], repo)
    run(["python", "-m", "moola.stages.augment", "--recipe", "warp12_x4"], repo)
    proc = run(pretrain_cmd("exp1_baseline"), repo, check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: exp1_baseline: training diverged at epoch 1")
    assert "Loaded 71 unlabeled windows (57 train, 14 validation); 285 training samples" in proc.stdout
    for path in ["data/pretrained/exp1_baseline_encoder.pt", "metrics/pretrain/exp1_baseline.json",
                 "plots/pretrain/exp1_baseline.csv", "metrics/runtime/pretrain_exp1_baseline.json"]:
        assert not (repo / path).exists(), path


@pytest.mark.slow
def test_dvc_pipeline_runs_skips_and_reruns_only_what_changed(reference_run, tmp_path):
    # The session's reference `dvc repro` (pipeline_runs) ran every stage; work on a private copy of it.
    repo = tmp_path / "repo"
    shutil.copytree(reference_run.repo, repo, symlinks=True)
    assert {f"pretrain@{e}" for e in EXPERIMENTS} <= ran_stages(reference_run.repro_output)
    params = yaml.safe_load((repo / "params.yaml").read_text())

    for exp in EXPERIMENTS:
        encoder = torch.load(repo / f"data/pretrained/{exp}_encoder.pt", weights_only=True)
        mask = params["experiments"][exp].get("mask", params["mask"])
        hp = encoder["hyperparams"]
        assert encoder["format"] == "moola-encoder/1"
        assert (hp["experiment"], hp["mask_strategy"], hp["hidden_size"], hp["window"]) == (exp, mask, 16, 105)
        assert hp["bidirectional"] is True and hp["features"] == ["open", "high", "low", "close"]
        assert (hp["precision"], hp["lstm_dtype"], hp["tf32"]) == ("fp32", "float32", False)
        assert encoder["state_dict"]["weight_hh_l0_reverse"].shape == (64, 16)
        metrics = json.loads((repo / f"metrics/pretrain/{exp}.json").read_text())
        assert set(metrics) == METRIC_KEYS and metrics["mask"] == mask
        assert (metrics["precision"], metrics["lstm_dtype"], metrics["precision_why"]) == ("fp32", "float32", "fp32 as asked")
        assert metrics["epochs_run"] == metrics["epochs_planned"] == encoder["training"]["epochs_run"]
        assert metrics["train_samples"] % 57 == 0 and metrics["val_samples"] == 14
        rows = (repo / f"plots/pretrain/{exp}.csv").read_text().splitlines()
        assert rows[0] == "epoch,train_loss,val_loss" and len(rows) == 1 + metrics["epochs_run"]
        runtime = json.loads((repo / f"metrics/runtime/pretrain_{exp}.json").read_text())
        assert set(runtime) == {"seconds", "samples_per_second", "device", "torch", "threads", "precision", "numerics",
                                "peak_gpu_memory_mib"}
        assert runtime["numerics"]["lstm_dtype"] == "float32" and runtime["numerics"]["tf32"] is False
    assert [json.loads((repo / f"metrics/pretrain/{e}.json").read_text())["epochs_planned"] for e in EXPERIMENTS] == [
        3, 2, 4, 3, 3
    ]
    assert not list((repo / ".moola").rglob("*.pt")), "resume checkpoints are removed after success"

    lock = (repo / "dvc.lock").read_text()
    again = run(["dvc", "repro", "pretrain"], repo)
    assert ran_stages(again.stdout) == set(), again.stdout
    assert (repo / "dvc.lock").read_text() == lock

    # One experiment's own params: that experiment alone re-runs.
    params["experiments"]["exp3_aggressive"]["epochs"] = 50
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(["dvc", "status"], repo).stdout
    assert {line.rstrip(":") for line in status.splitlines() if line.startswith("pretrain@")} == {
        "pretrain@exp3_aggressive"
    }, status
    third = run(["dvc", "repro", "pretrain"], repo)
    assert ran_stages(third.stdout) == {"pretrain@exp3_aggressive"}, third.stdout
    assert json.loads((repo / "metrics/pretrain/exp3_aggressive.json").read_text())["epochs_run"] == 2

    # The top-level mask (`dvc exp run -S mask=random`) is tested through the whole pipeline in test_tour.py.
