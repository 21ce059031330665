"""Run independent stages of the pipeline concurrently: `moola parallel`, or `python -m moola.parallel`.

`dvc repro` runs one stage at a time. This reproduces the upstream of the chosen stages with `dvc repro`, then runs
the chosen stages themselves concurrently (each one `dvc repro --single-item NAME`, at most --jobs at once, each
logging to .moola/logs/NAME.log), then the rest of the pipeline with `dvc repro`. DVC records every stage as usual,
so dvc.lock, the outputs and the run-cache are the same as after a sequential `dvc repro`.

    python -m moola.parallel --jobs 5                     # the five pretrain@... entries, then the rest
    python -m moola.parallel --only pretrain@exp1_baseline pretrain@exp4_block_mask   # a share for one box
    python -m moola.parallel --pull                       # reuse what the default remote has (outputs, run-cache)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moola.errors import MoolaError, run_main

DEFAULT_TARGETS = ("pretrain",)
LOG_DIR = Path(".moola/logs")
# DVC's repo lock is held while a stage's outputs are hashed and dvc.lock is written, not while its command runs.
# `--wait-for-lock` makes a concurrent `dvc repro` wait for it instead of failing after 3 seconds; a stage that
# still fails on a lock (the per-output rwlock answers "is busy") failed before its command ran and is retried.
LOCK_MESSAGES = ("Unable to acquire lock", "is busy, it is being blocked by")
LOCK_RETRIES = 3
# Read by moola.device.use_threads: on an accelerator a job's torch CPU threads (on the CPU: always the param's).
THREAD_BUDGET_VAR = "MOOLA_THREAD_BUDGET"
PEAK_MEMORY = re.compile(r"peak GPU memory [^\n]*")


def visible_gpus(environ: Mapping[str, str], nvidia_smi_lines: Sequence[str] | None) -> list[str]:
    """The GPUs a job may be given: CUDA_VISIBLE_DEVICES's entries when set, else one index per `nvidia-smi -L`
    line (None: no nvidia-smi on this machine)."""
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    return [str(i) for i, line in enumerate(nvidia_smi_lines or []) if line.startswith("GPU ")]


def list_gpus() -> list[str] | None:
    """`nvidia-smi -L` lines, or None where there is no nvidia-smi (the runner never initialises CUDA itself)."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else None


