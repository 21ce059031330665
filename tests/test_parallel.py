"""moola.parallel (experiments run concurrently), two boxes sharing one remote, and DVC's experiments queue.

Everything is compared with one sequential `dvc repro` of the same tiny pipeline (pipeline_runs.reference_run).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("pipeline_runs")  # before its import below: it is a plugin too

from conftest import run  # noqa: E402
from moola.errors import MoolaError  # noqa: E402
from moola.device import thread_budget  # noqa: E402
from moola.parallel import concurrency, job_env, make_plan, visible_gpus  # noqa: E402
from pipeline_runs import clone, copy_cache, same_lock, seed_remote, stages_run, workspace_md5s  # noqa: E402

pytest_plugins = ["pipeline_runs"]

EXPERIMENTS = ("exp1_baseline", "exp2_conservative", "exp3_aggressive", "exp4_block_mask", "exp5_random_mask")
RECIPES = ("warp12_x4", "warp10_x3", "warp15_x5")
REPLICATES = ("replicate@101", "replicate@102")  # conftest.TINY's replicate seeds
BOX_A = tuple(f"pretrain@{e}" for e in EXPERIMENTS[:3])
BOX_B = tuple(f"pretrain@{e}" for e in EXPERIMENTS[3:])


def graph() -> dict[str, set[str]]:
    """moola's pipeline as moola.parallel sees it: each stage with its direct upstream."""
    g: dict[str, set[str]] = {"prepare": set()}
    g.update({f"augment@{r}": {"prepare"} for r in RECIPES})
    recipe = dict(zip(EXPERIMENTS, ("warp12_x4", "warp10_x3", "warp15_x5", "warp12_x4", "warp12_x4")))
    g.update({f"pretrain@{e}": {"prepare", f"augment@{recipe[e]}"} for e in EXPERIMENTS})
    g["select"] = {f"pretrain@{e}" for e in EXPERIMENTS}
    # A replicate reads select's choice and every augmented array (which one it trains on depends on the choice).
    g.update({name: {"prepare", "select", *(f"augment@{r}" for r in RECIPES)} for name in REPLICATES})
    g["finetune"] = {"prepare", "select", *REPLICATES}
    g["label_curve"] = {"prepare", *REPLICATES}
    g["budget_curve"] = {"prepare", *REPLICATES}
    g.update({f"finetune_ablation@{e}": {"prepare", f"pretrain@{e}"} for e in EXPERIMENTS})
    return g


def test_plan_runs_the_upstream_first_then_the_group_concurrently():
    plan = make_plan(graph(), ["pretrain"])
    assert plan.upstream == ("prepare", *(f"augment@{r}" for r in RECIPES))
    assert plan.parallel == tuple(f"pretrain@{e}" for e in EXPERIMENTS)
    assert all(not waits for waits in plan.waits_for.values())

    one_share = make_plan(graph(), ["pretrain@exp2_conservative", "pretrain@exp4_block_mask"])
    assert one_share.upstream == ("prepare", "augment@warp12_x4", "augment@warp10_x3")

    # Two groups: an ablation entry waits for its own encoder only.
    both = make_plan(graph(), ["finetune_ablation", "pretrain"])
    assert both.parallel[:5] == plan.parallel
    assert both.waits_for["finetune_ablation@exp3_aggressive"] == {"pretrain@exp3_aggressive"}

    # The replicates run concurrently once select has chosen (every pretraining run is their upstream); the two
    # curves that read them wait for both.
    replicates = make_plan(graph(), ["replicate"])
    assert replicates.parallel == REPLICATES and not any(replicates.waits_for.values())
    assert replicates.upstream[-6:] == (*plan.parallel, "select")
    after = make_plan(graph(), ["replicate", "budget_curve", "label_curve"])
    assert after.waits_for["budget_curve"] == after.waits_for["label_curve"] == set(REPLICATES)

    with pytest.raises(MoolaError, match="no stage or foreach group named 'pretrian'"):
        make_plan(graph(), ["pretrian"])


