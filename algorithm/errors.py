"""Errors that end a run with a documented exit code and a one-line message (see README, "Exit codes")."""
from __future__ import annotations


class AlgorithmError(Exception):
    """Base of the errors the CLI reports as one line; `exit_code` is what the process returns."""

    exit_code = 1


class InputError(AlgorithmError):
    """The input folder or image cannot be used (missing, ambiguous, corrupt, wrong shape)."""

    exit_code = 2


class WeightsError(AlgorithmError):
    """The model weights are missing, corrupt or of the wrong format."""

    exit_code = 3


class OutputError(AlgorithmError):
    """The output folder cannot be written."""

    exit_code = 4
