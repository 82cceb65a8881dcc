"""One case from a loaded model: read the input folder, predict, write the outputs, log the decision.

The CLI (one case per process) and every in-process runner that keeps the model loaded between cases call
these functions, so they all write the same bytes for the same case.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from .contract import EXTRAS_DIR, Stack, output_lock, read_stack, write_outputs
from .errors import DeviceUnavailable, WeightsError
from .inputs import case_image
from .options import InferenceOverrides
from .progress import SearchProgress
from .report import case_picture, title, write_png

log = logging.getLogger("algorithm")
__all__ = ["EXTRAS_DIR", "load", "output_lock", "peak_memory_gib", "predict_case", "process_case", "read_case",
           "read_image"]


def load(weights_path: Path, overrides: InferenceOverrides | None = None):
    """Load the network; every checkpoint failure is a WeightsError (exit 3) that names the file."""
    from .network import load_network
    from .runtime import DeviceError, runtime_line

    try:
        network, checkpoint = load_network(weights_path, overrides)
    except MemoryError:
        raise WeightsError(f"{weights_path}: not enough memory to load these weights") from None
    except DeviceError as error:  # e.g. --device cuda without a usable GPU, fp16 on the CPU
        raise DeviceUnavailable(str(error)) from None
    log.info("weights %s: %s", weights_path, checkpoint["provenance"])
    log.info("running on %s, batch %d", runtime_line(network.runtime), network.batch_size)
    if "not for clinical use" in checkpoint["provenance"].lower():
        log.warning("these are replica-trained demo weights, not for clinical use")
    return network, checkpoint


def peak_memory_gib() -> float:
    """This process's peak resident memory since it started the interpreter, in GiB.

    Linux's VmHWM belongs to the address space that exec created, so it does not include the parent's
    memory the way `ru_maxrss` does for a child forked from a large process (a test runner, a notebook);
    `ru_maxrss` is the fallback elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    scale = 2**30 if sys.platform == "darwin" else 2**20  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def process_case(network, checkpoint: dict, stack: Stack, output: Path, extras: bool = True,
                 progress: SearchProgress | None = None):
    """Predict one read stack and write its outputs (and, with `extras`, result.json and the picture).

    The CLI and the test-set benchmark's local runner both call this, so their outputs are the same bytes.
    Writing takes the output folder's lock (another run writing there is an OutputError, exit 4) and leaves
    nothing of an earlier run of ours beside this one's outputs; a caller that wants the folder for the
    whole case (the CLI does) holds `output_lock(output)` around it. Returns the `CaseResult` and the
    summary dict (its `timings_s` gains `write`).
    """
    from .predict import predict

    result = predict(stack.array, network, progress=progress)
    summary = {"input": str(stack.path), **result.summary(), "checkpoint": checkpoint,
               "device": str(network.device), "runtime": network.runtime}
    files = {}
    if extras:
        picture = case_picture(stack.array, result.frame, result.mask, result.ellipse,
                               result.scores.probabilities, result.scores.mask_fractions,
                               network.config.inference.sweeps, title(result.frame, summary["plane"], result.ac_mm))
        files[EXTRAS_DIR / "chosen_frame.png"] = lambda path: write_png(path, picture)
        files[EXTRAS_DIR / "result.json"] = lambda path: path.write_text(json.dumps(summary, indent=2) + "\n")
    write_start = time.perf_counter()
    write_outputs(output, stack, result.frame, result.mask, files)
    summary["timings_s"]["write"] = round(time.perf_counter() - write_start, 3)
    return result, summary


def read_case(input_path: Path) -> tuple[Stack, float]:
    """The stack of a case folder (or of an image file), and the seconds its reading took."""
    return read_image(case_image(input_path))


def read_image(image_path: Path) -> tuple[Stack, float]:
    """One image's stack, and the seconds its reading took."""
    started = time.perf_counter()
    stack = read_stack(image_path)
    seconds = time.perf_counter() - started
    log.info("input %s: %d frames of %d x %d%s", image_path, *stack.shape,
             f" ({stack.note})" if stack.note else "")
    return stack, seconds


def predict_case(network, checkpoint: dict, stack: Stack, output: Path, extras: bool = True,
                 progress: SearchProgress | None = None, timings: dict[str, float] | None = None,
                 started: float | None = None) -> dict:
    """`process_case`, then the log lines people read; `timings` (e.g. the read) join the summary's, and
    `started` (a perf_counter value) sets where the total is counted from. Returns the summary."""
    started = time.perf_counter() if started is None else started
    result, summary = process_case(network, checkpoint, stack, output, extras=extras, progress=progress)
    summary["timings_s"].update({name: round(seconds, 3) for name, seconds in (timings or {}).items()})
    summary["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    for candidate in result.selection.candidates:
        log.info("sweep %d: best frame %d (tier %d, score %.3f, mask %.1f %%)", candidate.sweep + 1,
                 candidate.frame, candidate.tier, candidate.score, 100 * candidate.mask_fraction)
    ac = f"{result.ac_mm:.1f} mm" if result.ac_mm else "n/a"
    log.info("chosen frame %d (%s), AC %s, %d/%d frames encoded, %.1f s, peak memory %.2f GiB", result.frame,
             summary["plane"], ac, result.frames_encoded, len(stack.array), summary["timings_s"]["total"],
             peak_memory_gib())
    if extras:
        log.info("picture: %s", output / EXTRAS_DIR / "chosen_frame.png")
    return summary
