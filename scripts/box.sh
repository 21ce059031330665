#!/usr/bin/env bash
# What runs on a GPU box, written once: scripts/runpod.sh (a box reached over SSH) and sky/train.yaml (a box that
# SkyPilot provisions) both call this, in the repository's root on the box (docs/gpu-box-and-remote.md).
#
#   scripts/box.sh [options] STEP...      the steps run in the order given, and the first that fails stops it
#
#   setup    a venv .venv with `pip install -e .`, made with --system-site-packages so that the image's CUDA
#            torch is the one used (with --python: only check that that Python has moola's dependencies)
#   remote   make --remote the box's default DVC remote (the one the laptop and every box share)
#   doctor   `moola doctor`, the box's first minute: it stops the run here, with its one line and exit 2, if
#            training would not use the box's GPU, and prints the precision and speed the run will get
#   pull     `dvc pull --allow-missing`: what the remote already has
#   train    the box's share: `python -m moola.parallel --jobs N --pull [--only STAGES]` (the experiments
#            concurrently, then the rest of the pipeline unless --only), `dvc push --run-cache`, and a commit of
#            the new dvc.lock on the box's branch moola-results
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --dry-run        print each command instead of running it
  --python PATH    a Python that already has moola's dependencies (default: .venv/bin/python, made by setup)
  --remote NAME    the DVC remote that laptop and boxes share (default s3)
  --jobs N         experiments at once (default 5)
  --only "STAGES"  this box's share: only these stages and their upstream (e.g. "pretrain@exp1_baseline"); empty: all
EOF
}

DRY_RUN=0; BOX_PYTHON=""; REMOTE=s3; JOBS=5; ONLY=""; STEPS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --python) BOX_PYTHON="${2:?--python needs a path}"; shift ;;
        --remote) REMOTE="${2:?--remote needs a name}"; shift ;;
        --jobs) JOBS="${2:?--jobs needs a number}"; shift ;;
        --only) ONLY="${2?--only needs stage names}"; shift ;;
        -h|--help) usage; exit 0 ;;
        setup|remote|doctor|pull|train) STEPS+=("$1") ;;
        *) echo "error: scripts/box.sh: unknown option or step '$1' (steps: setup remote doctor pull train; see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ ${#STEPS[@]} = 0 ]; then
    echo "error: scripts/box.sh: no step given (steps: setup remote doctor pull train; see --help)" >&2; exit 2
fi
case "$JOBS" in ''|*[!0-9]*|0) echo "error: scripts/box.sh: --jobs must be a positive integer, got '$JOBS'" >&2; exit 2 ;; esac
case "$ONLY" in *[!A-Za-z0-9_@.\ -]*) echo "error: scripts/box.sh: --only takes stage names separated by spaces, got '$ONLY'" >&2; exit 2 ;; esac
# shellcheck disable=SC2206  # a list of stage names, split on spaces on purpose
ONLY_ARGS=(${ONLY:+--only $ONLY})

# Print a command (dry run) or run it. Arguments are one command; `say` explains a step.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}
say() { printf '==> %s\n' "$*"; }

PY="${BOX_PYTHON:-.venv/bin/python}"
export PATH="$(cd "$(dirname "$PY")" 2>/dev/null && pwd || dirname "$PY"):$PATH"  # stages call `python`
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

for step in "${STEPS[@]}"; do
    case "$step" in
    setup)
        if [ -n "$BOX_PYTHON" ]; then
            say "setup: $PY has moola's dependencies?"
            run "$PY" -c 'import dvc, torch, moola.parallel'
        else
            say "setup: .venv with pip install -e . (the image's CUDA torch stays)"
            # --system-site-packages: the image's CUDA build of torch satisfies moola's torch requirement.
            if [ "$DRY_RUN" = 1 ] || [ ! -x .venv/bin/python ]; then
                run python3 -m venv --system-site-packages .venv
            fi
            run .venv/bin/python -m pip install -q -e .
        fi
        ;;
    remote)
        say "remote: $REMOTE is the default remote"
        run "$PY" -m dvc remote default --local "$REMOTE"
        ;;
    doctor)
        say "doctor: will training use the GPU?"
        run "$PY" -m moola.doctor
        ;;
    pull)
        say "pull: what the remote already has"
        run "$PY" -m dvc pull --allow-missing
        ;;
    train)
        sha=$(git rev-parse HEAD)
        say "box $(hostname): the experiments of $sha, $JOBS at a time"
        run "$PY" -m moola.parallel --jobs "$JOBS" --pull "${ONLY_ARGS[@]}"
        say "push outputs and run-cache to the default remote"
        run "$PY" -m dvc push --run-cache
        say "commit dvc.lock on branch moola-results"
        if [ "$DRY_RUN" = 1 ] || ! git diff --quiet -- dvc.lock || [ -n "$(git ls-files --others --exclude-standard dvc.lock)" ]; then
            run git add dvc.lock
            run git -c user.name="moola on $(hostname)" -c user.email="moola@$(hostname)" \
                commit -q -m "Results of $sha on $(hostname): dvc.lock after moola.parallel --jobs $JOBS"
        fi
        run git branch -f moola-results HEAD
        say "done: branch moola-results is $(git rev-parse --short HEAD 2>/dev/null)"
        ;;
    esac
done
