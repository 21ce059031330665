#!/usr/bin/env bash
# Train on a GPU box over SSH, the DVC way (docs/gpu-box-and-remote.md).
#
#   scripts/runpod.sh [options] [user@host] [port] [key]
#
# From the laptop, in the repository, with the current commit:
#   1. check the connection (and show the box's GPUs);
#   2. bring the code there with git: push the current commit over SSH into <dir> on the box, check it out;
#   3. give the box the laptop's remote settings (.dvc/config.local: endpoint, credentials);
#   4. set up Python there (a venv with `pip install -e .`, seeing the image's CUDA torch), unless --python,
#      and make --remote the box's default remote; then `moola doctor`, the box's first minute: it stops here,
#      with one line, if training would not use the box's GPU, and prints the precision and speed it will get
#      (steps 4-6 on the box are scripts/box.sh, the commands that sky/train.yaml runs too);
#   5. `dvc pull` what the remote already has;
#   6. start, detached with nohup (it survives a dropped connection), the box's share:
#      `python -m moola.parallel --jobs N --pull` (the five experiments concurrently, then the rest),
#      `dvc push --run-cache`, and a commit of the new dvc.lock on the box's branch moola-results;
#   7. print the commands that follow the logs and the GPU, then follow the log until the run ends;
#   8. bring the results home: `git fetch` moola-results from the box, fast-forward to it, and `dvc pull` the
#      files (with --only: that share and its upstream, `dvc pull --with-deps <stages>`).
# With --dry-run every command is printed instead of run. --attach picks up at step 7 (after a dropped
# connection). `scripts/runpod.sh --on-box` is `scripts/box.sh train` (step 6 on the box).
#
# Defaults come from RUNPOD_HOST, RUNPOD_PORT (22), RUNPOD_KEY; extra ssh options from RUNPOD_SSH_OPTS (they win
# over the defaults). A new pod's host key is accepted on first contact into .moola/known_hosts (this checkout's
# own file; a changed key for a known host:port is still refused). RunPod: the pod needs "SSH over exposed TCP"
# (a public IP and port, the PORT here); the proxied ssh.runpod.io login cannot run commands or git.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --dry-run        print each command instead of running it
  --jobs N         experiments at once on the box (default 5)
  --remote NAME    the DVC remote that laptop and box share (default s3)
  --dir PATH       the repository on the box, relative to the login's home or absolute (default /workspace/moola:
                   RunPod's persistent volume; the container disk, and ~, are wiped when the pod stops)
  --python PATH    a Python on the box that already has moola's dependencies (default: <dir>/.venv, made there)
  --only "STAGES"  this box's share: run only these stages (e.g. "pretrain@exp1_baseline pretrain@exp2_conservative"),
                   not the rest of the pipeline (docs/gpu-box-and-remote.md, "More than one box")
  --attach         only follow a run already started, then bring its results home (steps 7-8)
  --no-fetch       leave the results on the box and the remote (skip step 8)
  --on-box         (on the box) the box's share: scripts/box.sh train (parallel run, dvc push, results commit)
EOF
}

DRY_RUN=0; JOBS=5; REMOTE=s3; BOX_DIR=/workspace/moola; BOX_PYTHON=""; ATTACH=0; FETCH=1; ON_BOX=0; ONLY=""
POSITIONAL=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --jobs) JOBS="${2:?--jobs needs a number}"; shift ;;
        --remote) REMOTE="${2:?--remote needs a name}"; shift ;;
        --dir) BOX_DIR="${2:?--dir needs a path}"; shift ;;
        --python) BOX_PYTHON="${2:?--python needs a path}"; shift ;;
        --only) ONLY="${2:?--only needs stage names}"; shift ;;
        --attach) ATTACH=1 ;;
        --no-fetch) FETCH=0 ;;
        --on-box) ON_BOX=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: scripts/runpod.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) POSITIONAL+=("$1") ;;
    esac
    shift
done
case "$JOBS" in ''|*[!0-9]*|0) echo "error: scripts/runpod.sh: --jobs must be a positive integer, got '$JOBS'" >&2; exit 2 ;; esac
case "$ONLY" in *[!A-Za-z0-9_@.\ -]*) echo "error: scripts/runpod.sh: --only takes stage names separated by spaces, got '$ONLY'" >&2; exit 2 ;; esac

