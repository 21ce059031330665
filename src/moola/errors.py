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


class TrainingDiverged(MoolaError):
    pass


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130)
