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


RECIPE_ARGV = ["--config", "small", "--epochs", "3", "--batch-size", "4", "--lr", "0.002", "--seed", "7",
               "--negatives-per-positive", "0.5", "--val-max-frames", "20", "--threads", "1", "--max-steps", "9"]


def test_train_and_reproduce_read_the_recipe_options_the_same_way(tmp_path):
    from training.params import recipe_from_args, train_parser
    from training.run.recipes import reproduce_parser

    (tmp_path / "manifest.json").write_text("{}")  # --prepared must be a prepared folder
    train_args = train_parser().parse_args(["--prepared", str(tmp_path), "--out", str(tmp_path), *RECIPE_ARGV])
    reproduce_args = reproduce_parser().parse_args(["--data", str(tmp_path), "--out", str(tmp_path), *RECIPE_ARGV])
    recipe, reproduced = recipe_from_args(train_args), recipe_from_args(reproduce_args)
    assert (recipe.pop("trials"), reproduced.pop("trials")) == (1, 5)  # reproduce: the paper's five trials
    assert recipe == reproduced
    chosen = (recipe["epochs"], recipe["batch_size"], recipe["lr"], recipe["negatives_per_positive"])
    assert chosen == (3, 4, 0.002, 0.5)


def test_demo_weights_shares_the_schedule_options_with_its_own_defaults(tmp_path):
    from training.params import TrainConfig, sampling_from_args, schedule_from_args
    from training.run.recipes import demo_weights_parser

    defaults = demo_weights_parser().parse_args([])
    assert schedule_from_args(defaults) == dict(epochs=42, batch_size=8, lr=1e-3, warmup_steps=50, threads=1,
                                                seed=2025, resume=False, max_steps=None)
    assert sampling_from_args(defaults) == dict(negatives_per_positive=0.75, head_negatives_per_positive=4.0,
                                                val_max_frames=160)
    chosen = demo_weights_parser().parse_args(["--epochs", "2", "--max-steps", "5", "--resume"])
    cfg = TrainConfig(prepared=tmp_path, out=tmp_path, **schedule_from_args(chosen), **sampling_from_args(chosen))
    assert (cfg.epochs, cfg.max_steps, cfg.resume, cfg.batch_size) == (2, 5, True, 8)