LOG_DIR=.moola/logs
RUN_LOG=$LOG_DIR/runpod.log

# Print a command (dry run) or run it. Arguments are one command; `say` explains a step.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}
say() { printf '==> %s\n' "$*"; }

# ---- The box's share (step 6): scripts/box.sh train, which sky/train.yaml runs too ----------------------
if [ "$ON_BOX" = 1 ]; then
    BOX_ARGS=(--jobs "$JOBS" --only "$ONLY")
    [ -n "$BOX_PYTHON" ] && BOX_ARGS+=(--python "$BOX_PYTHON")
    [ "$DRY_RUN" = 1 ] && BOX_ARGS+=(--dry-run)
    exec bash "$(dirname "$0")/box.sh" "${BOX_ARGS[@]}" train
fi

# ---- The laptop's side -----------------------------------------------------------------------------
HOST="${POSITIONAL[0]:-${RUNPOD_HOST:-}}"
PORT="${POSITIONAL[1]:-${RUNPOD_PORT:-22}}"
KEY="${POSITIONAL[2]:-${RUNPOD_KEY:-}}"
if [ -z "$HOST" ]; then
    echo "error: scripts/runpod.sh: no box given: pass user@host (or set RUNPOD_HOST); see --help" >&2
    exit 2
fi
case "$PORT" in ''|*[!0-9]*) echo "error: scripts/runpod.sh: port must be a number, got '$PORT'" >&2; exit 2 ;; esac
if [ -n "$KEY" ] && [ ! -f "$KEY" ] && [ "$DRY_RUN" = 0 ]; then
    echo "error: scripts/runpod.sh: key file '$KEY' not found" >&2; exit 2
fi

ROOT=$(git rev-parse --show-toplevel 2>/dev/null) || {
    echo "error: scripts/runpod.sh: not inside a git repository (run it from the moola checkout)" >&2; exit 2; }
cd "$ROOT"

KNOWN_HOSTS="$ROOT/.moola/known_hosts"
[ "$DRY_RUN" = 1 ] || mkdir -p "$(dirname "$KNOWN_HOSTS")"
SSH=(ssh -p "$PORT")
# ssh keeps the first value it is given for an option: RUNPOD_SSH_OPTS come first so that they win.
# shellcheck disable=SC2206  # RUNPOD_SSH_OPTS is a list of options, split on purpose
[ -n "${RUNPOD_SSH_OPTS:-}" ] && SSH+=(${RUNPOD_SSH_OPTS})
# accept-new: every new pod has a new host key, and BatchMode cannot ask about it. ServerAlive: the log follow
# (step 7) is silent for long stretches; a NAT that drops idle connections would end it without it.
SSH+=(-o BatchMode=yes -o ConnectTimeout=15 -o StrictHostKeyChecking=accept-new -o "UserKnownHostsFile=$KNOWN_HOSTS"
      -o ServerAliveInterval=30 -o ServerAliveCountMax=4)
[ -n "$KEY" ] && SSH+=(-i "$KEY")
GIT_SSH="${SSH[*]}"
# A command on the box; a dry run shows it as one would type it.
on_box() {
    if [ "$DRY_RUN" = 1 ]; then echo "+ ${SSH[*]} $HOST '$1'"; else "${SSH[@]}" "$HOST" "$1"; fi
}
q() { printf '%q' "$1"; }

# The box's side is scripts/box.sh (from the commit); --python reaches it as is.
BOX_OPTS="${BOX_PYTHON:+ --python $(q "$BOX_PYTHON")}"
# Every command on the box starts in the repository.
IN_DIR="cd $(q "$BOX_DIR") &&"
FOLLOW="${SSH[*]} $HOST"

