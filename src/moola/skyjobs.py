"""One SkyPilot managed job per share of the experiment matrix: `python -m moola.skyjobs`.

Prints one `sky jobs launch` command per experiment of params.yaml (or per --per-box experiments), each running
sky/train.yaml with MOOLA_ONLY set to its `pretrain@<experiment>` stages, on spot boxes that SkyPilot recovers
after a preemption and tears down when the job ends. Each box pushes its outputs and run-cache to the shared
remote; then, where you are, `dvc repro --pull` restores every encoder from the run-cache and runs the rest
(select, finetune, label_curve). docs/gpu-box-and-remote.md, "More than one box".

    python -m moola.skyjobs                 # the commands, one per line
    python -m moola.skyjobs | bash          # launch them (detached: each returns once its job is submitted)
    python -m moola.skyjobs --per-box 2     # two experiments per box (the last box takes what is left)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from moola.errors import MoolaError, run_main
from moola.params import load_params

TASK_YAML = "sky/train.yaml"
# The shared remote's credentials: `--secret NAME` copies each from the environment of whoever launches.
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Passed on (`--env NAME`) only when set here: a remote that is not on AWS needs its endpoint and region.
OPTIONAL_ENVS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def experiment_stages(params_path: Path) -> list[str]:
    """The pretraining stage of every experiment in params.yaml (dvc.yaml's `pretrain` foreach), in its order."""
    return [f"pretrain@{name}" for name in load_params(params_path).experiments]


def shares(stages: Sequence[str], per_box: int) -> list[list[str]]:
    """`stages` in boxes of `per_box`, in order; every stage in exactly one box."""
    if per_box < 1:
        raise MoolaError(f"--per-box must be at least 1, got {per_box}")
    return [list(stages[i:i + per_box]) for i in range(0, len(stages), per_box)]


def job_name(share: Sequence[str], index: int, total: int) -> str:
    """`moola-<experiment>` for one experiment; `moola-<i>-of-<n>` for a box of several (a cluster-name shape:
    lower case, digits, hyphens)."""
    if len(share) == 1:
        return "moola-" + share[0].split("@", 1)[1].lower().replace("_", "-")
    return f"moola-{index}-of-{total}"


def launch_command(share: Sequence[str], name: str, environ: Mapping[str, str], spot: bool = True,
                   infra: str | None = None, task_yaml: str = TASK_YAML) -> list[str]:
    """The `sky jobs launch` of one box's share: detached (-d), unprompted (-y), credentials as secrets."""
    cmd = ["sky", "jobs", "launch", task_yaml, "-n", name, "-y", "-d"]
    if spot:
        cmd.append("--use-spot")
    if infra:
        cmd += ["--infra", infra]
    cmd += ["--env", f"MOOLA_ONLY={' '.join(share)}", "--env", f"MOOLA_JOBS={len(share)}"]
    cmd += [arg for env in OPTIONAL_ENVS if env in environ for arg in ("--env", env)]
    cmd += [arg for secret in SECRETS for arg in ("--secret", secret)]
    return cmd


def commands(params_path: Path, per_box: int, environ: Mapping[str, str], spot: bool = True,
             infra: str | None = None) -> list[list[str]]:
    boxes = shares(experiment_stages(params_path), per_box)
    return [launch_command(share, job_name(share, i, len(boxes)), environ, spot, infra)
            for i, share in enumerate(boxes, start=1)]


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (argv defaults to sys.argv[1:]); a MoolaError becomes one line and exit 2."""
    run_main(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m moola.skyjobs", description=__doc__.splitlines()[0])
    parser.add_argument("--per-box", type=int, default=1, help="experiments per box (default 1)")
    parser.add_argument("--on-demand", action="store_true", help="on-demand boxes instead of spot")
    parser.add_argument("--infra", help="SkyPilot's --infra (e.g. runpod); default: the cheapest enabled")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="default: params.yaml")
    args = parser.parse_args(argv)
    if not Path(TASK_YAML).is_file():
        raise MoolaError(f"{TASK_YAML}: not found (run python -m moola.skyjobs from the repository root)")
    for cmd in commands(args.params, args.per_box, os.environ, spot=not args.on_demand, infra=args.infra):
        print(shlex.join(cmd))


if __name__ == "__main__":
    main()
