"""`python -m training <command>`: one dispatcher for every dev command, each command's own options behind it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from training.__main__ import COMMANDS, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_answers_help_under_its_dispatcher_name(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"python -m training {command}" in capsys.readouterr().out


def test_help_lists_every_command_with_one_line():
    done = subprocess.run([sys.executable, "-m", "training", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS)


def test_unknown_command_is_an_error_that_names_it(capsys):
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
