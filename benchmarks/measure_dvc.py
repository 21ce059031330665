"""Item 4, DVC: the no-op `dvc repro` and `dvc status` over spec-scale outputs, in a temporary repository."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Settings
from benchmarks.throughput import median

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _repo_copy():
    """tests/repo_copy.py: the tests' temporary repository, which these timings borrow. Imported from this
    checkout's tests/ as conftest imports it (a `tests` package installed elsewhere cannot stand in for it), and
    only when DVC is timed (--no-dvc, as `moola doctor` runs the benchmark, never reads tests/)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import repo_copy

    return repo_copy


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return _repo_copy().run([sys.executable, "-m", "dvc", *args], repo, timeout=None)


def bench_dvc(s: Settings) -> dict:
    """Build prepare + augment in a temporary repository, then time the no-op repro and status."""
    with tempfile.TemporaryDirectory(prefix="moola-bench-") as tmp:
        # The example market's files, whatever this workspace's params point prepare at.
        overrides = {"scale": {"windows": s.windows_scale},
                     "data": {"bars": "data/example/bars.parquet", "labels": "data/example/labels.csv"}}
        repo = _repo_copy().make_repo(Path(tmp) / "repo", overrides)
        began = time.perf_counter()
        _dvc(repo, "repro", "prepare", "augment")
        build = time.perf_counter() - began
        out_bytes = sum(f.stat().st_size for d in ("data/prepared", "data/augmented")
                        for f in (repo / d).iterdir())
        noop_runs, status_runs = [], []
        for _ in range(max(2, s.data_repeats)):
            began = time.perf_counter()
            proc = _dvc(repo, "repro", "prepare", "augment")
            noop_runs.append(time.perf_counter() - began)
            if "up to date" not in proc.stdout:
                raise AssertionError(f"the second `dvc repro` was not a no-op:\n{proc.stdout}")
            began = time.perf_counter()
            _dvc(repo, "status")
            status_runs.append(time.perf_counter() - began)
        version = _dvc(repo, "--version").stdout.strip()
    return {
        "dvc": version,
        "windows_scale": s.windows_scale,
        "output_bytes": out_bytes,
        "build_seconds": build,
        "noop_repro_seconds": median(noop_runs),
        "noop_repro_runs": noop_runs,
        "status_seconds": median(status_runs),
        "status_runs": status_runs,
        "scope": "dvc repro prepare augment (the pipeline's bulky outputs); pretraining outputs at spec scale "
                 "take hours on a CPU, so the no-op is timed over what exists",
    }
