"""Exceptions of the library: each carries a message a user can act on without a traceback.

The command-line entry points catch :class:`AutoAssignError` subclasses, print the message and
exit with :attr:`AutoAssignError.exit_code` (2 for configuration mistakes, 1 otherwise).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class AutoAssignError(Exception):
    """Base of every error the library raises on purpose (bad input, bad state)."""

    exit_code = 1


class ConfigError(AutoAssignError):
    """A configuration file or command-line override is wrong (unknown key, bad value)."""

    exit_code = 2


class CheckpointError(AutoAssignError):
    """A checkpoint file is missing, unreadable or does not hold what a checkpoint holds."""


class NonFiniteLossError(AutoAssignError):
    """A training loss became NaN or infinite."""

    def __init__(self, message: str, *, iteration: int, losses: dict[str, float]):
        super().__init__(message)
        self.iteration = iteration
        self.losses = losses


def user_error_exit_code(error: BaseException) -> int | None:
    """The exit status a CLI uses for ``error`` when it is a bad-input error, else None.

    Bad input is every :class:`AutoAssignError`; each package defines its own subclasses
    beside the code that raises them (``autoassign.data.errors.DatasetError``,
    ``autoassign.data.transforms.ImageLoadError``, ``autoassign.eval.base.EvaluationError``).
    """
    return error.exit_code if isinstance(error, AutoAssignError) else None


def run_cli(command: Callable[[], object]) -> int:
    """Run a command-line entry point's body; the exit status for ``sys.exit``.

    Bad input (see :func:`user_error_exit_code`) prints ``error: <message>`` on stderr with no
    traceback; Ctrl-C prints ``interrupted`` and returns 130; anything else is a bug and keeps
    its traceback.
    """
    try:
        command()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as error:
        code = user_error_exit_code(error)
        if code is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return code
    return 0
