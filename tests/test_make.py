"""`make tour` and `make test`: set up once, then start at once; CI runs `make test`.

The setup itself (venv, pinned CPU torch, the project) is proven by CI, which runs `make test` on a fresh machine;
these tests check make's decisions with `make -n` (print the commands, run none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def plan(repo: Path, target: str, *args: str) -> str:
    # Run as a top-level make, also when the suite itself runs under `make test` (CI): no inherited make flags.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", target, *args], cwd=repo, env=env,
                          capture_output=True, text=True, check=True)
    return "\n".join(line.rstrip() for line in proc.stdout.splitlines())


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def installed(repo: Path, age_seconds: int = 0) -> None:
    """A venv that make set up: its python, and the stamp written `age_seconds` after pyproject.toml."""
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    stamp = repo / ".venv" / ".moola-installed"
    stamp.touch()
    t = (repo / "pyproject.toml").stat().st_mtime + age_seconds
    os.utime(stamp, (t, t))


def test_a_fresh_clone_creates_the_venv_installs_the_pinned_cpu_torch_and_the_project(repo):
    for target in ("tour", "test"):
        commands = plan(repo, target)
        assert "-m venv" in commands
        assert "torch==2.13.0" in commands
        assert 'pip install --quiet -e ".[dev]"' in commands


def test_a_second_call_installs_nothing_and_starts_at_once(repo):
    installed(repo, age_seconds=60)
    assert plan(repo, "tour").strip().splitlines() == [f'PATH="{repo}/.venv/bin:$PATH" moola tour']
    # Two worker processes, each test file whole in one (pytest-xdist, a dev dependency).
    assert plan(repo, "test").strip().splitlines() == [
        f'PATH="{repo}/.venv/bin:$PATH" python -m pytest -q -n 2 --dist loadfile']
    assert plan(repo, "test", "TEST_WORKERS=1").strip().endswith("python -m pytest -q -n 1 --dist loadfile")
    assert plan(repo, "tour", "ARGS=-S mask=random").strip().endswith("moola tour -S mask=random")
    assert plan(repo, "study").strip().splitlines() == [f'PATH="{repo}/.venv/bin:$PATH" moola study']


def test_a_changed_pyproject_reinstalls_the_project(repo):
    installed(repo, age_seconds=-60)  # pyproject.toml edited after the last install
    commands = plan(repo, "tour")
    assert 'pip install --quiet -e ".[dev]"' in commands
    assert "-m venv" in commands  # guarded by a test for an existing venv: it is not remade
    assert 'if [ ! -x ".venv/bin/python" ]' in commands


def test_ci_runs_make_test_and_the_readme_shows_the_two_commands_first():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "pytest" not in ci.replace("make test", "")
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "make tour" in first_screen and "make test" in first_screen
