"""`moola deep`: the replicates pinned to one experiment (replicates.experiment), the command's settings, the command
end to end through real `dvc exp run` at a tiny scale, and a killed replicate resuming to the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run
from moola import paths
from moola.cli import DEEP_SET, TARGETS
from moola.models import load_encoder_checkpoint
from moola.params import load_params, parse_params
from moola.stages.replicate import replicate_experiment
from pipeline_runs import stages_run
from test_reliability import completed_epochs  # how the suite kills a stage mid-run: poll the resume checkpoint
from test_replicates import refused  # a one-line ParamsError naming the key
from test_tour import SHRINK, run_in_copy

pytest_plugins = ["pipeline_runs"]

# The tour's shrink (a copy of the reference run's scale), and a replicate of 2 epochs instead of 75: DEEP_SET's own
# snapshots (to epoch 64) would be refused, and one seed instead of the reference run's two. The reference run's
# fp32 too: DEEP_SET's bf16 (test_deep_set_is_exp1_baseline_at_the_spec_depth) is a pretrain param, so it would
# train all five experiments and select again; with it overridden they are the reference run's, and only the
# replicate, finetune and budget_curve run.
DEEP_SHRINK = [*SHRINK, "-S", "replicates.epochs=2", "-S", "replicates.snapshot_epochs=[1]",
               "-S", "replicates.seeds=[101]", "-S", "pretrain.precision=fp32"]
RESUME = Path(".moola/resume/pretrain/replicate_seed101.pt")


def spec() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_sets(sets: dict[str, str]) -> dict:
    """params.yaml with `-S key=value` options applied, each value read as YAML (as DVC reads them)."""
    raw = spec()
    for key, value in sets.items():
        *sections, last = key.split(".")
        node = raw
        for section in sections:
            node = node[section]  # a section params.yaml lacks is a typo in the set, not a new section
        node[last] = yaml.safe_load(value)
    return raw


# --- params -----------------------------------------------------------------------------------------------------


def test_an_unknown_replicated_experiment_is_one_line_naming_the_key():
    raw = spec()
    raw["replicates"]["experiment"] = "exp9"
    refused(raw, "replicates.experiment 'exp9' is not an experiment (expected selected or one of: exp1_baseline, ")


def test_a_pinned_experiment_is_replicated_whatever_select_picks_and_bounds_the_snapshots():
    raw = spec()
    assert parse_params(raw).replicated("exp5_random_mask") == "exp5_random_mask"  # `selected`: select's choice
    raw = spec()
    raw["scale"]["epochs"] = 0.1  # exp2_conservative: 50 -> 5 epochs; exp3_aggressive: 100 -> 10
    raw["replicates"].update(experiment="exp2_conservative", epochs=0)
    text = refused(raw, "replicates.snapshot_epochs [1, 2, 4, 8, 16, 32] goes beyond the 5 epochs of "
                        "exp2_conservative (replicates.experiment;")
    assert "expected epochs up to 5" in text
    raw = spec()
    raw["scale"]["epochs"] = 0.1
    raw["replicates"].update(experiment="exp2_conservative", epochs=0, snapshot_epochs=[1, 2, 4, 5])
    p = parse_params(raw)
    assert p.replicated("exp5_random_mask") == "exp2_conservative"
    assert replicate_experiment(p, p.replicated("exp5_random_mask")) == p.experiment("exp2_conservative")
    assert p.budget_epochs(p.replicated("exp5_random_mask")) == [1, 2, 4, 5]
    # Pinned, the snapshots are checked against that experiment's epochs, not the shortest one select may pick.
    raw = spec()
    raw["scale"]["epochs"] = 0.1
    raw["replicates"].update(experiment="exp3_aggressive", epochs=0, snapshot_epochs=[1, 2, 4, 8])
    assert parse_params(raw).budget_epochs("exp3_aggressive") == [1, 2, 4, 8, 10]
    raw = spec()
    raw["scale"]["epochs"] = 0.1
    raw["replicates"].update(snapshot_epochs=[1, 2, 4, 8])  # experiment: selected
    refused(raw, "goes beyond the 5 epochs of exp2_conservative, the shortest experiment select may pick")


def test_deep_set_is_exp1_baseline_at_the_spec_depth():
    p = parse_params(with_sets(DEEP_SET))
    assert p.replicated("exp3_aggressive") == "exp1_baseline"  # pinned, whatever select picks
    assert p.budget_epochs("exp1_baseline") == [1, 2, 4, 8, 16, 32, 64, 75]
    exp = replicate_experiment(p, "exp1_baseline")
    assert exp.epochs == 75 and exp.train.batch_size == 2048 == p.pretrain.batch_size  # the spec's
    assert p.pretrain.precision == "bf16" and p.finetune.precision == "fp32"
    assert p.unlabeled_windows == 11873 and p.replicates.seeds == [101]
    # select still runs, on one epoch per experiment.
    assert {e.name: e.epochs for e in p.all_experiments()} == dict.fromkeys(p.experiments, 1)
    assert TARGETS["deep"] == ["finetune", "budget_curve"]  # no label curve, no ablation


# --- `moola deep` through DVC -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_run(reference_run, tmp_path_factory):
    return run_in_copy(reference_run, tmp_path_factory, "deep", DEEP_SHRINK)


@pytest.mark.integration
@pytest.mark.slow
def test_deep_replicates_exp1_baseline_and_draws_the_budget_curve_through_dvc(deep_run):
    repo, out = deep_run
    command = out.splitlines()[0]
    assert command.startswith("$ dvc exp run -S scale.windows=1.0") and command.endswith(" finetune budget_curve")
    assert " -S replicates.experiment=exp1_baseline " in command
    # DEEP_SET first, the user's options after: DVC applies -S in order, so the user's win.
    assert command.index(" -S replicates.epochs=75 ") < command.index(" -S replicates.epochs=2 ")
    assert command.index(" -S pretrain.precision=bf16 ") < command.index(" -S pretrain.precision=fp32 ")
    ran = stages_run(out)
    assert {"replicate@101", "finetune", "budget_curve"} <= set(ran), ran
    assert "replicate@102" not in ran and "'label_curve'" not in out and "finetune_ablation" not in out
    # Only what the pin and the replicate settings change runs: the pretraining runs and select are the reference's.
    assert not [name for name in ran if name.startswith("pretrain@") or name == "select"], ran
    p = load_params(repo / "params.yaml")
    assert (p.replicates.experiment, p.replicates.epochs, p.replicates.seeds) == ("exp1_baseline", 2, [101])
    assert (p.pretrain.precision, p.scale.windows) == ("fp32", 0.006)

    folder = repo / paths.replicate_dir(101)
    assert sorted(f.name for f in folder.iterdir()) == ["encoder.pt", "epoch_001.pt", "epoch_002.pt"]
    encoder = load_encoder_checkpoint(folder / paths.REPLICATE_ENCODER)
    assert (encoder.hyperparams["experiment"], encoder.hyperparams["replicate_seed"]) == ("exp1_baseline", 101)
    replicate = json.loads((repo / paths.replicate_metrics(101)).read_text())
    assert (replicate["experiment"], replicate["epochs_run"]) == ("exp1_baseline", 2)
    finetune = json.loads((repo / paths.FINETUNE_METRICS).read_text())
    assert (finetune["replicates_of"], finetune["replicates"]) == ("exp1_baseline", ["seed101"])
    answer = json.loads((repo / paths.ANSWER).read_text())
    assert answer["replicates_of"] == "exp1_baseline"
    budget = json.loads((repo / paths.BUDGET_METRICS).read_text())
    assert (budget["experiment"], budget["epochs"], budget["replicates"]) == ("exp1_baseline", [1, 2], ["seed101"])

    # `dvc exp show` lists the run as an experiment, with the pinned params and the answer's new key.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    head = next(e for e in shown if e["rev"] != "workspace" and e.get("experiments"))
    new = head["experiments"][0]["revs"][0]
    assert new["data"]["params"]["params.yaml"]["data"]["replicates"]["experiment"] == "exp1_baseline"
    assert new["data"]["metrics"][paths.ANSWER]["data"] == answer

    table = out[out.index("Pretraining (validation loss"):]
    assert f"  seed {101:<6} {'exp1_baseline':<20} {2:>3} epochs ({replicate['precision']})" in table
    assert "Pretraining-budget curve (exp1_baseline): held-out lift" in table
    assert "Label-efficiency curve" not in table  # not run: a file in the workspace would be another run's
    assert "Ablation: not run" in table


# --- a killed replicate resumes -----------------------------------------------------------------------------------


def replicate_bytes(repo: Path) -> dict[str, str]:
    """sha256 of every file replicate@101 writes but its runtime (seconds): encoders, snapshots, metrics, curve."""
    files = [*(repo / paths.replicate_dir(101)).iterdir(), repo / paths.replicate_metrics(101),
             repo / paths.replicate_curve(101)]
    return {f.relative_to(repo).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_replicate_resumes_to_the_bytes_of_an_uninterrupted_run(reference_run, tmp_path):
    # The reference run's inputs (prepared windows, augmentations, select's report); exp1_baseline pinned for 30
    # epochs so that the kill lands mid-run, a resume checkpoint after every epoch, a snapshot before the kill.
    repo = tmp_path / "repo"
    shutil.copytree(reference_run.repo, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["resume_every_seconds"] = 0
    params["replicates"].update(seeds=[101], experiment="exp1_baseline", epochs=30, snapshot_epochs=[1, 10])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = ["python", "-m", "moola.stages.replicate", "--seed", "101"]

    fresh = run(cmd, repo).stdout
    assert "replicate seed 101 of exp1_baseline: 30 epochs" in fresh and "Resuming" not in fresh
    assert not (repo / RESUME).exists()
    expected = replicate_bytes(repo)
    assert sorted(Path(f).name for f in expected if f.startswith(paths.replicate_dir(101) + "/")) == [
        "encoder.pt", "epoch_001.pt", "epoch_010.pt", "epoch_030.pt"]

    shutil.rmtree(repo / paths.replicate_dir(101))
    (repo / paths.replicate_metrics(101)).unlink()
    (repo / paths.replicate_curve(101)).unlink()
    env = {**os.environ, "PYTHONPATH": str(repo / "src"),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while completed_epochs(repo / RESUME) < 1:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the replicate never wrote its first resume checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # preemption: no clean-up runs
    proc.wait()
    killed_at = completed_epochs(repo / RESUME)
    assert 1 <= killed_at < 30, killed_at
    assert not (repo / paths.replicate_dir(101)).exists()
    assert "1" in torch.load(repo / RESUME, weights_only=True)["snapshots"]  # epoch 1's snapshot outlives the kill

    resumed = run(cmd, repo).stdout
    assert f"Resuming from {RESUME}: epoch {killed_at} done" in resumed
    assert not (repo / RESUME).exists()
    assert replicate_bytes(repo) == expected
