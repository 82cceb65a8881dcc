"""The algorithm's command-line options, declared once.

`add_weights_option` and `add_inference_options` put them on a parser; `inference_overrides` turns the
parsed arguments into the `InferenceConfig` settings they change. The CLI (`python -m algorithm`), the invoke
server (`python -m algorithm.serve`) and the dev tools that run the algorithm (`python -m training speed`,
`python -m training benchmark`) use them, so an option means the same everywhere. Numbers are checked
here: a bad value is argparse's one-line error naming the option, before any model is loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TypedDict

from .config import AC_FITS, DEVICES, MASK_OUTPUTS, PRECISIONS, SELECTION_RULES, TTA_MODES, InferenceConfig
from .contract import EXTRAS_DIR
from .weights_location import MODEL_MOUNT

_DEFAULTS = InferenceConfig()


class InferenceOverrides(TypedDict, total=False):
    """The `InferenceConfig` settings a command line can change (`Config.replace(**overrides)`)."""

    device: str
    precision: str
    batch_size: int
    coarse_stride: int
    lazy_decoder: str
    threads: int
    compile: bool
    tta: str
    selection: str
    ac_fit: str
    mask_output: str


def positive_or_auto(text: str) -> int:
    """A positive integer, or `auto` (0: the configuration's automatic choice)."""
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def add_weights_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str | None = None) -> None:
    parser.add_argument("--weights", type=Path, default=None, metavar="FILE_OR_FOLDER", help=help or (
        f"checkpoint (.safetensors) or a folder holding one (default: the one in {MODEL_MOUNT}/ when that "
        "folder exists, else the bundled demo weights, with a warning)"))


def add_inference_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, tuning: bool = False) -> None:
    """--device, --precision, --batch-size, --coarse-stride and the levers --tta, --selection, --ac-fit,
    --mask-output; with
    `tuning`, also the speed switches --lazy-decoder, --threads and --compile (the speed benchmark's)."""
    parser.add_argument("--device", default="auto", choices=DEVICES, help=(
        "where the network runs (default auto: the GPU when torch can use it; when a GPU is visible but "
        "unusable, the CPU, with a WARNING naming the reason)"))
    parser.add_argument("--precision", default=None, choices=PRECISIONS, help=(
        "number format of the network (default auto: fp16 on GPUs below compute capability 8.0 such as a T4, "
        "bf16 from 8.0 and on CPUs with bf16 units, fp32 elsewhere)"))
    parser.add_argument("--batch-size", type=positive_or_auto, default=None, metavar="N", help=(
        f"frames per forward pass, a positive integer or auto (default auto: what the free GPU memory "
        f"holds, at most {_DEFAULTS.max_batch_size}; {_DEFAULTS.cpu_batch_size} on the CPU)"))
    parser.add_argument("--coarse-stride", type=positive_or_auto, default=None, metavar="K", help=(
        f"encode every K-th frame of each sweep, then refine around the best (1 = every frame), or auto "
        f"(default auto: {_DEFAULTS.cpu_coarse_stride} for encoders at least {_DEFAULTS.cpu_coarse_min_width} "
        "wide (ViT-L) on the CPU, every frame otherwise)"))
    parser.add_argument("--tta", default=None, choices=TTA_MODES, help=(
        "test-time augmentation on the frames that can be chosen: flip also runs their mirror image and "
        f"averages the probabilities (default: the checkpoint's, else {_DEFAULTS.tta}: flip on CUDA, none on "
        "the CPU; docs/levers.md)"))
    parser.add_argument("--selection", default=None, choices=SELECTION_RULES, help=(
        "frame: the best frame of the case; sweep: the sweep with the most qualifying frames, then its best "
        f"frame (default: the checkpoint's, else {_DEFAULTS.selection})"))
    parser.add_argument("--ac-fit", default=None, choices=AC_FITS, help=(
        "contour: the ellipse fitted to the mask's pixel outline; subpixel: to the probability's 0.5 iso-line "
        f"at frame resolution (default: the checkpoint's, else {_DEFAULTS.ac_fit})"))
    parser.add_argument("--mask-output", default=None, choices=MASK_OUTPUTS, help=(
        "what the segmentation holds on the chosen frame: the cleaned mask, or the fitted ellipse filled inside "
        f"the field of view (default: the checkpoint's, else {_DEFAULTS.mask_output})"))
    if not tuning:
        return
    parser.add_argument("--lazy-decoder", default=None, choices=["auto", "on", "off"], help=(
        "run the mask decoder only on frames that can be chosen (default auto: on)"))
    parser.add_argument("--threads", type=positive_or_auto, default=None, metavar="N",
                        help="torch CPU threads, or auto (default auto: torch's own, one per physical core)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the encoder and decoder (default off: minutes of warm-up)")


def add_output_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--no-extras and --quiet: what a run writes besides the two grand-challenge outputs, and what it logs."""
    parser.add_argument("--no-extras", action="store_true", help=(
        f"write only the two output sockets, not {EXTRAS_DIR}/result.json and the PNG (default: write them)"))
    parser.add_argument("--quiet", action="store_true", help=(
        "warnings and errors only (default: also the network's progress, a bar on a terminal or a line per "
        "pass of the frame search elsewhere, and the decision)"))


def inference_overrides(args: argparse.Namespace) -> InferenceOverrides:
    """The settings the parsed arguments change; options not given (or not declared) change nothing."""
    given = {name: getattr(args, name, None) for name in InferenceOverrides.__annotations__}
    return InferenceOverrides(**{name: value for name, value in given.items() if value is not None})


def program_name(module_form: str) -> str:
    """What the user typed: the console script's name (fetalclipseg, fetalclipseg-serve) when installed, else
    the `python -m` form, so that usage lines and --version name the command that was run."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("fetalclipseg") else module_form
