"""`python -m training <command> [options]`: every dev command in one entry point.

Each command is its module's `main(argv)`, imported only when asked for, so `--help` and the light commands
start without torch. `python -m training <command> --help` lists a command's options. `train` and
`reproduce` also run under torchrun.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from algorithm import __version__  # a string only: no torch

# command -> ("module:function", one line for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "replica": ("training.data.replica:main", "write replica cases in the public release layout"),
    "prepare": ("training.data.prepare:main", "release layout -> per-split 224 x 224 frames, masks, labels"),
    "train": ("training.run.train:main", "train one mode on prepared frames -> a checkpoint"),
    "evaluate": ("training.scoring.evaluate:main", "score algorithm outputs against a release-layout folder"),
    "evaluate-frames": ("training.scoring.evaluate_frames:main", "the paper's frame-level table on a prepared split"),
    "threshold-sweep": ("training.scoring.threshold_sweep:main", "frame decisions of the mask-size rule per threshold"),
    "ellipse-study": ("training.scoring.ellipse_study:main", "AC ellipse fits on abdomens cut by the field of view"),
    "reproduce": ("training.run.recipes:reproduce_main", "prepare -> train every mode -> tables -> challenge score"),
    "demo-weights": ("training.run.recipes:demo_weights_main", "train the bundled small replica weights on the CPU"),
    "levers": ("training.speed.levers:main", "TTA, selection rule, AC fit: paired on whole cases, with cost"),
    "compare": ("training.scoring.compare:main", "several reproduce runs side by side, paired per test case"),
    "ensemble": ("training.run.ensemble:main", "several trained networks -> one ensemble checkpoint"),
    "inference-defaults": ("training.models.defaults:main", "the levers a checkpoint runs with, written into it"),
    "params": ("training.models.build:params_main", "trainable parameters of every mode beside the paper's"),
    "memory": ("training.run.memory:main", "measure a training step; the set-up that fits a memory budget"),
    "benchmark": ("training.benchmark.__main__:main", "run a test set (local, docker, grand-challenge), score it"),
    "speed": ("training.speed.bench:main", "case-level speed of the pipeline against the paper-style reference"),
    "demo": ("training.demo:main", "generate one replica case and run the algorithm on it"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m training <command> [options]", "",
             "The dev side: data, training, evaluation, benchmarks.", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_line}" for name, (_, help_line) in COMMANDS.items()]
    lines += ["", "python -m training <command> --help shows a command's options; --version the version."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        script = sys.argv[0].rsplit("/", 1)[-1]  # the console script's name when installed, as --version names it
        print(f"{script if script.startswith('fetalclipseg') else 'python -m training'} {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {command!r}", file=sys.stderr)
        return 2
    module, function = COMMANDS[command][0].split(":")
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    sys.exit(main())