def test_jobs_get_gpus_round_robin_and_a_share_of_the_cores():
    smi = ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-a)", "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-b)"]
    assert visible_gpus({}, smi) == ["0", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5"}, smi) == ["3", "5"]  # the user's choice wins
    assert visible_gpus({}, None) == [] and visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, smi) == []
    envs = [job_env(slot, 5, {"PATH": "/bin"}, ["0", "1"], 16) for slot in range(5)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1", "0"]
    assert {e["MOOLA_THREAD_BUDGET"] for e in envs} == {"3"} and envs[0]["OMP_NUM_THREADS"] == "3"
    assert envs[0]["OMP_WAIT_POLICY"] == "PASSIVE" and envs[0]["PATH"] == "/bin"
    cpu = job_env(0, 2, {}, [], 2)  # this machine: 2 cores, 2 jobs -> 1 thread each, no GPU variable
    assert cpu["MOOLA_THREAD_BUDGET"] == "1" and "CUDA_VISIBLE_DEVICES" not in cpu
    assert job_env(0, 5, {}, [], 2)["MOOLA_THREAD_BUDGET"] == "1"  # at least 1
    alone = job_env(0, 1, {"OMP_WAIT_POLICY": "ACTIVE"}, [], 2)
    assert alone["MOOLA_THREAD_BUDGET"] == "2" and alone["OMP_WAIT_POLICY"] == "ACTIVE"
    assert thread_budget({"MOOLA_THREAD_BUDGET": "3"}) == 3 and thread_budget({}) is None


def test_cpu_jobs_never_get_fewer_threads_than_their_param():
    # The thread count changes the CPU bytes: on 2 cores, two 2-thread jobs run one after the other.
    assert concurrency(2, 2, 2, []) == (1, concurrency(2, 2, 2, [])[1])
    assert "do not fit in 2 cores: 1 at a time" in concurrency(2, 2, 2, [])[1]
    assert concurrency(2, 2, 1, []) == (2, "") and concurrency(5, 16, 2, []) == (5, "")
    assert concurrency(5, 16, 4, []) == (4, concurrency(5, 16, 4, [])[1])
    assert concurrency(5, 2, 2, ["0"]) == (5, "")  # on a GPU the CPU threads decide no number


def test_unknown_target_is_one_line_and_exit_2(reference_run):
    proc = run(["python", "-m", "moola.parallel", "pretrian"], reference_run.repo, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: dvc.yaml: no stage or foreach group named 'pretrian'")
    assert len(proc.stderr.strip().splitlines()) == 1


def _concurrent(stdout: str, names) -> bool:
    """Whether every one of `names` started before the first of them finished."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) for n in names if line.endswith(f"] started {n} (log: .moola/logs/{n}.log)")]
    finishes = [i for i, line in enumerate(lines) for n in names if f"] finished {n} in " in line]
    return len(starts) == len(names) == len(finishes) and max(starts) < min(finishes)


def _outcome(stdout: str, name: str) -> str:
    match = re.search(rf"\] finished {re.escape(name)} in [\d.]+ s \((.+)\)$", stdout, re.MULTILINE)
    return match.group(1) if match else "missing"


@pytest.fixture(scope="module")
def boxes(reference_run, tmp_path_factory):
    """Two boxes and the team's remote (the `local` remote, pointed at one folder through config.local).

    The remote starts with the team's earlier runs of every stage but pretraining (as if the downstream stages
    had been run before on these very encoders): that keeps this test to the pretraining work, and turns every
    downstream stage into a check of the encoders' bytes, since a run-cache entry is keyed by its inputs' md5.
    Box A runs three experiments (--only); box B runs `moola.parallel --jobs 5 --pull`, which reuses box A's
    and runs the other two, then the rest; box B commits its dvc.lock; then any machine has nothing to run.
    """
    base = tmp_path_factory.mktemp("boxes")
    remote = base / "team-remote"
    assert seed_remote(reference_run.repo, remote, skip_cmd="moola.stages.pretrain") == len(EXPERIMENTS)
    team = base / "team.git"  # the team's git server
    run(["git", "clone", "-q", "--bare", str(reference_run.origin), str(team)], base)
    run(["git", "update-ref", "refs/heads/main", reference_run.code_sha], team)  # before anyone ran anything
    found = {}

    def machine(name: str) -> Path:
        repo = clone(team, base / name, rev=reference_run.code_sha)
        run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], repo)
        return repo

    # --cores 5: this machine has 2, and moola.parallel runs no more 1-thread CPU jobs at once than there are
    # cores; the point here is concurrency against DVC's locks, at a size where oversubscribing costs nothing.
    a = machine("box-a")
    found["a_out"] = run(["python", "-m", "moola.parallel", "--jobs", "3", "--cores", "5", "--pull", "--only", *BOX_A],
                         a).stdout
    run(["dvc", "push", "--run-cache"], a)
    found["a_lock"] = yaml.safe_load((a / "dvc.lock").read_text())

    b = machine("box-b")
    found["b_out"] = run(["python", "-m", "moola.parallel", "--jobs", "5", "--cores", "5", "--pull"], b).stdout
    run(["dvc", "push", "--run-cache"], b)
    run(["git", "add", "dvc.lock"], b)
    run(["git", "commit", "-q", "-m", "results from box B"], b)
    run(["git", "push", "-q", "origin", "HEAD:main"], b)
    return {"a": a, "b": b, "team": team, "remote": remote, **found}


def test_box_a_runs_its_share_concurrently_and_only_that(boxes):
    out = boxes["a_out"]
    assert _concurrent(out, BOX_A)
    assert "each job: 1 CPU thread(s) of 5 cores, no GPU" in out  # --cores 5 shared by 3 jobs
    assert all(f"]   {name}: 1 CPU thread\n" in out for name in BOX_A)
    assert all(_outcome(out, name) == "ran" for name in BOX_A)
    assert "then: nothing (--only)" in out
    assert set(boxes["a_lock"]["stages"]) == {"example_market", "prepare", *(f"augment@{r}" for r in RECIPES), *BOX_A}
    # Its upstream (stdout holds only that: each entry logs to its own file) comes from the team's remote, the
    # augmented arrays too: they are pushed like every output, so their run-cache entries can be restored.
    assert stages_run(out) == [] and out.count("is cached - skipping run") == 2 + len(RECIPES)
    for name in BOX_A:
        assert "Running stage" in (boxes["a"] / ".moola" / "logs" / f"{name}.log").read_text()


def test_box_b_reuses_box_a_runs_the_rest_and_matches_a_sequential_repro(boxes, reference_run):
    out = boxes["b_out"]
    names = BOX_A + BOX_B
    assert _concurrent(out, names)  # all five at once
    assert [_outcome(out, n) for n in BOX_A] == ["restored from the run-cache"] * 3  # box A's work, via the remote
    assert [_outcome(out, n) for n in BOX_B] == ["ran"] * 2
    # The rest came from the team's earlier runs: only possible if the encoders have the reference's bytes.
    rest = out.split("$ dvc repro --pull\n")[1]
    # select, the replicates, finetune, label_curve, budget_curve and the five ablations
    assert stages_run(rest) == [] and rest.count("is cached - skipping run") == 4 + len(REPLICATES) + len(EXPERIMENTS)
    # The same dvc.lock and the same bytes as one sequential `dvc repro`.
    assert same_lock(boxes["b"], reference_run.repo)
    assert workspace_md5s(boxes["b"], reference_run.outputs) == reference_run.outputs


def test_any_machine_then_completes_the_pipeline_without_running_a_stage(boxes, reference_run, tmp_path):
    laptop = clone(boxes["team"], tmp_path / "laptop")
    run(["dvc", "remote", "modify", "--local", "local", "url", str(boxes["remote"])], laptop)
    out = run(["dvc", "repro", "--pull", "--allow-missing"], laptop).stdout
    assert stages_run(out) == []
    run(["dvc", "pull"], laptop)  # every output is on the remote, the augmented arrays too
    assert workspace_md5s(laptop, reference_run.outputs) == reference_run.outputs


def test_concurrent_repro_waits_for_dvc_s_repo_lock(boxes):
    """DVC holds .dvc/tmp/lock while it hashes outputs and writes dvc.lock; a plain `dvc repro` that finds it
    taken gives up after 3 seconds ("Unable to acquire lock"); moola.parallel's `--wait-for-lock` waits."""
    import zc.lockfile

    repo = boxes["b"]
    lock = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))
    release = threading.Timer(6.0, lock.close)
    release.start()
    try:
        runner = subprocess.Popen(
            [sys.executable, "-m", "moola.parallel", "--only", "pretrain"], cwd=repo, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(repo),
        )
        plain = run(["dvc", "repro", "--single-item", "pretrain@exp1_baseline"], repo, check=False)
        assert plain.returncode != 0 and "Unable to acquire lock" in plain.stderr
        out, _ = runner.communicate(timeout=120)
    finally:
        release.join()
    assert runner.returncode == 0, out
    assert all(_outcome(out, f"pretrain@{e}") == "up to date" for e in EXPERIMENTS)


