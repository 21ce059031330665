"""scripts/runpod.sh: the command sequence (--dry-run), its refusals, and a real round trip against an SSH server
on 127.0.0.1 started by the test (skipped when OpenSSH's sshd is not installed)."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("pipeline_runs", "s3server")  # before their import below: they are plugins too

from conftest import make_repo, run  # noqa: E402
from pipeline_runs import clone, workspace_md5s  # noqa: E402
from s3server import S3Server, configure_remote, free_port  # noqa: E402

pytest_plugins = ["s3server", "pipeline_runs"]

SCRIPT = "scripts/runpod.sh"


def commands(output: str) -> list[str]:
    """The commands a dry run prints, in order."""
    return [line[2:] for line in output.splitlines() if line.startswith("+ ")]


def first_index(lines: list[str], needle: str) -> int:
    for i, line in enumerate(lines):
        if needle in line:
            return i
    raise AssertionError(f"no command contains {needle!r}:\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def laptop_repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("runpod") / "repo")


def test_dry_run_prints_the_round_trip_in_order(laptop_repo):
    (laptop_repo / ".dvc" / "config.local").write_text("['remote \"s3\"']\n    endpointurl = https://s3.example\n")
    try:
        out = run(["bash", SCRIPT, "--dry-run", "root@gpu.example", "2222", "/keys/box"], laptop_repo).stdout
    finally:
        (laptop_repo / ".dvc" / "config.local").unlink()
    sha = run(["git", "rev-parse", "HEAD"], laptop_repo).stdout.strip()
    cmds = commands(out)
    # A new pod's host key is accepted into this checkout's own known-hosts file; keep-alives for the long follow.
    known_hosts = laptop_repo.resolve() / ".moola" / "known_hosts"
    ssh = (f"ssh -p 2222 -o BatchMode=yes -o ConnectTimeout=15 -o StrictHostKeyChecking=accept-new "
           f"-o UserKnownHostsFile={known_hosts} -o ServerAliveInterval=30 -o ServerAliveCountMax=4 "
           "-i /keys/box root@gpu.example")
    box = "/workspace/moola"  # RunPod's persistent volume, not the container disk that a pod stop wipes
    order = [
        f"{ssh} 'echo \"connected to",  # 1. the connection, and nvidia-smi -L
        f"{ssh} 'test -d {box}/.git || git init -q {box}'",  # 2. the code, through git
        f"git push -q -f root@gpu.example:{box} HEAD:refs/heads/moola-run",
        f"{ssh} 'cd {box} && git checkout -q -f --detach {sha}'",
        f"{ssh} 'cat > {box}/.dvc/config.local' < .dvc/config.local",  # 3. the remote's settings
        # 4-6 on the box are scripts/box.sh, which sky/train.yaml runs too (test_sky.py)
        f"{ssh} 'cd {box} && bash scripts/box.sh --remote s3 setup remote'",  # 4. venv, default remote
        f"{ssh} 'cd {box} && bash scripts/box.sh doctor'",  # the box's first minute
        f"{ssh} 'cd {box} && bash scripts/box.sh pull'",  # 5. what the remote has
        "nohup bash -c 'bash scripts/box.sh --jobs 5 train;",  # 6. detached
        "tail -n +1 --pid=$(cat .moola/logs/runpod.pid) -f .moola/logs/runpod.log",  # 7. follow it
        "cat .moola/logs/runpod.exit",
        f"git fetch -q root@gpu.example:{box} +refs/heads/moola-results:refs/heads/moola-results",  # 8. home
        "git merge -q --ff-only moola-results",
        "python -m dvc pull -r s3",
    ]
    positions = [first_index(cmds, needle) for needle in order]
    assert positions == sorted(positions)
    assert "GIT_SSH_COMMAND=ssh\\ -p\\ 2222" in cmds[positions[2]]
    # The commands to follow the logs and the GPU, printed for another terminal.
    assert f"{ssh} 'tail -f {box}/.moola/logs/runpod.log'" in out
    assert f"{ssh} 'nvidia-smi -l 5'" in out
    assert f"{ssh} 'tail -f {box}/.moola/logs/pretrain@exp1_baseline.log'" in out
    assert not known_hosts.exists()  # a dry run writes nothing
    # RUNPOD_SSH_OPTS come first: ssh keeps the first value of an option, so the user's choice wins.
    mine = run(["bash", SCRIPT, "--dry-run", "--dir", "moola", "root@gpu.example"], laptop_repo,
               env={"RUNPOD_SSH_OPTS": "-o StrictHostKeyChecking=no"}).stdout
    assert "+ ssh -p 22 -o StrictHostKeyChecking=no -o BatchMode=yes" in mine and "'test -d moola/.git" in mine

    # The box's share, as the box runs it: --on-box is scripts/box.sh train.
    box = commands(run(["bash", SCRIPT, "--on-box", "--dry-run", "--jobs", "3", "--python", "/opt/py"], laptop_repo).stdout)
    assert box == commands(run(["bash", "scripts/box.sh", "--dry-run", "--jobs", "3", "--python", "/opt/py", "train"],
                               laptop_repo).stdout)
    assert box[0] == "/opt/py -m moola.parallel --jobs 3 --pull"
    assert box[1] == "/opt/py -m dvc push --run-cache"
    assert box[2] == "git add dvc.lock" and " commit -q -m Results\\ of\\ " in box[3]
    assert box[4] == "git branch -f moola-results HEAD"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: scripts/runpod.sh: no box given: pass user@host (or set RUNPOD_HOST); see --help"),
        (["--jobs", "0", "u@h"], "error: scripts/runpod.sh: --jobs must be a positive integer, got '0'"),
        (["u@h", "twenty-two"], "error: scripts/runpod.sh: port must be a number, got 'twenty-two'"),
        (["--frobnicate"], "error: scripts/runpod.sh: unknown option '--frobnicate' (see --help)"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(laptop_repo, args, message):
    proc = run(["bash", SCRIPT, "--dry-run", *args], laptop_repo, check=False, env={"RUNPOD_HOST": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip() == message


def test_uncommitted_changes_are_refused(laptop_repo):
    params = laptop_repo / "params.yaml"
    original = params.read_text()
    params.write_text(original + "\n")
    try:
        proc = run(["bash", SCRIPT, "--dry-run", "u@h"], laptop_repo, check=False)
    finally:
        params.write_text(original)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: scripts/runpod.sh: uncommitted changes in tracked files")
    assert proc.stdout == ""


# ---- The real thing: sshd on 127.0.0.1 --------------------------------------------------------------------

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
SSH_OPTS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An OpenSSH server for the current user on 127.0.0.1 (its own host key, config and authorized key)."""
    if not SSHD or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        if os.environ.get("CI"):  # .ci/run installs it: a skip there would test nothing
            pytest.fail("OpenSSH server not installed under CI (.ci/run installs openssh-server)")
        pytest.skip("OpenSSH server not installed (apt-get install openssh-server)")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    elif not Path("/run/sshd").is_dir():
        pytest.skip("sshd needs /run/sshd, which only root can create")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        "StrictModes no\nPubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\n"
    )
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    user_host = f"{getpass.getuser()}@127.0.0.1"
    probe = ["ssh", "-p", str(port), "-i", str(d / "client_key"), "-o", "BatchMode=yes", *SSH_OPTS.split(), user_host, "true"]
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(probe, capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.3)
        yield {"user_host": user_host, "port": port, "key": d / "client_key"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.mark.integration
@pytest.mark.slow
def test_round_trip_over_ssh(sshd, s3_server: S3Server, reference_run, tmp_path):
    # The team's remote already has a run of this commit (outputs and run-cache): the box reuses it, so this
    # test is about the orchestration, not the training (test_parallel trains in parallel for real).
    s3_server.create_bucket("moola-dvc")
    run(["dvc", "push", "-r", "s3", "--run-cache"], reference_run.repo, env=s3_server.env)

    laptop = clone(reference_run.origin, tmp_path / "laptop", rev=reference_run.code_sha)
    run(["git", "checkout", "-q", "-b", "work"], laptop)
    configure_remote(laptop, s3_server)  # .dvc/config.local: the box gets a copy
    box_dir = tmp_path / "box" / "moola"
    share = ["pretrain@exp1_baseline", "pretrain@exp4_block_mask"]  # a share keeps it short; --only goes through
    proc = run(
        ["bash", SCRIPT, "--dir", str(box_dir), "--python", sys.executable, "--jobs", "2", "--only", " ".join(share),
         sshd["user_host"], str(sshd["port"]), str(sshd["key"])],
        laptop, env={"RUNPOD_SSH_OPTS": SSH_OPTS}, timeout=500,
    )
    for step in range(1, 9):
        assert f"==> {step}. " in proc.stdout

    # On the box: its share concurrently (restored from the run-cache), then the push.
    box_log = (box_dir / ".moola" / "logs" / "runpod.log").read_text()
    assert "concurrently, 2 at a time: pretrain@exp1_baseline pretrain@exp4_block_mask" in box_log
    assert box_log.count("(restored from the run-cache)") == 2
    assert "then: nothing (--only)" in box_log

    # Home: the box's results commit (dvc.lock) fast-forwarded here, and the files pulled from the remote.
    assert run(["git", "log", "-1", "--format=%s"], laptop).stdout.startswith(f"Results of {reference_run.code_sha} on ")
    assert run(["git", "rev-parse", "HEAD~1"], laptop).stdout.strip() == reference_run.code_sha
    lock = yaml.safe_load((laptop / "dvc.lock").read_text())["stages"]
    reference = yaml.safe_load((reference_run.repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"example_market", "prepare", "augment@warp12_x4", *share}  # only the share's upstream
    assert all(lock[name] == reference[name] for name in lock)
    pulled = {p: m for p, m in reference_run.outputs.items()
              if p.startswith(("data/example/", "data/prepared/")) or p == "data/augmented/warp12_x4.npy"
              or (p.startswith(("data/pretrained/", "metrics/pretrain/", "plots/pretrain/"))
                  and any(e.split("@")[1] in p for e in share))}
    # The example market, the prepared windows, the share's augmented array, each share's encoder, metrics and
    # plot (the outputs of the stages the box's dvc.lock records); nothing else.
    assert set(pulled) == {o["path"] for stage in lock.values() for o in stage.get("outs", [])}
    assert sum(p.startswith(("data/pretrained/", "metrics/pretrain/", "plots/pretrain/")) for p in pulled) == 3 * len(share)
    assert workspace_md5s(laptop, pulled) == pulled
    assert {p for p in reference_run.outputs if (laptop / p).exists()} == set(pulled)
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], laptop).stdout == ""
