"""Shared fixtures: a temporary copy of the repository at a tiny scale, and helpers to run real commands in it."""

from __future__ import annotations

from pathlib import Path

import pytest

import repo_copy
from repo_copy import ROOT, deep_update, run  # noqa: F401  (the tests import them from here)

# Small enough for seconds per stage on 2 cores, large enough that every stage has real work.
TINY = {
    "scale": {"windows": 0.006, "epochs": 0.04},  # 71 unlabeled windows; 3/2/4/3/3 pretraining epochs
    # One thread: the suite shares 2 cores with itself, and oversubscribed torch threads crawl.
    "pretrain": {"batch_size": 32, "hidden_size": 128, "threads": 1},
    # One fit at a time: a worker process costs a torch import, more than a 2-epoch fit (tests/test_fits.py runs 2).
    "finetune": {"seeds": [1337], "epochs": 2, "freeze_epochs": 1, "bootstrap": 200, "threads": 1, "workers": 1},
    # Two pretraining replicates of the selected experiment, a snapshot after epoch 1 (and the last, 2-4).
    "replicates": {"seeds": [101, 102], "snapshot_epochs": [1]},
    # A label pool of 120 (the 89 and 31 more) and 300 held-out windows; a two-point curve with one seed.
    "data": {"label_pool": 120, "test_windows": 300},
    "curve": {"sizes": [20, 45], "seeds": [1337]},
}


def make_repo(dest: Path, overrides: dict | None = None, git: bool = True) -> Path:
    """A fresh, committed git + DVC repository holding the project at TINY scale (plus `overrides`)."""
    return repo_copy.make_repo(dest, deep_update(TINY, overrides or {}), git=git)


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def session_repo(tmp_path_factory) -> Path:
    """One tiny repository shared by read-only integration checks (do not modify it in a test)."""
    return make_repo(tmp_path_factory.mktemp("shared") / "repo")


def write_raw_files(folder: Path, bars, labels, suffix: str = ".csv") -> Path:
    """A user's own bars (.csv or .parquet) and labels.csv under folder/data/raw; returns that folder."""
    raw = folder / "data/raw"
    raw.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        bars.to_csv(raw / "bars.csv", index=False)
    else:
        bars.to_parquet(raw / "bars.parquet", index=False)
    labels.to_csv(raw / "labels.csv", index=False)
    return raw


def flip_bit_in_weights(path: Path, key: str = "weight_hh_l0", at: int = 37) -> None:
    """Flip one bit inside an encoder checkpoint's stored tensor (what bit rot in a cache looks like)."""
    import torch

    weight = torch.load(path, weights_only=True)["state_dict"][key].numpy().tobytes()
    data = bytearray(path.read_bytes())
    offset = data.find(weight[:64])
    assert offset > 0
    data[offset + at] ^= 0x40
    path.write_bytes(bytes(data))


# The fast loop (`make test-fast`): every test that builds a repository copy (directly or through a fixture that
# does) runs real DVC and is an integration test; `-m "not integration and not slow"` leaves the unit tests.
# (the modules' own fixtures that build one are listed by name).
INTEGRATION_FIXTURES = {"tiny_repo", "session_repo", "reference_run", "plain_repo", "project", "data_repo",
                        "laptop_repo", "repro"}


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
