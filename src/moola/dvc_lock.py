"""DVC's stage lock after a killed run: `moola unlock` removes the entries of processes that are gone.

`dvc repro` records itself (pid and command) in .dvc/tmp/rwlock for every dep and output of the stage it runs, and
removes the entry when it ends. A `dvc repro` killed with SIGKILL leaves its entry behind. DVC clears an entry whose
pid no longer exists on the next try, but a killed process that its parent has not reaped yet (a zombie) still
exists: DVC then refuses with "... is busy, it is being blocked by: (PID N) ...". Plumbing: no stage imports this.
"""

from __future__ import annotations

from pathlib import Path

RWLOCK_DIR = Path(".dvc/tmp")


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited: no such process, or a zombie (dead, waiting for its parent to read its status)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # access denied: it runs, as another user
        return False


def clear_stale_rwlock(root: Path = Path(".")) -> list[str]:
    """Remove from `root`'s .dvc/tmp/rwlock every entry of a process that is gone; one line per removed entry.

    Edits the file under DVC's own guard (dvc.rwlock's lock file), so that a running `dvc` never sees it half
    written; entries of running processes stay."""
    tmp_dir = root / RWLOCK_DIR
    if not (tmp_dir / "rwlock").is_file():
        return []
    from dvc.fs import localfs
    from dvc.rwlock import _edit_rwlock  # DVC's guarded read-modify-write of the file (dvc is pinned)

    removed: list[str] = []
    with _edit_rwlock(str(tmp_dir), localfs, False) as lock:
        for path, info in list(lock["write"].items()):
            if process_gone(int(info["pid"])):
                removed.append(f"write lock on {path} (PID {info['pid']}: {info['cmd']})")
                del lock["write"][path]
        for path, infos in list(lock["read"].items()):
            alive = [info for info in infos if not process_gone(int(info["pid"]))]
            removed += [f"read lock on {path} (PID {info['pid']}: {info['cmd']})"
                        for info in infos if info not in alive]
            if alive:
                lock["read"][path] = alive
            else:
                del lock["read"][path]
    return removed


def main(root: Path = Path(".")) -> None:
    removed = clear_stale_rwlock(root)
    for line in removed:
        print(f"removed the {line}: that process is gone", flush=True)
    if not removed:
        print(f"{root / RWLOCK_DIR / 'rwlock'}: no entry of a process that is gone", flush=True)
