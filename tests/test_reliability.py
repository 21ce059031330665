"""Reliability end to end: a preempted `dvc repro` resumes to the bytes of an uninterrupted run, and a damaged or
foreign checkpoint never gets past a stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_repo, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESUME = Path(".moola/resume/pretrain/exp1_baseline.pt")
ENCODER = Path("data/pretrained/exp1_baseline_encoder.pt")


def completed_epochs(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:  # not there yet, or being replaced right now
        return 0


def lock_of(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())


def test_killed_dvc_repro_resumes_to_the_lock_of_an_uninterrupted_run(tmp_path):
    # Enough epochs (30) that the kill lands in the middle of training; a small encoder keeps each one short.
    repo = make_repo(tmp_path / "repo", {"scale": {"epochs": 0.4},
                                         "pretrain": {"hidden_size": 16, "decoder_hidden": 16}})
    env = {**os.environ, "PYTHONPATH": str(repo / "src"),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.Popen(["dvc", "repro", "pretrain@exp1_baseline"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while completed_epochs(repo / RESUME) < 3:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "training never reached epoch 3"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # preemption: dvc and the stage die together, no clean-up runs
    proc.wait()
    killed_at = completed_epochs(repo / RESUME)
    assert not (repo / ENCODER).exists()
    assert "pretrain@exp1_baseline" not in lock_of(repo).get("stages", {}) if (repo / "dvc.lock").exists() else True

    resumed = run(["dvc", "repro", "pretrain@exp1_baseline"], repo).stdout
    assert f"Resuming from {RESUME}: epoch {killed_at} done" in resumed
    assert not (repo / RESUME).exists()  # removed once the stage succeeded
    resumed_lock, resumed_bytes = lock_of(repo), (repo / ENCODER).read_bytes()

    # The same stage, uninterrupted (--force skips the run-cache, so it really trains again).
    fresh = run(["dvc", "repro", "--force", "--single-item", "pretrain@exp1_baseline"], repo).stdout
    assert "Resuming" not in fresh and "epoch 30/30" in fresh
    assert (repo / ENCODER).read_bytes() == resumed_bytes
    assert lock_of(repo) == resumed_lock


def foreign_pickle(path: Path) -> None:
    class NotOurs:  # torch.load(weights_only=True) must refuse to build this
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": NotOurs()}, path)


@pytest.mark.parametrize("damage", ["truncated", "foreign pickle", "empty"])
def test_damaged_selected_encoder_stops_finetune_in_one_line(tmp_path, damage):
    repo = make_repo(tmp_path / "repo", git=False)
    encoder = repo / "data/selected/encoder.pt"
    encoder.parent.mkdir(parents=True)
    torch.manual_seed(0)
    from moola.models import save_encoder_checkpoint

    save_encoder_checkpoint(encoder, torch.nn.LSTM(4, 128, batch_first=True, bidirectional=True),
                            {"input_size": 4, "hidden_size": 128, "num_layers": 1, "bidirectional": True},
                            {"best_val_loss": 0.01, "best_epoch": 1, "epochs_run": 1})
    if damage == "truncated":
        encoder.write_bytes(encoder.read_bytes()[:5000])
    elif damage == "foreign pickle":
        foreign_pickle(encoder)
    else:
        encoder.write_bytes(b"")
    run(["python", "-m", "moola.stages.example_market"], repo)
    run(["python", "-m", "moola.stages.prepare"], repo)
    proc = run(["python", "-m", "moola.stages.finetune"], repo, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data/selected/encoder.pt"), lines
    assert "this must never run" not in proc.stdout + proc.stderr
    assert not (repo / "metrics/finetune.json").exists()
    assert not (repo / "data/finetune/oof_predictions.parquet").exists()