def _env(repo: Path) -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(repo / "src"), "DVC_NO_ANALYTICS": "1"}


# ---- DVC's experiments queue ------------------------------------------------------------------------------


def _queue_idle(repo: Path) -> bool:
    status = run(["dvc", "queue", "status"], repo).stdout
    return not re.search(r"\b(Queued|Running)\b", status)


@pytest.fixture(scope="module")
def queued(reference_run, tmp_path_factory):
    """Two variants queued and run by two DVC workers, in a clone that has the reference run's cache."""
    base = tmp_path_factory.mktemp("queue")
    origin = base / "team.git"
    run(["git", "clone", "-q", "--bare", str(reference_run.origin), str(origin)], base)
    repo = clone(origin, base / "laptop")
    run(["dvc", "remote", "modify", "--local", "local", "url", str(base / "team-remote")], repo)
    copy_cache(reference_run.repo, repo)
    run(["dvc", "checkout"], repo)
    variants = {"check-0.5": "select.max_val_loss_at_check=0.5", "check-1.0": "select.max_val_loss_at_check=1.0"}
    for name, override in variants.items():
        run(["dvc", "exp", "run", "--queue", "-S", override, "-n", name], repo)
    # Never pipe `dvc queue start`: its workers keep the output open and a pipe blocks until they exit.
    with open(base / "queue-start.log", "w") as log:
        subprocess.run(["dvc", "queue", "start", "--jobs", "2"], cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                       env=_env(repo), check=True, timeout=60)
    try:
        deadline = time.monotonic() + 300
        while not _queue_idle(repo):
            assert time.monotonic() < deadline, run(["dvc", "queue", "status"], repo).stdout
            time.sleep(2)
        status = run(["dvc", "queue", "status"], repo).stdout
    finally:
        run(["dvc", "queue", "stop"], repo, check=False)
    return {"repo": repo, "origin": origin, "status": status, "variants": variants, "base": base}


