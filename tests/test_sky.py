"""sky/train.yaml and moola.skyjobs, with no cloud account: the task loads through SkyPilot's own Python API (from
the venv `make cloud` makes: SkyPilot pins a click that DVC's celery and gto refuse), its setup and run commands
run here as bash against an S3 server on 127.0.0.1, and the job generator covers exactly params.yaml's experiments.
Nothing starts a SkyPilot API server (`sky launch --dryrun` would, and would fetch a price catalog)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("pipeline_runs", "s3server")  # before their import below: they are plugins too

from conftest import ROOT, make_repo, run  # noqa: E402
from pipeline_runs import clone, make_project_repo  # noqa: E402
from s3server import S3Server  # noqa: E402

from moola.params import load_params  # noqa: E402
from moola.skyjobs import OPTIONAL_ENVS, SECRETS, TASK_YAML  # noqa: E402

pytest_plugins = ["s3server", "pipeline_runs"]

SKY_PYTHON = ROOT / ".venv-cloud" / "bin" / "python"
BOX_STEPS = {"setup", "remote", "doctor", "pull", "train"}

# Runs in SkyPilot's venv: load the task, once as written and once per set of `--env` overrides, and say what
# SkyPilot made of it.
LOAD = """
import json, sys, yaml, sky
path, overrides = sys.argv[1], json.loads(sys.argv[2])
config = yaml.safe_load(open(path))
def describe(task):
    (res,) = task.resources
    auto = res.autostop_config
    return {"name": task.name, "workdir": task.workdir, "envs": dict(task.envs), "setup": task.setup, "run": task.run,
            "accelerators": res.accelerators, "use_spot": res.use_spot,
            "autostop": {"enabled": auto.enabled, "idle_minutes": auto.idle_minutes, "down": auto.down},
            "secret_refs": sorted(ref.name for ref in task._managed_secret_refs), "secret_values": dict(task.secrets)}
print(json.dumps({"as_written": describe(sky.Task.from_yaml(path)),
                  "overridden": [describe(sky.Task.from_yaml_config(dict(config), env_overrides=[tuple(kv) for kv in o]))
                                 for o in overrides]}))
"""


def sky_python() -> Path:
    if not SKY_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SKY_PYTHON} missing: .ci/run makes it with `make cloud`")
        pytest.skip("SkyPilot's venv is not made here: make cloud")
    return SKY_PYTHON


def api_server_processes() -> list[str]:
    """Command lines of running SkyPilot API servers (`sky api start`, or one a client started on its own)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "sky.server.server" in text or "sky/server/server.py" in text:
            found.append(text)
    return found


def load_task(home: Path, overrides: list[list[tuple[str, str]]] = ()) -> dict:
    """sky.Task.from_yaml on sky/train.yaml in SkyPilot's venv, with HOME (where it keeps ~/.sky) in `home`."""
    before = api_server_processes()
    done = subprocess.run([str(sky_python()), "-c", LOAD, str(ROOT / TASK_YAML), json.dumps(list(overrides))],
                          capture_output=True, text=True, timeout=120,
                          env={"HOME": str(home), "PATH": os.environ["PATH"], "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"})
    assert done.returncode == 0, done.stderr
    assert api_server_processes() == before  # loading a task starts no API server
    assert not (home / ".sky" / "api_server").exists()
    return json.loads(done.stdout)


def env_overrides(cmd: list[str]) -> list[tuple[str, str]]:
    """The `--env KEY=VALUE` pairs of a command line (a bare `--env KEY` takes the launcher's value)."""
    return [tuple(cmd[i + 1].split("=", 1)) for i, arg in enumerate(cmd) if arg == "--env" and "=" in cmd[i + 1]]


