"""One real, sequential `dvc repro` of the whole pipeline, shared by the remote, parallel and GPU-box tests.

A pytest plugin: a test module says `pytest_plugins = ["pipeline_runs"]` and asks for `reference_run`. The run is
made once per session, at an even smaller scale than conftest's TINY (16 hidden units, 2 folds): these tests are
about where the bytes go, not about what the model learns. Nobody may modify the reference repository; tests
clone it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, deep_update, make_repo, run

# Small enough that the pipeline's twenty-one stages (conftest.TINY: two replicate@<seed> entries) take a minute or
# two on 2 cores.
SMALL = {
    "pretrain": {"hidden_size": 16, "decoder_hidden": 8},
    "finetune": {"hidden_size": 16, "folds": 2, "bootstrap": 50},
    # At this scale nothing learns much; the checks must not reject every encoder.
    "select": {"max_val_loss_at_check": 10.0, "max_final_over_best": 100.0, "max_val_over_train": 100.0},
}

# The artifacts dvc.yaml declares; the reference run registers v0.0.1 of each (`gto register` makes the annotated
# tag `<name>@v0.0.1`, which is what `dvc artifacts get` resolves).
REGISTERED = (
    "selected-encoder", "exp1-baseline-encoder", "exp2-conservative-encoder", "exp3-aggressive-encoder",
    "exp4-block-mask-encoder", "exp5-random-mask-encoder",
)


def make_project_repo(dest: Path, overrides: dict | None = None) -> Path:
    """conftest.make_repo, plus the project's own .dvc/config (its remotes), committed."""
    repo = make_repo(dest, deep_update(SMALL, overrides or {}))
    shutil.copy2(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["git", "commit", "-q", "-am", "the project's remotes"], repo)
    return repo


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lock_entries(repo: Path) -> dict[str, str]:
    """Every output dvc.lock records (outs, metrics, plots), path -> md5 as recorded (`<md5>.dir` for a folder)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def dir_listing(repo: Path, md5: str) -> dict[str, str]:
    """A folder output's files, relative path -> md5, from its listing in the repository's DVC cache (the object
    `<md5>.dir`: a JSON list of {md5, relpath})."""
    listing = json.loads((repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).read_text())
    return {entry["relpath"]: entry["md5"] for entry in listing}


def lock_outputs(repo: Path) -> dict[str, str]:
    """Every file dvc.lock records as an output, path -> md5: a folder output (a replicate's encoders) by the files
    its listing names."""
    files = {}
    for path, md5 in lock_entries(repo).items():
        if md5.endswith(".dir"):
            files.update({f"{path}/{rel}": file_md5 for rel, file_md5 in dir_listing(repo, md5).items()})
        else:
            files[path] = md5
    return files


def lock_folders(repo: Path) -> dict[str, str]:
    """The folder outputs dvc.lock records, path -> the md5 of their listing (`<md5>.dir`, a cache object too)."""
    return {path: md5 for path, md5 in lock_entries(repo).items() if md5.endswith(".dir")}


def workspace_md5s(repo: Path, paths) -> dict[str, str | None]:
    return {p: (md5_of(repo / p) if (repo / p).is_file() else None) for p in paths}


def stages_run(output: str) -> list[str]:
    """Names of the stages whose command DVC ran, from `dvc repro`'s output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def clone(origin: Path, dest: Path, rev: str | None = None) -> Path:
    run(["git", "clone", "-q", str(origin), str(dest)], dest.parent)
    if rev:
        run(["git", "checkout", "-q", rev], dest)
    return dest


def copy_cache(src: Path, dest: Path) -> None:
    """Give `dest` the local DVC cache of `src` (objects and run-cache): a machine that pulled everything."""
    shutil.copytree(src / ".dvc" / "cache", dest / ".dvc" / "cache", dirs_exist_ok=True)


def seed_remote(src: Path, remote: Path, skip_cmd: str) -> int:
    """Fill a folder remote with what pushing `src`'s runs would have put there (objects, run-cache), minus the
    run-cache entries whose cmd contains `skip_cmd`. Returns how many were left out.
    A folder remote has the cache's own layout (files/md5/.., runs/..)."""
    shutil.copytree(src / ".dvc" / "cache", remote, dirs_exist_ok=True)
    skipped = 0
    for entry in list((remote / "runs").glob("*/*/*")):
        if skip_cmd in (yaml.safe_load(entry.read_text()) or {}).get("cmd", ""):
            entry.unlink()
            skipped += 1
            if not any(entry.parent.iterdir()):
                entry.parent.rmdir()  # DVC 3.67 fails ("join() argument must be str") on an empty entry folder
    return skipped


def same_lock(a: Path, b: Path) -> bool:
    """Whether two dvc.lock files record the same runs (DVC writes entries in the order the stages finished)."""
    return yaml.safe_load((a / "dvc.lock").read_text()) == yaml.safe_load((b / "dvc.lock").read_text())


@dataclass(frozen=True)
class Reference:
    repo: Path  # the repository that ran `dvc repro` (read-only for tests)
    origin: Path  # a bare git repository holding its history and the registry tags: what a team pushes to
    code_sha: str  # the commit before the run: no dvc.lock
    results_sha: str  # the commit with the run's dvc.lock
    outputs: dict[str, str]  # every recorded output file -> md5 (a folder output's files one by one)
    folders: dict[str, str]  # every folder output (data/replicates/seed<s>) -> the md5 of its listing
    repro_output: str
    seconds: float

    @property
    def objects(self) -> set[str]:
        """Every object the run put in the DVC cache, as the remotes name them: the files' md5s and the folders'
        listings."""
        return set(self.outputs.values()) | set(self.folders.values())


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Reference:
    base = tmp_path_factory.mktemp("reference")
    repo = make_project_repo(base / "repo")
    code_sha = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    started = time.monotonic()
    proc = run(["dvc", "repro"], repo)
    seconds = time.monotonic() - started
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "results of dvc repro"], repo)
    results_sha = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    # What `gto register NAME --version v0.0.1 -m ...` does for each name (its CLI calls gto.api.register with
    # ref HEAD), in one process instead of six gto start-ups.
    register = ("import sys, gto.api\n"
                "for name in sys.argv[1:]:\n"
                "    gto.api.register('.', name, 'HEAD', version='v0.0.1', message=f'Registering {name} v0.0.1')\n")
    run(["python", "-c", register, *REGISTERED], repo)
    origin = base / "origin.git"
    run(["git", "clone", "-q", "--bare", str(repo), str(origin)], base)
    run(["git", "remote", "add", "origin", str(origin)], repo)
    outputs, folders = lock_outputs(repo), lock_folders(repo)
    assert workspace_md5s(repo, outputs) == outputs
    # The folder outputs are the replicates' (conftest.TINY: two), each its best encoder and its snapshots.
    assert sorted(folders) == ["data/replicates/seed101", "data/replicates/seed102"]
    for folder in folders:
        assert {p.name for p in (repo / folder).iterdir()} == {p.rsplit("/", 1)[1] for p in outputs
                                                               if p.startswith(folder + "/")}
    return Reference(repo, origin, code_sha, results_sha, outputs, folders, proc.stdout, seconds)
