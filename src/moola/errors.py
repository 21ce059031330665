"""One error type for everything a user can get wrong, and the wrapper that turns it into one line and exit 2."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class MoolaError(Exception):
    """A user-facing failure: the message is one line naming the file, the field and what was expected."""


class ParamsError(MoolaError):
    pass


class DataError(MoolaError):
    pass


class CheckpointError(MoolaError):
    pass


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose weights fail (or lack) their checksum: never a reason to pick another one silently."""


class TrainingDiverged(MoolaError):
    pass


class OutputError(MoolaError):
    """An output could not be written (disk full, read-only folder, quota): names the path and what it was."""


EXIT_USER_ERROR = 2


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's main: a MoolaError becomes `error: <one line>` on stderr and exit code 2."""
    try:
        main()
    except MoolaError as exc:
        fail(" ".join(str(exc).split()))
    except OSError as exc:
        # moola.io already names what it was writing; this catches the rest (a read that the OS refused, ...).
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or type(exc).__name__} (errno {exc.errno}; {type(exc).__name__})")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130)
