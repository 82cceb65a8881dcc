"""Errors that end a run with a documented exit code and a one-line message (see README, "Exit codes")."""
from __future__ import annotations

import signal


class AlgorithmError(Exception):
    """Base of the errors the CLI reports as one line; `exit_code` is what the process returns."""

    exit_code = 1


class InputError(AlgorithmError):
    """The input folder or image cannot be used (missing, ambiguous, corrupt, wrong shape, over a cap)."""

    exit_code = 2


class WeightsError(AlgorithmError, ValueError):
    """Weights that are missing, unreadable, corrupt or do not fit: our checkpoints and FetalCLIP's alike.

    Also a ValueError, so callers that treat bad files as bad values keep catching it.
    """

    exit_code = 3


class OutputError(AlgorithmError):
    """The output folder cannot be written, or another run is writing into it."""

    exit_code = 4


class DeviceUnavailable(AlgorithmError):
    """The device or precision asked for cannot be had here (`--device cuda` without a usable GPU, fp16 on the CPU)."""

    exit_code = 5


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: unwind (staged outputs are removed) and exit with 128 + the signal number.

    A BaseException, like KeyboardInterrupt, so `except Exception` blocks on the way up do not swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
