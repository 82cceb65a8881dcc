"""`python -m training ensemble`: several trained networks -> one ensemble checkpoint the algorithm runs.

    python -m training ensemble runs/paper --out paper5.safetensors          # the trials of one run
    python -m training ensemble runs/s1 runs/s2 runs/s3 --out fixed3.safetensors

A run folder with several trials (`--trials`, or `reproduce`'s) gives every trial's checkpoint; any other run
folder its `fetalclipseg.safetensors`; a `.safetensors` file itself. When the members' encoders are the same
after LoRA merging (`paper` mode: the frozen FetalCLIP) the file holds the encoder once and a frame costs one
encoder pass plus one decoder pass per member; otherwise every member is whole (docs/levers.md has what each
costs and what it did to the score).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from algorithm.model.checkpoint import load_checkpoint
from algorithm.model.ensemble import MAX_ENSEMBLE_MEMBERS, save_ensemble
from training.cli import CommandParser, MissingInput, UsageError, run_command
from training.run.train import CHECKPOINT_NAME

LAYOUTS = ("auto", "shared", "whole")
ENSEMBLE_NAME = "ensemble.safetensors"  # what `reproduce` writes in a mode's run folder


def member_checkpoints(source: Path) -> list[Path]:
    """The checkpoints one command-line source stands for (module docstring)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise MissingInput(f"no such run folder or checkpoint: {source}")
    trials = sorted(source.glob(f"trial_*/{CHECKPOINT_NAME}"))
    if len(trials) > 1:
        return trials
    if (source / CHECKPOINT_NAME).is_file():
        return [source / CHECKPOINT_NAME]
    raise MissingInput(f"{source} holds no {CHECKPOINT_NAME} (a finished run folder, or one of its trial_* folders)")


def build_ensemble(sources: Sequence[Path], out: Path, layout: str = "auto") -> dict:
    """Load, merge and check the members, write the ensemble; returns what was written."""
    paths = [path for source in sources for path in member_checkpoints(source)]
    if len(set(map(Path.resolve, paths))) != len(paths):
        raise UsageError("a checkpoint is named twice: " + ", ".join(map(str, paths)))
    if not 2 <= len(paths) <= MAX_ENSEMBLE_MEMBERS:
        raise UsageError(f"an ensemble takes 2 to {MAX_ENSEMBLE_MEMBERS} checkpoints, got {len(paths)}")
    members, infos = [], []
    for path in paths:
        model, info = load_checkpoint(path, device="cpu")
        if info.config.decoder == "none" or info.config.frame_classes != 3:
            raise UsageError(f"{path} is a frame classifier: an ensemble member needs a mask decoder and three "
                             "frame classes")
        model.merge_lora()
        members.append(model)
        infos.append(info)
        print(f"member {len(members)}: {path} ({info.provenance[:80]})", flush=True)
    if any(member.config != members[0].config for member in members):
        raise UsageError("the checkpoints have different architectures (ModelConfig); an ensemble needs one")
    defaults = [info.inference_defaults for info in infos]
    extra = {"ensemble_of": [str(path) for path in paths]}
    if all(d == defaults[0] for d in defaults) and defaults[0]:
        extra["inference"] = defaults[0]
    provenances = list(dict.fromkeys(info.provenance for info in infos))
    provenance = f"ensemble of {len(paths)}: " + " | ".join(provenances)
    try:
        written = save_ensemble(out, members, provenance, extra=extra, preprocessing=infos[0].preprocessing,
                                shared_encoder={"auto": None, "shared": True, "whole": False}[layout])
    except ValueError as error:
        raise UsageError(str(error)) from None
    return {"out": str(out), "members": written.members, "shared_encoder": written.shared_encoder,
            "encoder_passes_per_frame": 1 if written.shared_encoder else written.members,
            "decoder_passes_per_frame": written.members, "bytes": out.stat().st_size}


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m training ensemble", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("sources", type=Path, nargs="+", help="run folders or checkpoints (.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="the ensemble checkpoint to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="shared: one encoder (refused when the members' encoders differ); whole: every "
                             "member whole; auto: shared exactly when the encoders are the same")
    args = parser.parse_args(argv)

    def run() -> int:
        written = build_ensemble(args.sources, args.out, args.layout)
        kind = "one shared encoder" if written["shared_encoder"] else "whole members"
        print(f"{written['out']}: {written['members']} members, {kind}; per frame {written['encoder_passes_per_frame']}"
              f" encoder and {written['decoder_passes_per_frame']} decoder passes; {written['bytes'] / 2**20:.1f} MiB")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
