"""`python tools/gpu_check.py`: verify the GPU path of `python -m algorithm` in one command; exit 1 if any check fails.

    python tools/gpu_check.py --json build/gpu_check.json              # on a CUDA machine: every section
    python tools/gpu_check.py --device cpu --quick --json F            # what needs no GPU (CI runs this)
    python tools/gpu_check.py --device cpu --json F                    # everything the CPU allows (minutes)

Sections, each a row group of the printed table and a key of the JSON (`checks` holds name -> true/false):

* policy: the precision `runtime.choose_precision` picks for compute capabilities 7.5 (T4), 8.0, 9.0.
* correctness: the bundled weights on a generated replica case (840 frames; 144 with --quick), CPU fp32 dense
  scan against CUDA at the default precision, CUDA forced fp16 and CUDA forced bf16 (on the CPU: CPU bf16):
  same chosen frame, max |delta| of frame probabilities and mask fractions, Dice of the final masks (>= 0.99),
  |delta AC| (<= 0.5 mm); fp16 against bf16 masks.
* full_size: a randomly initialised FetalCLIP-shaped ViT-L/14 on 32 frames, GPU against CPU fp32: relative
  error of what the prepared network's `encode` and `decode` return (each skip feature, the frame
  probabilities, the abdomen probabilities), no inf / NaN, the largest activation magnitude against the fp16
  range.
* speed: one cold case as a grand-challenge job pays it (`python -m algorithm` from process start to outputs
  written, random ViT-L checkpoint), warm cases in one process (time per stage), encoder TFLOP/s against the
  peak of a large matmul of the same precision measured in the same run, peak GPU memory.
* t4_like: fp16 forced, GPU memory capped at 15 GB, automatic batch size: no out-of-memory, time per case,
  and an estimate of a T4's time (labelled as such).

On a bare GPU machine (Python 3.12 and its own torch, torchvision, numpy, scipy, opencv, rich, peft...,
but no open_clip, SimpleITK or project .venv): download the missing wheels here once (git-ignored `.whl/`),

    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 SimpleITK==2.5.7 peft==0.21.2

then, there, from the repository root (`.whl` carried along):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --site /tmp/site --json OUT/gpu_check.json

`--site` appends the folder to the module search path (of this process and of the algorithm it starts), so
packages the machine has win and the wheels only fill gaps (peft is there only for machines without one).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]

POLICY_CAPABILITIES = {"7.5": (7, 5), "8.0": (8, 0), "9.0": (9, 0)}
EXPECTED_POLICY = {"7.5": "fp16", "8.0": "bf16", "9.0": "bf16"}
DICE_MIN = 0.99
AC_MAX_MM = 0.5
# Relative error (Frobenius) of the full-size network's outputs against CPU fp32, per precision: fp16 keeps
# 11 significant bits, bf16 8, so their errors after 24 blocks differ by about that factor.
REL_ERROR_MAX = {"fp32": 1e-3, "fp16": 0.02, "bf16": 0.1}
FP16_MAX = 65504.0
T4_MEMORY_BYTES = 15e9  # the T4-like run's cap (a T4 has 16 GB, about 15 usable)
T4_PEAK_TFLOPS = 65.0  # a T4's nominal dense fp16 tensor-core peak


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="only what needs no GPU, on a short case (policy, CPU side of correctness)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--seed", type=int, default=5000, help="replica case seed")
    parser.add_argument("--frames-per-sweep", type=int, default=None,
                        help="replica case size, 6 sweeps (default 140, the challenge's; 24 with --quick)")
    parser.add_argument("--full-frames", type=int, default=32, help="frames of the full-size comparison")
    parser.add_argument("--warm-cases", type=int, default=3, help="warm cases timed in one process")
    parser.add_argument("--site", type=Path, default=None,
                        help="extra package folder appended to the module search path (wheels on a bare machine)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ the report

class Report:
    """Figures and pass/fail checks by section; a section that raises is recorded, not fatal."""

    def __init__(self, device: str, mode: str):
        self.data: dict[str, Any] = {"device": device, "mode": mode, "policy": {}, "checks": {}, "errors": {},
                                     "seconds": {}}

    def check(self, name: str, ok: bool) -> bool:
        self.data["checks"][name] = bool(ok)
        return bool(ok)

    @contextmanager
    def section(self, name: str) -> Iterator[dict]:
        figures = self.data.setdefault(name, {})
        started = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            yield figures
        except Exception as error:  # recorded as a failed check, the other sections still run
            self.data["errors"][name] = "".join(traceback.format_exception_only(type(error), error)).strip()
            self.check(f"{name}_ran", False)
            traceback.print_exc()
        finally:
            self.data["seconds"][name] = round(time.perf_counter() - started, 1)
            print(f"{name} ({self.data['seconds'][name]} s): {json.dumps(rounded(figures), default=str)[:3000]}",
                  flush=True)

    @property
    def passed(self) -> bool:
        return bool(self.data["checks"]) and all(self.data["checks"].values())


def rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return value if not math.isfinite(value) else round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


# ------------------------------------------------------------------------------------------ helpers

def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def make_case(seed: int, frames_per_sweep: int):
    from training.data.replica import generate_case

    return generate_case(seed, frames_per_sweep=frames_per_sweep)


def bundled_weights() -> Path:
    found = sorted((REPO / "algorithm" / "weights").glob("*.safetensors"))
    if not found:
        raise FileNotFoundError("no bundled weights in algorithm/weights/")
    return found[0]


def network_for(weights: Path, device: str, **settings):
    import torch

    from algorithm.config import Config
    from algorithm.model.checkpoint import load_checkpoint
    from algorithm.network import Network

    model, info = load_checkpoint(weights, device="cpu")
    return Network(model, Config(model=info.config).replace(device=device, **settings), torch.device(device))


def dice(a, b) -> float:
    import numpy as np

    a = np.zeros(1, bool) if a is None else np.asarray(a) > 0
    b = np.zeros(1, bool) if b is None else np.asarray(b) > 0
    if a.shape != b.shape:
        return 0.0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def compare_cases(result, reference) -> dict:
    """Agreement of two CaseResults of the same stack."""
    import numpy as np

    both = result.scores.scored & reference.scores.scored
    delta_p = np.abs(result.scores.probabilities[both] - reference.scores.probabilities[both])
    decoded = result.scores.decoded & reference.scores.decoded
    delta_m = np.abs(result.scores.mask_fractions[decoded] - reference.scores.mask_fractions[decoded])
    if result.ac_mm is None and reference.ac_mm is None:
        delta_ac = 0.0
    elif result.ac_mm is None or reference.ac_mm is None:
        delta_ac = math.inf
    else:
        delta_ac = abs(result.ac_mm - reference.ac_mm)
    return {"frame": result.frame, "reference_frame": reference.frame, "same_frame": result.frame == reference.frame,
            "max_abs_delta_probability": float(delta_p.max()) if delta_p.size else 0.0,
            "max_abs_delta_mask_fraction": float(delta_m.max()) if delta_m.size else 0.0,
            "frames_compared": int(both.sum()), "masks_compared": int(decoded.sum()),
            "dice": dice(result.mask, reference.mask), "ac_mm": result.ac_mm, "abs_delta_ac_mm": delta_ac}


def relative_error(value, reference) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def matmul_peak_tflops(device, dtype, size: int, repeats: int) -> float:
    """Dense matmul throughput of `dtype` on `device` (the same run's peak, for the fraction of peak)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


# ------------------------------------------------------------------------------------------ sections

def environment() -> dict:
    import torch

    from algorithm.runtime import describe_runtime, nvidia_driver_version

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "driver": nvidia_driver_version(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(describe_runtime(torch.device("cuda"), "auto"))
    return info


def policy_section(report: Report) -> None:
    from algorithm.runtime import choose_precision

    with report.section("policy_figures"):
        policy = {name: choose_precision("auto", "cuda", capability=cap) for name, cap in POLICY_CAPABILITIES.items()}
        report.data["policy"] = policy
        report.check("policy", policy == EXPECTED_POLICY)


def correctness(report: Report, device: str, quick: bool, seed: int, frames_per_sweep: int):
    """Returns the case (its stack is reused by the later sections)."""
    import numpy as np

    from algorithm.predict import predict

    case = None
    with report.section("correctness") as figures:
        case = make_case(seed, frames_per_sweep)
        stack = case.image
        figures["case"] = {"seed": seed, "frames": int(len(stack)), "weights": bundled_weights().name}
        # The reference decodes every frame (all mask fractions compared); --quick keeps the lazy decoder
        # (same chosen frame by construction) to stay within minutes on a small CPU.
        # Both sides without test-time flip (auto would flip on CUDA only): this section compares precisions.
        reference = predict(stack, network_for(bundled_weights(), "cpu", precision="fp32", coarse_stride=1,
                                               lazy_decoder="auto" if quick else "off", tta="none"))
        finite = np.isfinite(reference.scores.probabilities[reference.scores.scored]).all() and \
            np.isfinite(reference.scores.mask_fractions[reference.scores.decoded]).all()
        report.check("cpu_reference_finite", finite)
        figures["cpu_fp32"] = {"frame": reference.frame, "ac_mm": reference.ac_mm,
                               "frames_encoded": reference.frames_encoded}
        if device == "cpu":
            runs = {"cpu_bf16": ("cpu", "bf16")}
        else:
            runs = {"cuda_default": ("cuda", "auto"), "cuda_fp16": ("cuda", "fp16"), "cuda_bf16": ("cuda", "bf16")}
        results = {}
        for name, (where, precision) in runs.items():
            network = network_for(bundled_weights(), where, precision=precision, coarse_stride=1, tta="none")
            started = time.perf_counter()
            results[name] = predict(stack, network)
            row = compare_cases(results[name], reference)
            row.update(precision=network.precision, batch_size=network.batch_size,
                       seconds=round(time.perf_counter() - started, 2))
            figures[name] = row
            report.check(f"{name}_same_frame", row["same_frame"])
            report.check(f"{name}_dice", row["dice"] >= DICE_MIN)
            report.check(f"{name}_ac", row["abs_delta_ac_mm"] <= AC_MAX_MM)
            del network
        if "cuda_fp16" in results:
            figures["fp16_vs_bf16_dice"] = dice(results["cuda_fp16"].mask, results["cuda_bf16"].mask)
            report.check("fp16_vs_bf16_dice", figures["fp16_vs_bf16_dice"] >= DICE_MIN)
    return case


def network_outputs(network, inputs, activation_peak: dict):
    """Skip features, frame probabilities and abdomen probabilities of a prepared network (what the frame
    search receives from its `encode` and `decode`), and the largest |activation| of any encoder module
    output (forward hooks)."""
    import torch

    def record(_module, _args, output):
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            activation_peak["max_abs"] = max(activation_peak.get("max_abs", 0.0), float(tensor.abs().max()))

    handles = [m.register_forward_hook(record) for m in network.model.encoder.visual.modules()]
    try:
        features, frame_probabilities = network.encode(inputs)
        abdomen, _ = network.decode(inputs, features)
        sync(network.device)
    finally:
        for handle in handles:
            handle.remove()
    return [f.float().cpu() for f in features], frame_probabilities.float().cpu(), abdomen.float().cpu()


def full_size(report: Report, device: str, stack, frames: int) -> dict:
    """Returns FLOPs per frame of the full model (for the speed section)."""
    import numpy as np
    import torch

    from training.speed import count_flops
    from algorithm.config import Config, ModelConfig
    from algorithm.model.fetalclipseg import build_model
    from algorithm.network import Network
    from algorithm.search import FrameSearch

    flops: dict = {}
    with report.section("full_size") as figures:
        torch.manual_seed(0)
        model = build_model(ModelConfig())
        model.merge_lora()
        model.eval().requires_grad_(False)
        flops = count_flops(model, model.config, torch.device("cpu"))
        figures["gflop_per_frame"] = {k: round(v, 2) for k, v in flops.items()}
        config = Config(model=model.config)
        usable = FrameSearch(config.inference).frames_to_encode(stack)
        chosen = usable[np.linspace(0, len(usable) - 1, frames).round().astype(int)]
        frames_chosen = torch.from_numpy(np.ascontiguousarray(stack[chosen]))
        reference_peak: dict = {}
        # fp32 on the CPU leaves the (merged, frozen) model's weights as they are: later copies are pristine
        cpu_network = Network(model, config.replace(device="cpu", precision="fp32", batch_size=frames,
                                                     lazy_decoder="off"), torch.device("cpu"))
        inputs = cpu_network.preprocess(frames_chosen)
        reference = [network_outputs(cpu_network, inputs[i:i + 8], reference_peak) for i in range(0, frames, 8)]
        del cpu_network
        ref_features = [torch.cat([r[0][k] for r in reference]) for k in range(4)]
        ref_frame, ref_mask = torch.cat([r[1] for r in reference]), torch.cat([r[2] for r in reference])
        figures["frames"] = frames
        figures["cpu_fp32_max_abs_activation"] = reference_peak.get("max_abs")
        figures["cpu_fp32_activation_vs_fp16_max"] = reference_peak.get("max_abs", 0.0) / FP16_MAX
        report.check("full_fp32_activations_fit_fp16", reference_peak.get("max_abs", math.inf) < FP16_MAX)
        precisions = ["bf16"] if device == "cpu" else sorted({"fp16", auto_precision(device)})
        for precision in precisions:
            peak: dict = {}
            network = Network(copy.deepcopy(model), config.replace(
                device=device, precision=precision, batch_size=frames, lazy_decoder="off"), torch.device(device))
            features, frame_probabilities, abdomen = network_outputs(network, network.preprocess(frames_chosen), peak)
            errors = {"frame_probabilities": relative_error(frame_probabilities, ref_frame),
                      "abdomen_probability": relative_error(abdomen, ref_mask),
                      **{f"skip_{layer}": relative_error(f, r) for layer, f, r in
                         zip(model.config.skip_layers, features, ref_features)}}
            finite = all(torch.isfinite(t).all() for t in (*features, frame_probabilities, abdomen))
            name = f"{device}_{precision}"
            figures[name] = {"relative_error": errors, "finite": bool(finite), "max_abs_activation": peak.get("max_abs"),
                             "activation_vs_fp16_max": peak.get("max_abs", 0.0) / FP16_MAX}
            report.check(f"full_{name}_finite", finite)
            report.check(f"full_{name}_relative_error", max(errors.values()) <= REL_ERROR_MAX[precision])
            del network
            gc.collect()
    return flops


def auto_precision(device: str) -> str:
    from algorithm.runtime import choose_precision

    return choose_precision("auto", device)


def write_case(stack, folder: Path) -> Path:
    import SimpleITK as sitk

    from algorithm.contract import INPUT_FOLDER

    (folder / INPUT_FOLDER).mkdir(parents=True, exist_ok=True)
    from algorithm.config import STACK_SPACING_MM

    image = sitk.GetImageFromArray(stack)
    image.SetSpacing(STACK_SPACING_MM)
    sitk.WriteImage(image, str(folder / INPUT_FOLDER / "case.mha"), useCompression=True)
    return folder


def algorithm_command(site: Path | None) -> list[str]:
    """`python -m algorithm`, with `site` appended to its module search path when given."""
    if site is None:
        return [sys.executable, "-m", "algorithm"]
    return [sys.executable, "-c", f"import sys, runpy; sys.path.append({str(site)!r}); "
            "runpy.run_module('algorithm', run_name='__main__', alter_sys=True)"]


def case_timings(network, stack, repeats: int, search=None) -> list[dict]:
    import torch

    from algorithm.predict import predict

    runs = []
    for _ in range(repeats):
        if network.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(network.device)
        started = time.perf_counter()
        result = predict(stack, network, search)
        wall = time.perf_counter() - started
        row = {"wall_s": wall, "frame": result.frame, "frames_encoded": result.frames_encoded,
               "frames_decoded": result.frames_decoded, "stages_s": dict(result.timings)}
        if network.device.type == "cuda":
            row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(network.device) / 2**30
        runs.append(row)
    return runs


def encoder_throughput(row: dict, flops: dict) -> float | None:
    encode = row["stages_s"].get("encode")
    if not encode or not flops:
        return None
    return flops["encoder_gflop"] * row["frames_encoded"] / 1e3 / encode


def speed(report: Report, device: str, stack, flops: dict, warm_cases: int, site: Path | None, work: Path) -> dict:
    import torch

    from algorithm.config import ModelConfig
    from algorithm.model.checkpoint import save_checkpoint
    from algorithm.model.fetalclipseg import build_model
    from algorithm.network import load_network
    from algorithm.search import FrameSearch

    checkpoint = work / "fetalclip-vit-l14-random.safetensors"
    with report.section("speed") as figures:
        torch.manual_seed(0)
        model = build_model(ModelConfig())
        save_checkpoint(checkpoint, model, model.config, provenance="random initialisation (seed 0) written by "
                        "tools/gpu_check.py for timings; not trained")
        del model
        gc.collect()
        case = write_case(stack, work / "case")
        out = work / "cold-output"
        started = time.perf_counter()
        completed = subprocess.run([*algorithm_command(site), "--input", str(case), "--output", str(out),
                                    "--weights", str(checkpoint), "--device", device], cwd=REPO,
                                   capture_output=True, text=True, timeout=1200)
        cold = time.perf_counter() - started
        print(completed.stderr[-3000:], flush=True)
        report.check("cold_case_exit_0", completed.returncode == 0)
        result = json.loads((out / "fetalclipseg" / "result.json").read_text()) if completed.returncode == 0 else {}
        figures["cold_case"] = {"process_start_to_outputs_s": cold, "stages_s": result.get("timings_s"),
                                "runtime": result.get("runtime"), "frames_encoded": result.get("frames_encoded")}
        network, _ = load_network(checkpoint, {"device": device})
        search = FrameSearch.for_network(network)
        figures["settings"] = {k: v for k, v in {**network.describe(), **search.describe()}.items() if k != "runtime"}
        runs = case_timings(network, stack, max(1, warm_cases))
        figures["warm_cases"] = runs
        best = min(runs, key=lambda r: r["wall_s"])
        figures["warm_case_s"] = best["wall_s"]
        figures["network_s"] = best["stages_s"].get("network")
        achieved = encoder_throughput(best, flops)
        # The lazy decoder against decoding every frame inline (random weights make every frame choosable,
        # so this shows what deferring costs, not what skipping saves on trained weights).
        if device == "cuda":  # on the CPU another full-model case would take minutes
            dense = case_timings(network, stack, 1, dataclasses.replace(search, lazy_decoder=False))[0]
            figures["lazy_decoder_off"] = {"wall_s": dense["wall_s"], "frames_decoded": dense["frames_decoded"],
                                           "network_s": dense["stages_s"].get("network")}
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[network.precision]
        del network
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        peak = matmul_peak_tflops(device, dtype, 8192 if device == "cuda" else 2048, 10 if device == "cuda" else 3)
        figures["encoder_tflops"] = achieved
        figures["matmul_peak_tflops"] = {"precision": str(dtype).removeprefix("torch."), "tflops": peak}
        figures["fraction_of_peak"] = None if achieved is None else achieved / peak
        if device == "cuda":
            figures["peak_gpu_memory_gib"] = max(r["peak_gpu_memory_gib"] for r in runs)
        report.check("warm_cases_same_frame", len({r["frame"] for r in runs}) == 1)
    return {"checkpoint": checkpoint}


def t4_like(report: Report, stack, flops: dict, checkpoint: Path) -> None:
    import torch

    from algorithm.network import load_network

    with report.section("t4_like") as figures:
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, T4_MEMORY_BYTES / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        figures["memory_cap_gb"] = round(fraction * total / 1e9, 2)
        try:
            network, _ = load_network(checkpoint, {"device": "cuda", "precision": "fp16"})
            figures["batch_size"] = network.batch_size
            figures["memory_plan"] = network.memory
            runs = case_timings(network, stack, 2)
            out_of_memory = False
        except torch.OutOfMemoryError as error:
            out_of_memory, runs = True, []
            figures["error"] = str(error).splitlines()[0]
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        report.check("t4_like_no_out_of_memory", not out_of_memory)
        if not runs:
            return
        best = min(runs, key=lambda r: r["wall_s"])
        figures["case_s"] = best["wall_s"]
        figures["stages_s"] = best["stages_s"]
        figures["peak_gpu_memory_gib"] = best["peak_gpu_memory_gib"]
        achieved = encoder_throughput(best, flops)
        peak = matmul_peak_tflops("cuda", torch.float16, 8192, 10)
        figures["fp16_matmul_peak_tflops"] = peak
        if achieved:
            fraction_of_peak = achieved / peak
            network_tflop = (flops["encoder_gflop"] * best["frames_encoded"] +
                             flops["decoder_gflop"] * best["frames_decoded"]) / 1e3
            network = network_tflop / (T4_PEAK_TFLOPS * fraction_of_peak)
            rest = best["wall_s"] - best["stages_s"].get("network", 0.0)
            figures["t4_estimate"] = {
                "network_s": network, "case_s": network + rest, "label": "ESTIMATE, not a T4 measurement",
                "rule": f"case TFLOP / ({T4_PEAK_TFLOPS} TFLOP/s nominal T4 fp16 peak x the fraction of its fp16 "
                        f"matmul peak this GPU's encoder reached, {fraction_of_peak:.3f}) + the other stages as "
                        "measured here"}


# ------------------------------------------------------------------------------------------ the table

def print_table(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    data = report.data
    table = Table(title=f"GPU path check ({data['device']}, {data['mode']}): "
                        f"{'PASSED' if report.passed else 'FAILED'}")
    table.add_column("section")
    table.add_column("what")
    table.add_column("value", justify="right")

    def row(section: str, what: str, value: Any) -> None:
        if isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(section, what, str(value))

    env = data.get("environment", {})
    row("environment", "device", env.get("device_name", data["device"]))
    row("environment", "torch / CUDA / driver", f"{env.get('torch')} / {env.get('cuda')} / {env.get('driver')}")
    row("policy", "capability -> precision", ", ".join(f"{k}: {v}" for k, v in data["policy"].items()))
    for name, figures in data.get("correctness", {}).items():
        if isinstance(figures, dict) and "dice" in figures:
            row("correctness", f"{name} ({figures['precision']}) vs CPU fp32",
                f"frame {figures['frame']}/{figures['reference_frame']}, max|dp| "
                f"{figures['max_abs_delta_probability']:.2g}, max|dmask| {figures['max_abs_delta_mask_fraction']:.2g}, "
                f"Dice {figures['dice']:.4f}, |dAC| {figures['abs_delta_ac_mm']:.3g} mm")
    if "fp16_vs_bf16_dice" in data.get("correctness", {}):
        row("correctness", "fp16 vs bf16 mask Dice", data["correctness"]["fp16_vs_bf16_dice"])
    for name, figures in data.get("full_size", {}).items():
        if isinstance(figures, dict) and "relative_error" in figures:
            worst = max(figures["relative_error"].items(), key=lambda kv: kv[1])
            row("full_size", f"{name} vs CPU fp32", f"worst rel. error {worst[1]:.2g} ({worst[0]}), max|act| "
                f"{figures['max_abs_activation']:.4g} = {figures['activation_vs_fp16_max']:.2g} x fp16 max")
    speed_figures = data.get("speed", {})
    if speed_figures.get("cold_case"):
        row("speed", "cold case, process start to outputs (s)", speed_figures["cold_case"]["process_start_to_outputs_s"])
    if speed_figures.get("lazy_decoder_off"):
        row("speed", "network per case, decoder on every frame (s)", speed_figures["lazy_decoder_off"]["network_s"])
    for key, label in (("warm_case_s", "warm case (s)"), ("network_s", "network per case (s)"),
                       ("encoder_tflops", "encoder TFLOP/s"), ("fraction_of_peak", "fraction of matmul peak"),
                       ("peak_gpu_memory_gib", "peak GPU memory (GiB)")):
        if speed_figures.get(key) is not None:
            row("speed", label, speed_figures[key])
    if speed_figures.get("matmul_peak_tflops"):
        peak = speed_figures["matmul_peak_tflops"]
        row("speed", f"{peak['precision']} matmul peak (TFLOP/s)", peak["tflops"])
    t4 = data.get("t4_like", {})
    for key, label in (("batch_size", "auto batch size"), ("case_s", "case (s)"),
                       ("peak_gpu_memory_gib", "peak GPU memory (GiB)")):
        if key in t4:
            row("t4_like", label, t4[key])
    if "t4_estimate" in t4:
        row("t4_like", "T4 case ESTIMATE (s)", t4["t4_estimate"]["case_s"])
    for name, ok in data["checks"].items():
        row("check", name, "[green]pass" if ok else "[red]FAIL")
    for name, error in data["errors"].items():
        row("error", name, error[-120:])
    Console().print(table)


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.site is not None:
        sys.path.append(str(args.site))
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import torch

    started = time.perf_counter()
    report = Report(args.device, "quick" if args.quick else "full")
    report.data["environment"] = environment()
    if args.device == "cuda" and not torch.cuda.is_available():
        from algorithm.runtime import cuda_unusable_reason

        print(f"error: no usable CUDA GPU: {cuda_unusable_reason()}", file=sys.stderr)
        report.check("cuda_available", False)
    else:
        policy_section(report)
        frames_per_sweep = args.frames_per_sweep or (24 if args.quick else 140)
        case = correctness(report, args.device, args.quick, args.seed, frames_per_sweep)
        if case is not None and not args.quick:
            flops = full_size(report, args.device, case.image, args.full_frames)
            with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
                made = speed(report, args.device, case.image, flops, 1 if args.device == "cpu" else args.warm_cases,
                             args.site, Path(tmp))
                if args.device == "cuda":
                    t4_like(report, case.image, flops, made["checkpoint"])
    report.data["seconds"]["total"] = round(time.perf_counter() - started, 1)
    report.data = rounded(report.data)
    print_table(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.data, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
