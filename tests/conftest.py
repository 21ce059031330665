"""Shared fixtures: a temporary copy of the repository at a tiny scale, and helpers to run real commands in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# What a temporary copy of the repository holds: the project itself, never its data, cache or git history.
COPIED = ["src", "params.yaml", "dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "scripts",
          "data/no_test_labels.csv"]

# Small enough for seconds per stage on 2 cores, large enough that every stage has real work.
TINY = {
    "scale": {"windows": 0.006, "epochs": 0.04},  # 71 unlabeled windows; 3/2/4/3/3 pretraining epochs
    # One thread: the suite shares 2 cores with itself, and oversubscribed torch threads crawl.
    "pretrain": {"batch_size": 32, "hidden_size": 128, "threads": 1},
    "finetune": {"seeds": [1337], "epochs": 2, "freeze_epochs": 1, "bootstrap": 200, "threads": 1},
    # A label pool of 120 (the 89 and 31 more) and 300 held-out windows; a two-point curve with one seed.
    "data": {"label_pool": 120, "test_windows": 300},
    "curve": {"sizes": [20, 45], "seeds": [1337]},
}


def deep_update(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def write_params(repo: Path, overrides: dict) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = deep_update(params, overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None, timeout: float = 600):
    """Run a real command; on failure show its output in the assertion message."""
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
    """A fresh, committed git + DVC repository holding the project at TINY scale (plus `overrides`)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    write_params(dest, deep_update(TINY, overrides or {}))
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


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def session_repo(tmp_path_factory) -> Path:
    """One tiny repository shared by read-only integration checks (do not modify it in a test)."""
    return make_repo(tmp_path_factory.mktemp("shared") / "repo")


def flip_bit_in_weights(path: Path, key: str = "weight_hh_l0", at: int = 37) -> None:
    """Flip one bit inside an encoder checkpoint's stored tensor (what bit rot in a cache looks like)."""
    import torch

    weight = torch.load(path, weights_only=True)["state_dict"][key].numpy().tobytes()
    data = bytearray(path.read_bytes())
    offset = data.find(weight[:64])
    assert offset > 0
    data[offset + at] ^= 0x40
    path.write_bytes(bytes(data))