def skyjobs(*args: str, **env: str) -> list[list[str]]:
    """`python -m moola.skyjobs ARGS` in the repository's root, with none of OPTIONAL_ENVS set unless given in
    `env`: its commands, split as a shell would."""
    full = {k: v for k, v in os.environ.items() if k not in OPTIONAL_ENVS}
    full.update(env, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-m", "moola.skyjobs", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


def box_steps(text: str) -> list[str]:
    """The scripts/box.sh steps a text runs, in order."""
    return [w for args in re.findall(r"bash scripts/box\.sh([^;'&|]*)", text) for w in args.split() if w in BOX_STEPS]


# ---- The task, as SkyPilot reads it -------------------------------------------------------------------------------


def test_task_loads_through_skypilot(tmp_path):
    task = load_task(tmp_path)["as_written"]
    assert task["name"] == "moola" and task["workdir"] == "."
    assert task["accelerators"] == {"RTX4090": 1} and task["use_spot"] is False
    # A box that nobody tears down tears itself down after 10 idle minutes.
    assert task["autostop"] == {"enabled": True, "idle_minutes": 10, "down": True}
    assert task["envs"] == {"MOOLA_REMOTE": "s3", "MOOLA_JOBS": "5", "MOOLA_ONLY": "", "MOOLA_PYTHON": ""}
    # Credentials: named, never written (each null in the file; `--secret NAME` fills it at launch).
    assert task["secret_refs"] == sorted(SECRETS) and task["secret_values"] == {}
    assert yaml.safe_load((ROOT / TASK_YAML).read_text())["secrets"] == {name: None for name in SECRETS}
    assert "file_mounts" not in yaml.safe_load((ROOT / TASK_YAML).read_text())


def test_the_box_side_is_one_script(tmp_path):
    """sky/train.yaml and scripts/runpod.sh run the same scripts/box.sh steps on the box, nothing else."""
    task = load_task(tmp_path)["as_written"]
    for part in (task["setup"], task["run"]):  # each of the task's commands is one call of scripts/box.sh
        assert [line.startswith("bash scripts/box.sh ") for line in part.replace("\\\n", " ").strip().splitlines()] == [True]
    repo = make_repo(tmp_path / "repo")
    out = run(["bash", "scripts/runpod.sh", "--dry-run", "u@box.example"], repo).stdout
    on_box = "\n".join(line for line in out.splitlines() if line.startswith("+ ssh "))
    assert box_steps(task["setup"] + task["run"]) == box_steps(on_box) == ["setup", "remote", "doctor", "pull", "train"]


# ---- Many boxes: one managed job per experiment ------------------------------------------------------------------


def test_one_job_per_experiment_of_params_yaml(tmp_path):
    experiments = list(load_params(ROOT / "params.yaml").experiments)
    stages = [f"pretrain@{name}" for name in experiments]
    one_each = skyjobs()
    assert len(one_each) == len(experiments)
    for cmd, stage in zip(one_each, stages):
        assert cmd[:4] == ["sky", "jobs", "launch", TASK_YAML]
        assert {"--use-spot", "-d", "-y"} <= set(cmd)  # spot, recovered by SkyPilot; detached: `| bash` runs all
        assert dict(env_overrides(cmd)) == {"MOOLA_ONLY": stage, "MOOLA_JOBS": "1"}
        assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--secret"] == list(SECRETS)
        assert not any(a.startswith("AWS_") and "=" in a for a in cmd)  # credentials by name, never by value
    # Any share of the matrix: every experiment on exactly one box.
    for per_box in (2, 3, len(experiments)):
        boxes = skyjobs("--per-box", str(per_box))
        assert len(boxes) == math.ceil(len(experiments) / per_box)
        shared = [s for cmd in boxes for s in dict(env_overrides(cmd))["MOOLA_ONLY"].split()]
        assert shared == stages
        assert len({cmd[cmd.index("-n") + 1] for cmd in boxes}) == len(boxes)
    # A remote with an endpoint: its endpoint and region go along, by name.
    endpoint = skyjobs("--on-demand", AWS_ENDPOINT_URL="http://127.0.0.1:1", AWS_DEFAULT_REGION="us-east-1")[0]
    assert "--use-spot" not in endpoint and [endpoint[i + 1] for i, a in enumerate(endpoint) if a == "--env"][2:] == \
        list(OPTIONAL_ENVS)
    # SkyPilot reads each job's overrides into the task it launches.
    loaded = load_task(tmp_path, [env_overrides(cmd) for cmd in one_each])["overridden"]
    assert [t["envs"]["MOOLA_ONLY"] for t in loaded] == stages
    assert all(t["envs"]["MOOLA_JOBS"] == "1" and t["envs"]["MOOLA_REMOTE"] == "s3" for t in loaded)


def test_bad_per_box_is_one_line():
    proc = run([sys.executable, "-m", "moola.skyjobs", "--per-box", "0"], ROOT, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --per-box must be at least 1, got 0"


# ---- The task's commands, run here -------------------------------------------------------------------------------


def task_env(task: dict, **overrides: str) -> dict[str, str]:
    return {**task["envs"], **overrides}


def test_doctor_stops_the_run_when_training_would_not_use_the_gpu(tmp_path):
    """A box whose nvidia-smi lists a GPU that this (CPU-only) torch cannot use: the run ends at doctor, exit 2,
    with doctor's one line, before anything is trained or pushed."""
    task = load_task(tmp_path)["as_written"]
    repo = make_project_repo(tmp_path / "repo")  # with the project's remotes: `remote` makes s3 the default
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 550.54.15, 24564 MiB'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = task_env(task, MOOLA_PYTHON=sys.executable, PATH=f"{fake}:{os.environ['PATH']}")
    proc = run(["bash", "-c", task["run"]], repo, env=env, check=False, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: this box has an NVIDIA GPU (nvidia-smi lists it) "
                                                           "but torch ")
    assert "==> doctor:" in proc.stdout and "==> pull:" not in proc.stdout and "==> box " not in proc.stdout
    assert not (repo / "dvc.lock").exists() and not (repo / ".moola" / "logs").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_task_runs_here_and_leaves_what_the_ssh_path_leaves(tmp_path, s3_server: S3Server, reference_run):
    """The task's setup and run, as bash in a clone (SkyPilot's ~/sky_workdir), one experiment's share against an
    empty S3 remote on 127.0.0.1: the same dvc.lock as the reference run, everything pushed (outputs and
    run-cache), the results commit; then the laptop restores the share from the run-cache without training."""
    task = load_task(tmp_path / "home")["as_written"]
    s3_server.create_bucket("moola-dvc")
    share = "pretrain@exp1_baseline"
    box = clone(reference_run.origin, tmp_path / "sky_workdir", rev=reference_run.code_sha)
    # What the launch delivers: the task's envs with the job's overrides, and the secrets and endpoint by name.
    env = task_env(task, MOOLA_ONLY=share, MOOLA_JOBS="1", MOOLA_PYTHON=sys.executable, **s3_server.env)
    run(["bash", "-c", task["setup"]], box, env=env)
    proc = run(["bash", "-c", task["run"]], box, env=env, timeout=600)
    assert "==> doctor:" in proc.stdout and "concurrently, 1 at a time: pretrain@exp1_baseline" in proc.stdout

    upstream = {"example_market", "prepare", "augment@warp12_x4"}
    lock = yaml.safe_load((box / "dvc.lock").read_text())["stages"]
    reference = yaml.safe_load((reference_run.repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == upstream | {share} and all(lock[name] == reference[name] for name in lock)
    # As on the SSH path: the results commit on the box's branch moola-results, on top of the commit it ran.
    assert run(["git", "log", "-1", "--format=%s", "moola-results"], box).stdout.startswith(
        f"Results of {reference_run.code_sha} on ")
    # Pushed: every output the lock records, and a run-cache entry for each stage that ran a command.
    keys = set(s3_server.keys("moola-dvc", "moola/"))
    outs = {o["md5"] for stage in lock.values() for o in stage.get("outs", [])}
    assert {f"moola/files/md5/{m[:2]}/{m[2:]}" for m in outs} <= keys
    assert sum(k.startswith("moola/runs/") for k in keys) >= len(lock) - 1  # example_market has no deps: no record

    # Where the user is: a clone of the same commit restores the share from the run-cache, trains nothing.
    laptop = clone(reference_run.origin, tmp_path / "laptop", rev=reference_run.code_sha)
    run([sys.executable, "-m", "dvc", "remote", "default", "--local", "s3"], laptop)
    restored = run([sys.executable, "-m", "dvc", "repro", "--pull", share], laptop, env=s3_server.env)
    assert "Running stage" not in restored.stdout and f"Stage '{share}' is cached" in restored.stdout
    assert yaml.safe_load((laptop / "dvc.lock").read_text())["stages"] == lock