if [ "$ATTACH" = 0 ]; then
    if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
        echo "error: scripts/runpod.sh: uncommitted changes in tracked files (git status): the box runs the current commit, commit them first" >&2
        exit 2
    fi
    SHA=$(git rev-parse HEAD)

    say "1. check the connection to $HOST:$PORT"
    on_box 'echo "connected to $(hostname)"; command -v git >/dev/null || { echo "error: git is not installed on the box" >&2; exit 1; }; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: the experiments will run on the CPU"'

    say "2. bring commit $SHA to $HOST:$BOX_DIR with git"
    on_box "test -d $(q "$BOX_DIR")/.git || git init -q $(q "$BOX_DIR")"
    run env GIT_SSH_COMMAND="$GIT_SSH" git push -q -f "$HOST:$BOX_DIR" "HEAD:refs/heads/moola-run"
    on_box "$IN_DIR git checkout -q -f --detach $SHA"

    say "3. the remote: $REMOTE, as configured here"
    if [ -f .dvc/config.local ]; then
        # Endpoint and credentials live in .dvc/config.local (never committed): the box gets the same file.
        if [ "$DRY_RUN" = 1 ]; then
            echo "+ ${SSH[*]} $HOST 'cat > $BOX_DIR/.dvc/config.local' < .dvc/config.local"
        else
            "${SSH[@]}" "$HOST" "cat > $(q "$BOX_DIR")/.dvc/config.local" < .dvc/config.local
        fi
    else
        echo "    (no .dvc/config.local here: the box needs its own credentials, e.g. AWS_* variables or ~/.aws)"
    fi

    say "4. Python on the box, and the remote it uses (scripts/box.sh setup remote)"
    on_box "$IN_DIR bash scripts/box.sh$BOX_OPTS --remote $(q "$REMOTE") setup remote"
    say "4b. the box's first minute: moola doctor (stops here if training would not use the GPU)"
    on_box "$IN_DIR bash scripts/box.sh$BOX_OPTS doctor"

    say "5. dvc pull what the remote already has"
    on_box "$IN_DIR bash scripts/box.sh$BOX_OPTS pull"

    say "6. start the experiments on the box (detached: a dropped connection does not stop them)"
    on_box "$IN_DIR mkdir -p $LOG_DIR && rm -f $LOG_DIR/runpod.exit && { nohup bash -c 'bash scripts/box.sh$BOX_OPTS --jobs $JOBS${ONLY:+ --only \"$ONLY\"} train; echo \$? > $LOG_DIR/runpod.exit' > $RUN_LOG 2>&1 < /dev/null & echo \$! > $LOG_DIR/runpod.pid; }"
fi

say "7. follow it (from another terminal, any time):"
echo "    the run:          $FOLLOW 'tail -f $BOX_DIR/$RUN_LOG'"
echo "    one experiment:   $FOLLOW 'tail -f $BOX_DIR/$LOG_DIR/pretrain@exp1_baseline.log'"
echo "    the GPU:          $FOLLOW 'nvidia-smi -l 5'"
echo "    after a dropped connection: scripts/runpod.sh --attach $HOST $PORT ${KEY}"
on_box "$IN_DIR while [ ! -f $LOG_DIR/runpod.pid ]; do sleep 1; done; tail -n +1 --pid=\$(cat $LOG_DIR/runpod.pid) -f $RUN_LOG; while [ ! -f $LOG_DIR/runpod.exit ]; do sleep 1; done"
if [ "$DRY_RUN" = 1 ]; then
    status=0
    on_box "$IN_DIR cat $LOG_DIR/runpod.exit"
else
    status=$("${SSH[@]}" "$HOST" "$IN_DIR cat $LOG_DIR/runpod.exit")
fi
if [ "$status" != 0 ]; then
    echo "error: scripts/runpod.sh: the run on the box failed (exit $status): see $BOX_DIR/$RUN_LOG there" >&2
    exit 1
fi

if [ "$FETCH" = 1 ]; then
    say "8. bring the results home: the box's dvc.lock through git, the files through the remote"
    run env GIT_SSH_COMMAND="$GIT_SSH" git fetch -q "$HOST:$BOX_DIR" "+refs/heads/moola-results:refs/heads/moola-results"
    if ! run git merge -q --ff-only moola-results; then
        echo "error: scripts/runpod.sh: this branch moved since the run started: merge branch moola-results yourself, then: dvc pull -r $REMOTE${ONLY:+ --with-deps $ONLY}" >&2
        exit 1
    fi
    # A plain pull: every output the box's dvc.lock records is on the remote, so exit 0 means all arrived
    # (verify = true refuses a corrupted object). A share's dvc.lock records only the share and its upstream.
    run python -m dvc pull -r "$REMOTE" ${ONLY:+--with-deps $ONLY}
    say "done: dvc.lock and the outputs of the box's run are here (git log -1; dvc metrics show)"
else
    say "done: results are on branch moola-results on the box and on remote '$REMOTE'"
fi