def concurrency(jobs: int, cores: int, threads: int, gpus: Sequence[str]) -> tuple[int, str]:
    """How many jobs run at once, and why, when `jobs` are asked for.

    On GPUs: all of them (the GPU computes; each job's CPU threads get cores / jobs). On the CPU, the torch thread
    count decides the bytes (threads 1 and 2 gave different weights at hidden 128, BENCHMARKS.md), and it is a
    param (pretrain.threads, finetune.threads): a job never runs with fewer. So at most cores / threads at once;
    more would oversubscribe the cores (two 2-thread trainings at once on 2 cores: 48 samples/s each against
    ~700 alone, BENCHMARKS.md).
    """
    if gpus or jobs * threads <= cores:
        return jobs, ""
    fit = max(1, cores // threads)
    return fit, (f"{jobs} jobs of {threads} CPU threads (pretrain.threads / finetune.threads) do not fit in {cores} "
                 f"cores: {fit} at a time, each with its full threads, so the bytes are those of `dvc repro`")


def job_env(slot: int, jobs: int, base: Mapping[str, str], gpus: Sequence[str], cores: int) -> dict[str, str]:
    """The environment of the `slot`-th job started when `jobs` run at once: GPUs round-robin, and a CPU thread
    budget of cores / jobs (at least 1). With more than one job at once, OpenMP threads wait passively instead of
    spinning between parallel regions (spinning threads of concurrent jobs slow each other down)."""
    env = dict(base)
    threads = max(1, cores // max(1, jobs))
    env[THREAD_BUDGET_VAR] = str(threads)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if jobs > 1:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


@dataclass(frozen=True)
class Plan:
    """What to run: `upstream` first (one `dvc repro`), then `parallel` concurrently, then the rest."""

    upstream: tuple[str, ...]
    parallel: tuple[str, ...]
    # For each parallel stage, the parallel stages it depends on (they must finish first).
    waits_for: Mapping[str, frozenset[str]] = field(default_factory=dict)


def _ancestors(name: str, upstream_of: Mapping[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(upstream_of.get(name, ()))
    while todo:
        stage = todo.pop()
        if stage not in seen:
            seen.add(stage)
            todo.extend(upstream_of.get(stage, ()))
    return seen


def expand_targets(targets: Sequence[str], stages: Sequence[str]) -> tuple[str, ...]:
    """Stage names for `targets`: a name as `dvc repro` knows it, or a foreach group (`pretrain` -> its entries)."""
    chosen: list[str] = []
    for target in targets:
        matches = [s for s in stages if s == target or s.startswith(target + "@")]
        if not matches:
            raise MoolaError(
                f"dvc.yaml: no stage or foreach group named '{target}' (stages: {', '.join(stages)})"
            )
        chosen.extend(m for m in matches if m not in chosen)
    return tuple(sorted(chosen, key=stages.index))


def make_plan(upstream_of: Mapping[str, set[str]], targets: Sequence[str]) -> Plan:
    """Split the pipeline around `targets` (functional core: `upstream_of` maps each stage to its direct upstream)."""
    chosen = expand_targets(targets, list(upstream_of))
    ancestors = {name: _ancestors(name, upstream_of) for name in chosen}
    before = set().union(*ancestors.values()) - set(chosen)
    order = list(upstream_of)  # dvc.yaml order, which is also a valid order for `dvc repro` to print
    return Plan(
        upstream=tuple(s for s in order if s in before),
        parallel=chosen,
        waits_for={name: frozenset(ancestors[name] & set(chosen)) for name in chosen},
    )


def pipeline_graph(root: Path) -> dict[str, set[str]]:
    """Each stage of the repository's pipeline (in dvc.yaml order) with the stages it directly depends on."""
    from dvc.repo import Repo  # only the runner needs DVC's API; the stages themselves never import dvc

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges go from a stage to the stages producing its dependencies
        stages = [s for s in repo.index.stages if s.addressing in {n.addressing for n in graph.nodes}]
        return {s.addressing: {d.addressing for d in graph.successors(s)} for s in stages}


def dvc_command(*args: str) -> list[str]:
    """`dvc ARGS` with the DVC of this Python (the one that has moola's dependencies)."""
    return [sys.executable, "-m", "dvc", *args]


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _outcome(log_text: str) -> str:
    if "Running stage" in log_text:
        return "ran"
    if "is cached - skipping run" in log_text:
        return "restored from the run-cache"
    if "didn't change, skipping" in log_text:
        return "up to date"
    if "Pulling data for" in log_text:
        return "pulled"
    return "done"


def _placement(env: Mapping[str, str]) -> str:
    gpu = f"GPU {env['CUDA_VISIBLE_DEVICES']}, " if "CUDA_VISIBLE_DEVICES" in env else ""
    return f"{gpu}{env[THREAD_BUDGET_VAR]} CPU thread{'s' if env[THREAD_BUDGET_VAR] != '1' else ''}"


@dataclass
class _Job:
    name: str
    log: Path
    proc: subprocess.Popen
    started: float
    attempt: int


def run_concurrently(plan: Plan, jobs: int, log_dir: Path, pull: bool = False,
                     env_for: Callable[[int], dict[str, str]] | None = None) -> dict[str, int]:
    """Run the plan's parallel stages, at most `jobs` at once; returns each stage's exit status.

    `env_for(slot)` is the environment of the slot-th job started (job_env); default: this process's.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    started_jobs = 0
    pending = list(plan.parallel)
    running: list[_Job] = []
    status: dict[str, int] = {}
    attempts: dict[str, int] = {}
    while pending or running:
        for name in list(pending):
            if len(running) >= jobs:
                break
            waits = plan.waits_for.get(name, frozenset())
            if any(status.get(w, 0) != 0 for w in waits if w in status):
                pending.remove(name)
                status[name] = -1  # skipped: something it depends on failed
                _say(f"skipped {name}: it depends on a stage that failed")
                continue
            if not all(w in status for w in waits):
                continue
            pending.remove(name)
            attempts[name] = attempts.get(name, 0) + 1
            log = log_dir / f"{name}.log"
            cmd = dvc_command("--wait-for-lock", "repro", "--single-item", *(["--pull"] if pull else []), name)
            env = env_for(started_jobs) if env_for is not None else None
            started_jobs += 1
            with open(log, "ab" if attempts[name] > 1 else "wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            running.append(_Job(name, log, proc, time.monotonic(), attempts[name]))
            _say(f"started {name} (log: {log})")
            if env is not None:
                _say(f"  {name}: {_placement(env)}")
        time.sleep(0.2)
        for job in list(running):
            code = job.proc.poll()
            if code is None:
                continue
            running.remove(job)
            text = job.log.read_text(errors="replace")
            if code != 0 and any(m in text for m in LOCK_MESSAGES) and job.attempt < LOCK_RETRIES:
                _say(f"{job.name} could not take a DVC lock; trying again")
                pending.insert(0, job.name)
                continue
            status[job.name] = code
            seconds = time.monotonic() - job.started
            if code == 0:
                peak = PEAK_MEMORY.search(text)
                _say(f"finished {job.name} in {seconds:.1f} s ({_outcome(text)}){'; ' + peak.group(0) if peak else ''}")
            else:
                tail = "\n    ".join(text.strip().splitlines()[-8:])
                _say(f"FAILED {job.name} (exit {code}) after {seconds:.1f} s; end of {job.log}:\n    {tail}")
    return status


def _run_dvc(*args: str) -> None:
    cmd = dvc_command("--wait-for-lock", *args)
    _say("$ dvc " + " ".join(args))
    code = subprocess.call(cmd)
    if code != 0:
        raise SystemExit(code)


def cpu_threads(root: Path) -> int:
    """The most torch CPU threads a stage asks for (pretrain.threads, an experiment's override, finetune.threads)."""
    from moola.params import load_params

    p = load_params(root / "params.yaml")
    return max([p.finetune.threads] + [e.train.threads for e in p.all_experiments()])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moola parallel",
        description="Reproduce the upstream of the chosen stages, run the chosen stages concurrently "
        "(dvc repro --single-item each, logs in .moola/logs/), then reproduce the rest of the pipeline.",
    )
    parser.add_argument(
        "targets", nargs="*", default=list(DEFAULT_TARGETS),
        help="stages or foreach groups to run concurrently (default: pretrain, i.e. its five entries)",
    )
    parser.add_argument("-j", "--jobs", type=int, default=0, help="at most this many at once (default: all of them)")
    parser.add_argument(
        "--only", action="store_true",
        help="stop after the chosen stages (one box's share of the experiments): do not reproduce the rest",
    )
    parser.add_argument(
        "--pull", action="store_true",
        help="pass --pull to dvc repro: reuse outputs and run-cache entries from the default remote",
    )
    parser.add_argument(
        "--cores", type=int, default=0,
        help="CPU cores to share among the jobs (default: those this process may use)",
    )
    parser.add_argument("--log-dir", type=Path, default=LOG_DIR, help=f"one log per stage (default: {LOG_DIR})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.cores < 0:
        parser.error(f"--cores must be at least 1, got {args.cores}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (argv defaults to sys.argv[1:]); a MoolaError becomes one line and exit 2."""
    run_main(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    root = Path.cwd()
    if not (root / "dvc.yaml").exists():
        raise MoolaError(f"{root / 'dvc.yaml'}: not found (run moola parallel from the repository root)")
    plan = make_plan(pipeline_graph(root), args.targets)
    jobs = args.jobs or len(plan.parallel)
    pull = ["--pull"] if args.pull else []
    gpus = visible_gpus(os.environ, list_gpus())
    cores = args.cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    at_once, why = concurrency(min(jobs, len(plan.parallel)) or 1, cores, cpu_threads(root), gpus)
    if why:
        _say(why)
        jobs = at_once
    _say(f"upstream: {' '.join(plan.upstream) or '(none)'}")
    _say(f"concurrently, {jobs} at a time: {' '.join(plan.parallel)}")
    _say(f"each job: {max(1, cores // at_once)} CPU thread(s) of {cores} cores"
         + (f", GPUs round-robin over {','.join(gpus)}" if gpus else ", no GPU"))
    _say("then: " + ("nothing (--only)" if args.only else "dvc repro (the rest of the pipeline)"))
    if args.dry_run:
        return
    started = time.monotonic()
    if plan.upstream:
        _run_dvc("repro", *pull, *plan.upstream)
    status = run_concurrently(plan, jobs, args.log_dir, pull=args.pull,
                              env_for=lambda slot: job_env(slot, at_once, os.environ, gpus, cores))
    failed = sorted(name for name, code in status.items() if code != 0)
    if failed:
        _say(f"failed or skipped: {', '.join(failed)}; see their logs in {args.log_dir}/")
        raise SystemExit(1)
    if not args.only:
        _run_dvc("repro", *pull)
    _say(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