def test_the_queue_runs_both_variants(queued):
    assert queued["status"].count("Success") == 2, queued["status"]
    shown = run(["dvc", "exp", "show", "--json"], queued["repo"]).stdout
    for name in queued["variants"]:
        assert f'"{name}"' in shown
    diff = run(["dvc", "params", "diff", "check-0.5", "check-1.0"], queued["repo"]).stdout
    assert "select.max_val_loss_at_check" in diff and "0.5" in diff and "1.0" in diff
    run(["dvc", "metrics", "diff", "check-0.5", "check-1.0"], queued["repo"])


def test_experiments_travel_through_git_and_the_remote(queued, tmp_path):
    repo = queued["repo"]
    run(["dvc", "exp", "push", "origin", "check-0.5"], repo)  # git refs to origin, outputs to the default remote
    other = clone(queued["origin"], tmp_path / "other")
    run(["dvc", "remote", "modify", "--local", "local", "url", str(queued["base"] / "team-remote")], other)
    run(["dvc", "exp", "pull", "origin", "check-0.5"], other)
    assert "check-0.5" in run(["dvc", "exp", "list", "--all-commits"], other).stdout
    # Keep it: a git branch from the experiment, then its files.
    run(["dvc", "exp", "branch", "check-0.5", "keep-check-0.5"], other)
    run(["git", "checkout", "-q", "keep-check-0.5"], other)
    run(["dvc", "pull"], other)
    params = yaml.safe_load((other / "params.yaml").read_text())
    assert params["select"]["max_val_loss_at_check"] == 0.5
    assert (other / "metrics" / "select.json").is_file() and (other / "data" / "selected" / "encoder.pt").is_file()
