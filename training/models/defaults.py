"""`python -m training inference-defaults`: the levers a checkpoint runs with unless the command line says
otherwise, written into the checkpoint itself, so that an exported model carries the settings it was
measured with (docs/levers.md).

    python -m training inference-defaults runs/s1/fetalclipseg.safetensors --out model.safetensors --tta flip
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from algorithm.config import CHECKPOINT_INFERENCE_CHOICES
from algorithm.model.checkpoint import write_inference_defaults
from training.cli import CommandParser, MissingInput, UsageError, run_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training inference-defaults", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="our checkpoint (.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write (may be the same file)")
    for name, choices in CHECKPOINT_INFERENCE_CHOICES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, choices=choices, default=None,
                            help=f"the checkpoint's default for the algorithm's --{name.replace('_', '-')} "
                                 "(default: keep the one it carries)")
    parser.add_argument("--clear", action="store_true", help="drop the defaults it carried before (default: keep)")
    args = parser.parse_args(argv)
    settings = {name: getattr(args, name) for name in CHECKPOINT_INFERENCE_CHOICES if getattr(args, name)}

    def run() -> int:
        if not args.checkpoint.is_file():
            raise MissingInput(f"no such checkpoint: {args.checkpoint}")
        if not settings and not args.clear:
            raise UsageError("nothing to set: give at least one of "
                             + ", ".join(f"--{n.replace('_', '-')}" for n in CHECKPOINT_INFERENCE_CHOICES))
        defaults = write_inference_defaults(args.checkpoint, args.out, settings, clear=args.clear)
        print(f"{args.out}: inference defaults {defaults or 'none (the algorithm defaults)'}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
