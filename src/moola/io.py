"""Atomic writers: every output is written to a temporary file beside it, then renamed into place.

A crash or a kill at any moment leaves either the old file or the new one, never half of one. A write the system
refuses (disk full, read-only folder, quota) is an `OutputError` naming the path and what was being written, and
leaves nothing behind.

Binary outputs that a later stage trusts verify themselves (see docs/guarantees.md): parquet files carry
per-page CRC checksums (`write_page_checksum`), and .npy arrays end with a sha256 trailer (`NPY_TRAILER`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moola.errors import OutputError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 1_000_000 else f"{n / 1e6:,.1f} MB"


_WRITE_HINTS = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your quota",
    errno.EACCES: "make that folder writable",
    errno.EPERM: "make that folder writable",
    errno.EROFS: "write to a writable filesystem",
}


def _write_failed(path: Path, what: str, exc: OSError) -> OutputError:
    # The system's own words for the errno: pyarrow puts a longer text of its own in strerror.
    if exc.errno:
        reason = f"{os.strerror(exc.errno)} [errno {exc.errno}]"
    else:
        reason = str(exc).split("\n")[0] or type(exc).__name__
    hint = _WRITE_HINTS.get(exc.errno, "fix the cause")
    return OutputError(f"{path}: could not write {what}: {reason}; nothing was written ({hint}, then re-run the stage)")


# Outputs written inside `written_together()`: (temporary file, destination, what), renamed into place at its end.
_together: list[tuple[Path, Path, str]] | None = None


@contextmanager
def written_together() -> Iterator[None]:
    """Every output written inside the block lands at its end, together, or none does.

    A stage computes everything, then writes its outputs inside this block: a failure on the way (a refused write,
    a value JSON cannot hold, any exception) leaves none of them, not the ones written before it either, so
    `dvc status` and `moola report` never see one run's plots beside another's metrics (DVC removes a stage's
    outputs before it runs). Each file is complete and fsync'ed before the first rename.
    """
    global _together
    if _together is not None:  # nested: the outer block decides
        yield
        return
    _together = []
    try:
        yield
        landed: list[Path] = []
        for tmp_path, path, what in _together:
            try:
                os.replace(tmp_path, path)
            except OSError as exc:
                for done in landed:  # all or none
                    done.unlink(missing_ok=True)
                raise _write_failed(path, what, exc) from None
            landed.append(path)
    finally:
        for tmp_path, _, _ in _together:
            tmp_path.unlink(missing_ok=True)
        _together = None


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "the output") -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it over `path` only if the block succeeds
    (inside `written_together()`: at the end of that block).

    `what` says what is being written, for the one-line error when the system refuses the write.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if _together is not None:  # written twice in one block: the last one counts
            _together[:] = [entry for entry in _together if entry[1] != path]
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if _together is not None:
            _together.append((tmp_path, path, what))
            tmp_path = None  # written_together renames it, or removes it
        else:
            os.replace(tmp_path, path)
    except OSError as exc:
        raise _write_failed(path, what, exc) from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, what: str | None = None) -> None:
    with atomic_path(path, what or _size(len(data))) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    data = text.encode("utf-8")
    write_bytes(path, data, f"text ({_size(len(data))})")


def _first_non_finite(obj: Any, where: str = "") -> str | None:
    """The key path of the first NaN or infinity in `obj` ('heldout.pretrained.recall_retracement.point')."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return where or "the value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> None:
    """Sorted keys and a fixed float format keep the bytes identical between identical runs (sort_keys=False keeps
    the caller's order, as DVC shows a metrics file's keys in file order, which must then be fixed itself). JSON has no NaN or infinity (Python's json
    would write the invalid token `NaN`): an undefined number is written as null with its reason beside it, and
    one that slips through is refused here, in one line naming the key, with nothing written."""
    try:
        data = (json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n").encode("utf-8")
    except ValueError:
        key = _first_non_finite(obj)
        if key is None:
            raise
        raise OutputError(
            f"{path}: could not write JSON: {key} is not a finite number (JSON has no NaN or infinity; an "
            "undefined metric is written as null with its reason); nothing was written"
        ) from None
    write_bytes(path, data, f"JSON ({_size(len(data))})")


# A .npy array is followed by this prefix and the hex sha256 of every byte before it (header and data). np.load
# reads the header's shape and stops there, so the file stays a plain .npy for numpy; `npy_checksum_problem`
# checks it. The header cannot hold the checksum: numpy refuses unknown header keys.
NPY_TRAILER = b"MOOLA-SHA256:"
_NPY_TRAILER_LEN = len(NPY_TRAILER) + 64


class _HashingWriter:
    """A file object for np.save that hashes what passes through it (no second read of a large array)."""

    def __init__(self, fh):
        self.fh, self.sha256 = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.fh.write(data)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    what = f"a {array.dtype} array of shape {tuple(array.shape)} ({_size(array.nbytes)})"
    with atomic_path(path, what) as tmp:
        with open(tmp, "wb") as fh:
            writer = _HashingWriter(fh)
            np.save(writer, array, allow_pickle=False)
            fh.write(NPY_TRAILER + writer.sha256.hexdigest().encode("ascii"))


def npy_checksum_problem(path: str | os.PathLike) -> str | None:
    """None if the .npy file at `path` matches its sha256 trailer; otherwise what is wrong, in a few words."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size < _NPY_TRAILER_LEN:
            return "has no checksum trailer (too short)"
        fh.seek(size - _NPY_TRAILER_LEN)
        trailer = fh.read()
        if not trailer.startswith(NPY_TRAILER):
            return "has no checksum trailer (written by an older moola or another tool)"
        recorded = trailer[len(NPY_TRAILER) :].decode("ascii", "replace")
        fh.seek(0)
        sha256, left = hashlib.sha256(), size - _NPY_TRAILER_LEN
        while left:
            chunk = fh.read(min(left, 1 << 23))
            if not chunk:
                return "is shorter than it was written"
            sha256.update(chunk)
            left -= len(chunk)
    if sha256.hexdigest() != recorded:
        return f"fails its checksum (sha256 recorded {recorded[:12]}..., found {sha256.hexdigest()[:12]}...): damaged"
    return None


def _relative(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd())
        except ValueError:
            pass
    return path


def dvc_cache_object(path: str | os.PathLike) -> str:
    """The DVC cache file of the output at `path` as dvc.lock records it (stages run from the repository root),
    or a description where dvc.lock or the cache is not there."""
    import yaml

    want = _relative(path).as_posix()
    try:
        lock = yaml.safe_load(Path("dvc.lock").read_text()) or {}
        for entry in (lock.get("stages") or {}).values():
            for out in entry.get("outs", []) if isinstance(entry, dict) else []:
                md5 = out.get("md5") if isinstance(out, dict) else None
                if out.get("path") == want and isinstance(md5, str) and Path(".dvc/cache").is_dir():
                    return f".dvc/cache/files/md5/{md5[:2]}/{md5[2:]}"
    except (OSError, AttributeError, TypeError, yaml.YAMLError):
        pass
    return "its object in the DVC cache (files/md5/, named by its md5 in dvc.lock)"


def restore_advice(path: str | os.PathLike, stage: str) -> str:
    """How to get an intact copy of a damaged pipeline output back."""
    path = _relative(path)
    return (
        f"restore it with `dvc checkout --relink {path}`; if that brings the damage back, the cache copy is damaged "
        f"too: `rm -f {dvc_cache_object(path)}`, then `dvc pull {path}` or `dvc repro -f -s {stage}`"
    )


def write_parquet(path: str | os.PathLike, table) -> None:
    """Write a pyarrow Table or a pandas DataFrame atomically, with a CRC checksum on every data page."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path, f"a parquet table of {table.num_rows:,} rows") as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


def torch_bytes(obj: Any) -> bytes:
    """Serialise with torch.save into memory.

    Saving to a buffer (not to the temporary file) keeps the archive's inner folder name fixed, so identical
    tensors give identical bytes whatever the destination is called.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_torch(path: str | os.PathLike, obj: Any, what: str = "a torch checkpoint") -> None:
    data = torch_bytes(obj)
    write_bytes(path, data, f"{what} ({_size(len(data))})")
