"""What every `python -m training` command shares at its edge: the parser, option types, exit codes.

* `CommandParser`: argparse whose help states every option's default, and whose usage errors are one
  `error: ...` line (exit 2) instead of the usage block followed by the error.
* Option types (`number`, `existing_folder`, `existing_file`) that refuse a bad value at the parser, naming
  the option.
* `run_command`: a command's body with the exit codes of docs/training.md: an expected failure (`UsageError`,
  an algorithm error such as unreadable weights) is one `error: ...` line and exit 2; SIGINT / SIGTERM unwind
  (staged folders are cleaned up on the way) and exit 128 + the signal; anything else is a bug and keeps
  its traceback (exit 1).

Light on purpose (no torch): the light commands use it too.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

from algorithm import signals
from algorithm.errors import AlgorithmError, Interrupted

EXIT_USAGE = 2


class UsageError(ValueError):
    """Options or inputs that cannot be used: reported as one `error:` line, exit 2."""


class MissingInput(UsageError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default unless the text already says it.

    A flag gets "(default: off)", a list its items; an option whose default is None states in its own help
    what happens without it (a default of "None" says nothing); the others get "(default: X)".
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        if action.default is False and action.nargs == 0:
            default = "off"
        elif isinstance(action.default, (list, tuple)):
            default = " ".join(map(str, action.default)).replace("%", "%%")
        else:
            default = "%(default)s"
        return f"{text} (default: {default})".lstrip()


class CommandParser(argparse.ArgumentParser):
    """argparse with the training commands' conventions (defaults in the help, one-line usage errors)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def number(kind: type = int, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None) -> Callable[[str], int | float]:
    """An argparse type: a finite `kind` (int or float) no smaller than `minimum`, larger than `above`, no
    larger than `maximum`; anything else is a usage error that names the bound."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {value:g}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be more than {above:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {value:g}")
        return value
    parse.__name__ = kind.__name__
    return parse


def existing_folder(text: str) -> Path:
    """An argparse type: a folder that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {path}")
    return path


def existing_file(text: str) -> Path:
    """An argparse type: a file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def run_command(body: Callable[[], int]) -> int:
    """`body()` with the training commands' exit codes (module docstring); SIGTERM unwinds like Ctrl-C."""
    restore = signals.install()
    try:
        return body()
    except (UsageError, AlgorithmError) as error:
        print(f"error: {_line(str(error), error)}", file=sys.stderr)
        return EXIT_USAGE
    except (Interrupted, KeyboardInterrupt) as interrupted:
        signal_name = str(interrupted) if isinstance(interrupted, Interrupted) else "SIGINT"
        print(f"error: interrupted by {_line(signal_name, interrupted)}", file=sys.stderr)
        return getattr(interrupted, "exit_code", 130)
    finally:
        restore()


def _line(message: str, error: BaseException) -> str:
    """`message` and the error's notes (e.g. what a stopped run kept) on one line."""
    return "; ".join([message, *getattr(error, "__notes__", [])]).replace("\n", " ")
