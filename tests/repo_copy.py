"""A temporary copy of this repository as a committed git + DVC repository: its code and params, never its data,
cache or history. The tests (tests/conftest.py) and the DVC timings (benchmarks/measure_dvc.py) both use it, as the
top-level module repo_copy from this folder; the tests never import benchmarks/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# What a copy holds: what `dvc repro` needs to run every stage (the stages run `python -m moola.stages.<stage>`).
COPIED = ["src", "params.yaml", "dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "scripts",
          "data/no_test_labels.csv"]


def deep_update(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def write_params(repo: Path, overrides: dict) -> dict:
    """repo/params.yaml: this repository's params.yaml with `overrides` merged in, key by key."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = deep_update(params, overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None, timeout: float | None = 600):
    """Run a real command with cwd's code first on PYTHONPATH; on failure show its output in the assertion message."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(cwd / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("DVC_NO_ANALYTICS", "1")
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", "")
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, shell=isinstance(cmd, str)
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def make_repo(dest: Path, overrides: dict | None = None, git: bool = True) -> Path:
    """A fresh repository at `dest` holding COPIED, params.yaml with `overrides`, committed (unless git=False)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    write_params(dest, overrides or {})
    if git:
        run(["git", "init", "-q", "-b", "main"], dest)
        run(["git", "config", "user.email", "test@moola"], dest)
        run(["git", "config", "user.name", "moola tests"], dest)
        run(["dvc", "init", "-q"], dest)
        run(["dvc", "config", "core.analytics", "false"], dest)
        # The project's plot templates (dvc init has just made .dvc/).
        shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")
        run(["git", "add", "-A"], dest)
        run(["git", "commit", "-q", "-m", "tiny moola"], dest)
    return dest
