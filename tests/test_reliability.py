"""Reliability end to end: a preempted `dvc repro` resumes to the bytes of an uninterrupted run, and a damaged or
foreign checkpoint never gets past a stage."""

from __future__ import annotations

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

from conftest import flip_bit_in_weights, make_repo, run
from pipeline_runs import stages_run

pytest_plugins = ["pipeline_runs"]
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


def test_killed_dvc_repro_resumes_to_the_lock_of_an_uninterrupted_run(reference_run, tmp_path):
    # A copy of the session's reference run (pipeline_runs): its example market, prepared windows and augmented
    # arrays are this stage's upstream, so `dvc repro pretrain@exp1_baseline` trains and runs nothing else.
    # Enough epochs (30) that the kill lands in the middle of training; a small encoder (the reference run's 16
    # units) keeps each one short. A checkpoint after every epoch (resume_every_seconds 0): the kill must find one
    # within seconds.
    repo = tmp_path / "repo"
    shutil.copytree(reference_run.repo, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["scale"]["epochs"] = 0.4
    params["pretrain"].update(hidden_size=16, decoder_hidden=16, resume_every_seconds=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    recorded = lock_of(repo)["stages"]["pretrain@exp1_baseline"]  # the reference run's 3 epochs
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
    assert lock_of(repo)["stages"]["pretrain@exp1_baseline"] == recorded  # the killed run recorded nothing

    resumed = run(["dvc", "repro", "pretrain@exp1_baseline"], repo).stdout
    assert f"Resuming from {RESUME}: epoch {killed_at} done" in resumed
    assert stages_run(resumed) == ["pretrain@exp1_baseline"]  # its upstream is the reference run's
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


# finetune reads the selected encoder (the experiment's name and validation loss), then each replicate's (the
# weights it fine-tunes from; conftest.TINY: seeds 101 and 102).
ENCODERS = {"selected": "data/selected/encoder.pt", "replicate": "data/replicates/seed101/encoder.pt"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny repository (no git) whose example market and prepared windows are made: what finetune reads besides
    the encoders. Made once; each case below damages an encoder in its own copy."""
    repo = make_repo(tmp_path_factory.mktemp("prepared") / "repo", git=False)
    run(["python", "-m", "moola.stages.example_market"], repo)
    run(["python", "-m", "moola.stages.prepare"], repo)
    return repo


@pytest.mark.parametrize(("which", "damage"), [("selected", "truncated"), ("selected", "foreign pickle"),
                                               ("selected", "empty"), ("replicate", "foreign pickle")])
def test_a_damaged_encoder_stops_finetune_in_one_line(prepared, tmp_path, which, damage):
    repo = tmp_path / "repo"
    shutil.copytree(prepared, repo, symlinks=True)
    torch.manual_seed(0)
    from moola.models import save_encoder_checkpoint

    hyperparams = {"input_size": 4, "hidden_size": 128, "num_layers": 1, "bidirectional": True,
                   "experiment": "exp1_baseline"}
    for path in (ENCODERS["selected"], "data/replicates/seed101/encoder.pt", "data/replicates/seed102/encoder.pt"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        save_encoder_checkpoint(repo / path, torch.nn.LSTM(4, 128, batch_first=True, bidirectional=True), hyperparams,
                                {"best_val_loss": 0.01, "best_epoch": 1, "epochs_run": 1})
    encoder = repo / ENCODERS[which]
    if damage == "truncated":
        encoder.write_bytes(encoder.read_bytes()[:5000])
    elif damage == "foreign pickle":
        foreign_pickle(encoder)
    else:
        encoder.write_bytes(b"")
    proc = run(["python", "-m", "moola.stages.finetune"], repo, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ENCODERS[which]}: "), lines
    assert "this must never run" not in proc.stdout + proc.stderr
    assert not (repo / "metrics/finetune.json").exists()
    assert not (repo / "data/finetune/oof_predictions.parquet").exists()


def test_bit_rot_in_the_cached_selected_encoder_stops_dvc_repro_in_one_line(reference_run, tmp_path):
    from pipeline_runs import clone, copy_cache, lock_outputs, md5_of

    # The shared reference run, cloned with a copy of its cache: a machine that ran (or pulled) the pipeline.
    repo = clone(reference_run.repo, tmp_path / "repo", reference_run.results_sha)
    copy_cache(reference_run.repo, repo)
    run(["dvc", "checkout"], repo)
    selected = "data/selected/encoder.pt"
    md5 = lock_outputs(repo)[selected]
    cached = repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    # Bit rot: one bit of a weight flips in the cache copy; size and modification time stay as they were.
    before = cached.stat()
    os.chmod(cached, 0o644)
    flip_bit_in_weights(cached)
    os.chmod(cached, before.st_mode)
    os.utime(cached, ns=(before.st_atime_ns, before.st_mtime_ns))
    (repo / selected).unlink()
    run(["dvc", "checkout", selected], repo)  # a fresh checkout (or pull) brings the damaged copy back, silently
    assert (repo / selected).read_bytes() == cached.read_bytes()
    assert "up to date" in run(["dvc", "status", "finetune"], repo).stdout  # DVC trusts its state database

    lock_before = lock_of(repo)["stages"]["finetune"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["bootstrap"] = 60  # any fine-tuning change: DVC re-runs finetune alone, on that encoder
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run(["dvc", "repro", "finetune"], repo, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Running stage 'finetune'" in out and "Running stage 'select'" not in out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {selected}: weights fail their checksum"), out
    assert "Traceback" not in out
    assert lock_of(repo)["stages"]["finetune"] == lock_before  # nothing recorded from the damaged encoder

    # Following the message: --relink brings back the cache's damaged copy, so remove that copy and re-run select,
    # which copies the intact pretrained encoder again; then fine-tuning runs.
    assert f"dvc checkout --relink {selected}" in errors[0]
    assert f"`rm -f .dvc/cache/files/md5/{md5[:2]}/{md5[2:]}`" in errors[0] and "dvc repro -f -s select" in errors[0]
    run(["dvc", "checkout", "--relink", selected], repo)
    assert (repo / selected).read_bytes() == cached.read_bytes()
    cached.unlink()
    run(["dvc", "repro", "-f", "-s", "select"], repo)
    run(["dvc", "repro", "finetune"], repo)
    assert lock_outputs(repo)[selected] == md5
    assert cached.is_file() and md5_of(cached) == md5
