"""The S3 remote, end to end against a real S3 server on 127.0.0.1 (moto): push, pull in a fresh clone,
pull one encoder, the run-cache, the model registry (`dvc artifacts get`), and a corrupted object."""

from __future__ import annotations

from json import dumps as json_dumps
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("pipeline_runs", "s3server")  # before their import below: they are plugins too

from conftest import ROOT, run  # noqa: E402
from pipeline_runs import (  # noqa: E402
    REGISTERED,
    clone,
    md5_of,
    stages_run,
    unpushed_outputs,
    workspace_md5s,
)
from s3server import S3Server, configure_remote  # noqa: E402

pytest_plugins = ["s3server", "pipeline_runs"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "moola-dvc"  # the bucket in .dvc/config's s3 url (s3://moola-dvc/moola)
PREFIX = "moola/"


def cache_objects(repo: Path) -> set[str]:
    """md5s of the files in a repository's local DVC cache."""
    files = repo / ".dvc" / "cache" / "files" / "md5"
    return {p.parent.name + p.name for p in files.rglob("*") if p.is_file()} if files.exists() else set()


@pytest.fixture(scope="module")
def s3(reference_run, s3_server: S3Server) -> S3Server:
    """The reference run pushed to the bucket, outputs and run-cache (endpoint from the environment only)."""
    s3_server.create_bucket(BUCKET)
    run(["dvc", "push", "-r", "s3", "--run-cache"], reference_run.repo, env=s3_server.env)
    return s3_server


def test_the_bucket_holds_every_output_but_the_augmented_arrays_and_the_run_cache(s3, reference_run):
    keys = s3.keys(BUCKET, PREFIX)
    pushed = {k.split("/")[-2] + k.split("/")[-1] for k in keys if k.startswith(PREFIX + "files/md5/")}
    outputs = reference_run.outputs
    expected = {md5 for path, md5 in outputs.items() if path not in unpushed_outputs(reference_run.repo)}
    assert pushed == expected
    assert not {outputs[p] for p in unpushed_outputs(reference_run.repo)} & pushed
    assert any(k.startswith(PREFIX + "runs/") for k in keys), "dvc push --run-cache sent no run-cache"


def test_a_fresh_clone_pulls_the_same_bytes_and_has_nothing_to_reproduce(s3, reference_run, tmp_path):
    laptop = clone(reference_run.origin, tmp_path / "laptop")
    configure_remote(laptop, s3)  # .dvc/config.local: endpoint and credentials, no environment needed
    assert not any((laptop / p).exists() for p in reference_run.outputs)
    pulled = run(["python", "-m", "moola.remote", "pull", "-r", "s3"], laptop)  # dvc pull --allow-missing, checked
    assert "every pushed output is here" in pulled.stdout

    unpushed = unpushed_outputs(laptop)
    pulled = {p: m for p, m in reference_run.outputs.items() if p not in unpushed}
    assert workspace_md5s(laptop, pulled) == pulled  # encoders, selected encoder, metrics, predictions, plots
    assert all(not (laptop / p).exists() for p in unpushed)

    # Only the arrays that are never pushed are missing (augment's outputs, pretrain's inputs), and DVC may
    # leave them missing.
    status = yaml.safe_load(run(["dvc", "status", "--json"], laptop).stdout)
    changes = {path: what for stage in status.values() for item in stage for kind in item.values() for path, what in kind.items()}
    assert set(changes) == unpushed and set(changes.values()) <= {"not in cache", "deleted"}
    assert {name.split("@")[0] for name in status} == {"augment", "pretrain"}
    assert stages_run(run(["dvc", "repro", "--allow-missing"], laptop).stdout) == []

    # A plain `dvc repro` recomputes them (deterministic: the same md5) and nothing downstream.
    ran = stages_run(run(["dvc", "repro"], laptop).stdout)
    assert sorted(ran) == sorted(f"augment@{Path(p).stem}" for p in unpushed)
    assert workspace_md5s(laptop, reference_run.outputs) == reference_run.outputs
    assert "Data and pipelines are up to date" in run(["dvc", "status"], laptop).stdout
    assert stages_run(run(["dvc", "repro"], laptop).stdout) == []
    assert run(["git", "status", "--porcelain"], laptop).stdout == ""


def test_pulling_one_encoder_fetches_only_that_encoder(s3, reference_run, tmp_path):
    box = clone(reference_run.origin, tmp_path / "box")
    configure_remote(box, s3)
    encoder = "data/pretrained/exp1_baseline_encoder.pt"
    run(["dvc", "pull", "-r", "s3", encoder], box)
    present = {p for p in reference_run.outputs if (box / p).exists()}
    assert present == {encoder}
    assert cache_objects(box) == {reference_run.outputs[encoder]}
    assert md5_of(box / encoder) == reference_run.outputs[encoder]

    # By stage name: that stage's outputs (encoder, metrics, plot), nothing else.
    run(["dvc", "pull", "-r", "s3", "pretrain@exp4_block_mask"], box)
    exp4 = {p for p in reference_run.outputs if "exp4_block_mask" in p and p.startswith(("data/pretrained", "metrics/pretrain", "plots/pretrain"))}
    assert {p for p in reference_run.outputs if (box / p).exists()} == {encoder} | exp4
    assert len(cache_objects(box)) == 4


def test_another_machine_with_the_run_s_dvc_lock_runs_no_stage_and_downloads_nothing(s3, reference_run, tmp_path):
    other = clone(reference_run.origin, tmp_path / "other")
    configure_remote(other, s3)
    run(["dvc", "remote", "default", "--local", "s3"], other)
    out = run(["dvc", "repro", "--pull", "--allow-missing"], other).stdout
    assert stages_run(out) == []
    assert out.count("didn't change, skipping") == len(yaml.safe_load((other / "dvc.lock").read_text())["stages"])
    assert not any((other / p).exists() for p in reference_run.outputs)
    # From a commit whose dvc.lock lacks the run, `dvc repro --pull` restores every stage from the run-cache
    # instead: test_parallel (box B) and test_runpod (the box) check that.


def test_dvc_artifacts_get_fetches_a_registered_encoder_by_name(s3, reference_run, tmp_path):
    # The registry lists the six artifacts of dvc.yaml with their registered versions (git tags).
    shown = yaml.safe_load(run(["gto", "show", "--json"], reference_run.repo).stdout)
    assert set(shown) == set(REGISTERED)
    assert all(entry["version"] == "v0.0.1" for entry in shown.values())

    # From the bare origin (no workspace, no cache): DVC clones it and reads the S3 remote named on the command
    # line; the endpoint and credentials come from the environment.
    out = tmp_path / "get"
    out.mkdir()
    for name in ("selected-encoder", "exp4-block-mask-encoder"):
        run(["dvc", "artifacts", "get", str(reference_run.origin), name, "--remote", "s3"], out, env=s3.env)
    assert md5_of(out / "encoder.pt") == reference_run.outputs["data/selected/encoder.pt"]
    assert md5_of(out / "exp4_block_mask_encoder.pt") == reference_run.outputs["data/pretrained/exp4_block_mask_encoder.pt"]

    # A version that was never registered is not found.
    missing = run(["dvc", "artifacts", "get", str(reference_run.origin), "selected-encoder", "--rev", "v0.0.2",
                   "--remote", "s3"], out, env=s3.env, check=False)
    assert missing.returncode != 0 and "Unable to find artifact" in missing.stdout + missing.stderr

    # The checked variant: same download, md5 compared with the recorded one.
    checked = run(["python", "-m", "moola.remote", "get", str(reference_run.origin), "selected-encoder",
                   "--remote", "s3", "-o", "checked/"], out, env={**s3.env, "PYTHONPATH": str(ROOT / "src")})
    assert "matches the recorded one" in checked.stdout
    assert md5_of(out / "checked" / "encoder.pt") == reference_run.outputs["data/selected/encoder.pt"]


def test_a_corrupted_object_on_the_remote_does_not_land_in_a_workspace(reference_run, tmp_path):
    encoder = "data/pretrained/exp4_block_mask_encoder.pt"
    md5 = reference_run.outputs[encoder]
    with S3Server(log_dir=tmp_path) as s3:  # its own server: the corruption must not reach the other tests
        s3.create_bucket(BUCKET)
        run(["dvc", "push", "-r", "s3"], reference_run.repo, env=s3.env)
        key = f"{PREFIX}files/md5/{md5[:2]}/{md5[2:]}"
        client = s3.client()
        body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        body[len(body) // 2] ^= 0x01  # one flipped bit
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))

        # The committed config has `verify = true`: dvc pull re-hashes what it downloads and drops the corrupted
        # file. A plain pull fails naming it (beside the augmented arrays, which are never pushed).
        laptop = clone(reference_run.origin, tmp_path / "laptop")
        configure_remote(laptop, s3)
        pulled = run(["dvc", "pull", "-r", "s3"], laptop, check=False)
        assert pulled.returncode == 1
        failed = pulled.stderr.split("Checkout failed for following targets:")[1].split("Is your cache")[0].split()
        assert sorted(failed) == sorted([encoder, *unpushed_outputs(laptop)])
        assert not (laptop / encoder).exists()
        assert md5 not in cache_objects(laptop)
        assert workspace_md5s(laptop, ["data/pretrained/exp1_baseline_encoder.pt"]) == {
            "data/pretrained/exp1_baseline_encoder.pt": reference_run.outputs["data/pretrained/exp1_baseline_encoder.pt"]}
        status = run(["dvc", "status", "pretrain@exp4_block_mask"], laptop).stdout
        assert "not in cache" in status and encoder in status

        # --allow-missing (the way to skip the never-pushed arrays) also skips the corrupted file, with exit 0;
        # moola.remote pull runs that pull (it stops on a non-zero exit), then fails naming what did not arrive.
        checked = run(["python", "-m", "moola.remote", "pull", "-r", "s3"], laptop, check=False)
        assert checked.returncode == 2
        assert checked.stderr.strip().splitlines()[-1].startswith(f"error: {encoder}: not pulled from remote 's3'")
        assert not (laptop / encoder).exists()

        # What `verify = true` prevents: without it the flipped bytes are checked out, the pull succeeds, and
        # `dvc status` trusts them (it records the expected md5 for the file it just wrote).
        unverified = clone(reference_run.origin, tmp_path / "unverified")
        configure_remote(unverified, s3)
        run(["dvc", "remote", "modify", "--local", "s3", "verify", "false"], unverified)
        run(["dvc", "pull", "-r", "s3", "--allow-missing"], unverified)
        assert md5_of(unverified / encoder) != md5
        status = yaml.safe_load(run(["dvc", "status", "--json"], unverified).stdout)
        assert encoder not in json_dumps(status)  # only the never-pushed arrays are reported

        # `dvc artifacts get` streams from the remote and does not verify: moola.remote get runs it, finds the
        # downloaded bytes' md5 is not the recorded one, and refuses, leaving nothing behind.
        out = tmp_path / "get"
        out.mkdir()
        refused = run(["python", "-m", "moola.remote", "get", str(reference_run.origin), "exp4-block-mask-encoder",
                       "--remote", "s3", "-o", "checked/"], out, env={**s3.env, "PYTHONPATH": str(ROOT / "src")},
                      check=False)
        assert refused.returncode == 2
        assert len(refused.stderr.strip().splitlines()) == 1
        assert refused.stderr.startswith("error: ") and "is corrupted on the remote: its content has md5 " in refused.stderr
        assert f"the repository recorded {md5}" in refused.stderr
        assert not (out / "checked").exists()
