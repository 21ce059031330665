"""The remotes, end to end: the default folder remote and S3 against a real S3 server on 127.0.0.1 (moto): push,
a plain `dvc pull` in a fresh clone, pull one encoder, the run-cache, the model registry (`dvc artifacts get`),
and a corrupted or missing object."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("pipeline_runs", "s3server")  # before their import below: they are plugins too

from conftest import ROOT, run  # noqa: E402
from pipeline_runs import (  # noqa: E402
    REGISTERED,
    clone,
    copy_cache,
    md5_of,
    stages_run,
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


def test_the_bucket_holds_every_output_the_augmented_arrays_included_and_the_run_cache(s3, reference_run):
    keys = s3.keys(BUCKET, PREFIX)
    pushed = {k.split("/")[-2] + k.split("/")[-1] for k in keys if k.startswith(PREFIX + "files/md5/")}
    # Every file, a replicate's folder's files and its listing (`<md5>.dir`) included.
    assert pushed == reference_run.objects
    assert {md5 for md5 in pushed if md5.endswith(".dir")} == set(reference_run.folders.values())
    assert {p for p in reference_run.outputs if p.startswith("data/augmented/")} == {
        f"data/augmented/{recipe}.npy" for recipe in ("warp12_x4", "warp10_x3", "warp15_x5")}
    assert any(k.startswith(PREFIX + "runs/") for k in keys), "dvc push --run-cache sent no run-cache"


def _pushed_to_the_default_remote(reference_run, where: Path) -> None:
    """A clone at `where`/box of the reference run, with its cache, pushed to the committed default remote: the
    folder `where`/moola-dvc-remote (the url is relative to .dvc/). The reference repository stays untouched."""
    box = clone(reference_run.origin, where / "box")
    copy_cache(reference_run.repo, box)
    run(["dvc", "push", "--run-cache"], box)


@pytest.mark.parametrize("remote", ["local", "s3"])
def test_a_fresh_clone_pulls_every_output_with_a_plain_dvc_pull_and_has_nothing_to_reproduce(
    remote, s3, reference_run, tmp_path
):
    if remote == "local":
        _pushed_to_the_default_remote(reference_run, tmp_path)
    laptop = clone(reference_run.origin, tmp_path / "laptop")
    pull = ["dvc", "pull"]
    if remote == "s3":
        configure_remote(laptop, s3)  # .dvc/config.local: endpoint and credentials, no environment needed
        pull += ["-r", "s3"]
    assert not any((laptop / p).exists() for p in reference_run.outputs)

    pulled = run(pull, laptop, check=False)  # what a new user types first, no options
    assert pulled.returncode == 0, pulled.stderr
    assert f"{len(reference_run.objects)} files fetched" in pulled.stdout  # DVC counts a folder's listing too
    assert workspace_md5s(laptop, reference_run.outputs) == reference_run.outputs  # the augmented arrays too
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
    # line; the endpoint and credentials come from the environment. (selected-encoder: the checked variant below
    # runs this same `dvc artifacts get`.)
    out = tmp_path / "get"
    out.mkdir()
    run(["dvc", "artifacts", "get", str(reference_run.origin), "exp4-block-mask-encoder", "--remote", "s3"], out,
        env=s3.env)
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
        # file. A plain pull fails naming it, and only it: every other output is on the remote and checked out.
        laptop = clone(reference_run.origin, tmp_path / "laptop")
        configure_remote(laptop, s3)
        pulled = run(["dvc", "pull", "-r", "s3"], laptop, check=False)
        assert pulled.returncode == 1
        assert _checkout_failed(pulled.stderr) == [encoder]
        assert not (laptop / encoder).exists()
        assert md5 not in cache_objects(laptop)
        others = {p: m for p, m in reference_run.outputs.items() if p != encoder}
        assert workspace_md5s(laptop, others) == others
        status = run(["dvc", "status", "pretrain@exp4_block_mask"], laptop).stdout
        assert "not in cache" in status and encoder in status

        # --allow-missing would hide it: the same pull exits 0 without the file. Hence plain `dvc pull`.
        hidden = run(["dvc", "pull", "-r", "s3", "--allow-missing"], laptop, check=False)
        assert hidden.returncode == 0 and not (laptop / encoder).exists()

        # What `verify = true` prevents: without it the flipped bytes are checked out, the pull succeeds, and
        # `dvc status` trusts them (it records the expected md5 for the file it just wrote).
        unverified = clone(reference_run.origin, tmp_path / "unverified")
        configure_remote(unverified, s3)
        run(["dvc", "remote", "modify", "--local", "s3", "verify", "false"], unverified)
        run(["dvc", "pull", "-r", "s3"], unverified)
        assert md5_of(unverified / encoder) != md5
        assert "Data and pipelines are up to date" in run(["dvc", "status"], unverified).stdout

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

        # An object missing from the remote (here an augmented array) also fails a plain pull, naming the file.
        array = "data/augmented/warp10_x3.npy"
        gone = reference_run.outputs[array]
        client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}files/md5/{gone[:2]}/{gone[2:]}")
        short = clone(reference_run.origin, tmp_path / "short")
        configure_remote(short, s3)
        pulled = run(["dvc", "pull", "-r", "s3"], short, check=False)
        assert pulled.returncode == 1
        assert _checkout_failed(pulled.stderr) == sorted([array, encoder])
        assert not (short / array).exists()


def _checkout_failed(stderr: str) -> list[str]:
    """The files `dvc pull` names in "Checkout failed for following targets: ... Is your cache up to date?"."""
    return sorted(stderr.split("Checkout failed for following targets:")[1].split("Is your cache")[0].split())
