"""`python -m training speed`: case-level speed of our pipeline against the paper-style reference.

On one generated replica case (`training.replica`) it times every stage
(read, field of view, preprocess, encode, decode, select, post-process, write) of

* our pipeline (`algorithm.predict.predict` on an `algorithm.network.Network` with its defaults: LoRA
  merged, inference mode, bf16 on AMX CPUs / fp16-bf16 autocast on CUDA, lazy decoder, coarse-to-fine
  search on the CPU), and
* a reference path (`reference.py`: another network and another search for the same `predict`) that runs
  the same weights the way the published FetalCLIPSEG code does: every frame, fp32, peft's unmerged LoRA,
  intermediate tokens captured with `register_forward_hook` on the transformer blocks of a plain
  `visual(x)` call, and per-frame numpy post-processing of every mask on the host (in its decode stage),

on the same hardware in the same process, and reports frames per second, peak memory, FLOPs per frame and,
on a GPU, the distance to the compute floor of the encoder. Timed runs follow one untimed warm-up batch per
pipeline (library initialisation: oneDNN primitives, cuDNN autotuning, CUDA context).

`--frames N` (for the full model on a CPU): the reference runs on a replica case of about N frames (same
seed, shorter sweeps) and its per-frame cost is extrapolated to the whole case (`extrapolated: true`); our
pipeline runs on the whole case and, for the same-frame check, on the short case too.

Numbers on a shared machine are noisy; CPU seconds (`process_time`) are reported next to wall seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import algorithm
from algorithm.config import STACK_SPACING_MM, Config, InferenceConfig, ModelConfig
from algorithm.network import Network
from algorithm.options import add_inference_options, inference_overrides
from algorithm.predict import predict
from algorithm.runtime import resolve_device
from algorithm.search import FrameSearch
from training.speed.measure import (PeakRSS, activation_bytes_per_frame, count_flops, cuda_peak, device_name,
                                    gpu_peak_tflops, memory_estimate)
from training.speed.oracle import LabelOracle
from training.scoring.metrics import case_score
from training.data.replica import generate_case
from training.speed.reference import ReferenceNetwork, ReferenceSearch

BUNDLED_WEIGHTS = Path(algorithm.__file__).resolve().parent / "weights"
STAGES = ("read", "field_of_view", "preprocess", "encode", "decode", "select", "postprocess", "write", "other")


# ------------------------------------------------------------------------------------------ set-up

@dataclass
class Weights:
    config: ModelConfig
    state: dict[str, torch.Tensor] | None  # None: load from `path`
    path: Path | None
    note: str
    meaningful: bool  # trained weights (outputs mean something)

    def model(self) -> torch.nn.Module:
        """A fresh model with these weights (LoRA unmerged), on the CPU."""
        if self.path is not None:
            from algorithm.model.checkpoint import load_checkpoint
            return load_checkpoint(self.path, device="cpu")[0]
        from algorithm.model.fetalclipseg import build_model
        model = build_model(self.config)
        model.load_state_dict(self.state)
        return model


def choose_weights(config_name: str, weights: Path | None) -> Weights:
    """--weights; else the bundled demo weights (small config only); else random initialisation."""
    from algorithm.model.checkpoint import read_checkpoint_info

    if weights is None and config_name == "small":
        found = sorted(BUNDLED_WEIGHTS.glob("*.safetensors"))
        weights = found[0] if found else None
    if weights is not None:
        info = read_checkpoint_info(weights)
        return Weights(info.config, None, Path(weights), f"{weights}: {info.provenance}", meaningful=True)
    from algorithm.model.fetalclipseg import build_model

    config = ModelConfig.small() if config_name == "small" else ModelConfig()
    torch.manual_seed(0)
    state = copy.deepcopy(build_model(config).state_dict())
    what = "FetalCLIP-shaped ViT-L/14" if config_name == "full" else "small"
    return Weights(config, state, None, f"random initialisation of the {what} model (seed 0): timings are "
                   "real, but the frame choice is noise, so same_frame_as_reference only checks that the "
                   "optimisations keep the network's ranking", meaningful=False)


def make_case(seed: int, frames_per_sweep: int) -> np.ndarray:
    return generate_case(seed, frames_per_sweep=frames_per_sweep).image


def time_read_write(stack: np.ndarray, frame: int, mask: np.ndarray | None) -> tuple[dict, dict, np.ndarray]:
    """Write the case as the challenge ships it, read it back with `contract.read_stack`, write the outputs
    with `contract.write_outputs`: (wall s, CPU s, the stack as read)."""
    import SimpleITK as sitk

    from algorithm.contract import read_stack, write_outputs

    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        path = Path(tmp) / "case.mha"
        image = sitk.GetImageFromArray(stack)
        image.SetSpacing(STACK_SPACING_MM)
        sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=1)
        wall, cpu = {}, {}
        t, c = time.perf_counter(), time.process_time()
        read = read_stack(path)
        wall["read"], cpu["read"] = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        write_outputs(Path(tmp) / "output", read, frame, mask)
        wall["write"], cpu["write"] = time.perf_counter() - t, time.process_time() - c
    return wall, cpu, read.array


# ------------------------------------------------------------------------------------------ runs

@dataclass
class Run:
    frame: int
    seconds: dict[str, float]
    cpu_seconds: dict[str, float]
    frames_encoded: int
    frames_decoded: int
    peak_rss_mb: float
    cuda_max_allocated_mb: float | None
    mask: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def run_case(network: Network | ReferenceNetwork, stack: np.ndarray,
             search: FrameSearch | ReferenceSearch | None = None) -> Run:
    """`predict` on one case, timed per stage; what the stages leave out is `other`."""
    with PeakRSS() as rss, cuda_peak(network.device) as gpu:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = predict(stack, network, search)
        total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    seconds = dict(result.timings)
    network_seconds = seconds.pop("network", 0.0)
    inner = sum(seconds.get(k, 0.0) for k in ("preprocess", "encode", "decode"))
    seconds["other"] = max(0.0, total - sum(seconds.values()))  # loader waits, transfers, search bookkeeping
    cpu = {"pipeline": cpu_total}
    return Run(result.frame, seconds, cpu, result.frames_encoded, result.frames_decoded, rss.peak,
               gpu["max_allocated_mb"], result.mask,
               {"search": result.search, "network_wall_s": network_seconds, "network_inner_s": inner})


def warm_up(networks: list[Network | ReferenceNetwork], stack: np.ndarray, frames: int = 2) -> None:
    """One small untimed batch through each network: one-off library initialisation is not case time
    (on CUDA use a full batch, so that cuDNN autotuning happens here)."""
    for network in networks:
        count = network.batch_size if network.device.type == "cuda" else frames
        inputs = network.preprocess(torch.from_numpy(stack[:min(len(stack), max(1, count))]))
        network.decode(inputs, network.encode(inputs)[0])


# ------------------------------------------------------------------------------------------ report

def stage_table(ours: Run, reference: Run, reference_scale: float, shared: dict[str, float]) -> list[dict]:
    """Per-stage seconds of both pipelines. `shared` stages (read, write) run the same code for both and are
    measured once; the reference's own stages are multiplied by `reference_scale` (1 unless extrapolated)."""
    rows = []
    for stage in STAGES:
        mine = ours.seconds.get(stage, 0.0) + shared.get(stage, 0.0)
        theirs = reference.seconds.get(stage, 0.0) * reference_scale + shared.get(stage, 0.0)
        if mine == 0.0 and theirs == 0.0:
            continue
        rows.append({"stage": stage, "seconds": round(mine, 3), "reference_seconds": round(theirs, 3),
                     "speedup": round(theirs / mine, 2) if mine > 0 else None})
    return rows


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    table = Table(title=f"FetalCLIPSEG case benchmark: {report['config']} model on {report['device_name']}")
    table.add_column("stage")
    table.add_column("ours (s)", justify="right")
    table.add_column("reference (s)", justify="right")
    table.add_column("speed-up", justify="right")
    for row in report["stages"]:
        table.add_row(row["stage"], f"{row['seconds']:.2f}", f"{row['reference_seconds']:.2f}",
                      "" if row["speedup"] is None else f"{row['speedup']:.1f}x")
    table.add_row("[bold]case", f"[bold]{report['seconds']:.2f}", f"[bold]{report['reference_seconds']:.2f}",
                  f"[bold]{report['speedup_vs_reference']:.1f}x")
    console.print(table)
    extrapolated = " (reference extrapolated from a shorter case)" if report["extrapolated"] else ""
    console.print(f"frames: {report['frames']}, encoded by us: {report['frames_encoded']}, decoded: "
                  f"{report['frames_decoded']}; {report['frames_per_second']:.1f} frames/s vs "
                  f"{report['reference_frames_per_second']:.1f}{extrapolated}")
    console.print(f"chosen frame: ours {report['frame']}, reference {report['reference_frame']} "
                  f"(same: {report['same_frame_as_reference']}; {report['same_frame_scope']})")
    flops = report.get("flops") or {}
    if flops:
        line = (f"FLOPs per frame: encoder {flops['encoder_gflop']:.1f} G, decoder {flops['decoder_gflop']:.1f} G; "
                f"encoder at {flops['encoder_achieved_tflops']:.3f} TFLOP/s")
        if flops.get("encoder_floor_s") is not None:
            line += (f"; compute floor {flops['encoder_floor_s']:.2f} s at {flops['peak_tflops']} TFLOP/s, "
                     f"encoder {flops['encoder_vs_floor']:.1f}x the floor")
        console.print(line)
    memory = report["memory"]
    console.print(f"peak host RSS: ours {memory['host_peak_rss_mb']:.0f} MiB, reference "
                  f"{memory['reference_host_peak_rss_mb']:.0f} MiB" +
                  (f"; CUDA max allocated: ours {memory['cuda_max_allocated_mb']} MiB, reference "
                   f"{memory['reference_cuda_max_allocated_mb']} MiB" if memory.get("cuda_max_allocated_mb") else ""))
    if memory.get("estimate_t4"):
        est = memory["estimate_t4"]
        console.print(f"T4 estimate at batch {est['batch_size']}: {est['estimate_gb']} GB "
                      f"(weights {est['weights_gb']} GB, activations {est['activations_gb']} GB)")
    for note in report["notes"]:
        console.print(f"[dim]note: {note}")


# ------------------------------------------------------------------------------------------ search check

def compare_search(args: argparse.Namespace) -> dict:
    """Coarse-to-fine against the dense scan on `args.compare_search` replica cases (seeds from `args.seed`):
    chosen frames, challenge scores (training.scoring.metrics.case_score) and frames encoded."""
    device = resolve_device(args.device)
    oracle = args.weights is None and not sorted(BUNDLED_WEIGHTS.glob("*.safetensors"))
    weights = None if oracle else choose_weights("small", args.weights)
    stride = args.coarse_stride if args.coarse_stride and args.coarse_stride > 1 else \
        InferenceConfig().cpu_coarse_stride
    overrides = {key: value for key, value in inference_overrides(args).items() if key != "coarse_stride"}
    rows = []
    for i in range(args.compare_search):
        seed = args.seed + i
        case = generate_case(seed, frames_per_sweep=args.frames_per_sweep)
        results = {}
        for name, coarse in (("dense", 1), ("coarse", stride)):
            model_config = ModelConfig.small() if oracle else weights.config
            oracle_settings = {"precision": "fp32"} if oracle else {}  # the oracle computes in fp32
            config = Config(model=model_config).replace(**{**overrides, **oracle_settings, "device": device.type,
                                                           "coarse_stride": coarse})
            model = (LabelOracle(case.image, case.mask, model_config.image_size, args.oracle_noise, seed)
                     if oracle else weights.model())
            network = Network(model, config, device)
            start = time.perf_counter()
            result = predict(case.image, network)
            seconds = time.perf_counter() - start
            score = case_score(result.frame, result.mask, case.mask, case.ac_per_sweep, fov=result.fov)
            results[name] = {"frame": result.frame, "score": round(score.score, 4), "wfss": score.wfss,
                             "frames_encoded": result.frames_encoded, "seconds": round(seconds, 2)}
        dense, coarse_result = results["dense"], results["coarse"]
        rows.append({"seed": seed, "uuid": case.uuid, "dense": dense, "coarse": coarse_result,
                     "same_frame": dense["frame"] == coarse_result["frame"],
                     "score_delta": round(coarse_result["score"] - dense["score"], 4)})
        print(f"case {seed}: dense frame {dense['frame']} score {dense['score']:.3f} ({dense['frames_encoded']} "
              f"frames), coarse frame {coarse_result['frame']} score {coarse_result['score']:.3f} "
              f"({coarse_result['frames_encoded']} frames)", flush=True)
    encoded_dense = sum(r["dense"]["frames_encoded"] for r in rows)
    encoded_coarse = sum(r["coarse"]["frames_encoded"] for r in rows)
    return {
        "network": (f"label oracle (ground truth blurred over 1 frame, logit noise s.d. {args.oracle_noise}): "
                    "no trained weights were available" if oracle else weights.note),
        "coarse_stride": stride, "cases": len(rows), "frames_per_sweep": args.frames_per_sweep,
        "same_frame": sum(r["same_frame"] for r in rows),
        "mean_score_dense": round(float(np.mean([r["dense"]["score"] for r in rows])), 4),
        "mean_score_coarse": round(float(np.mean([r["coarse"]["score"] for r in rows])), 4),
        "worst_score_delta": min(r["score_delta"] for r in rows),
        "frames_encoded_dense": encoded_dense, "frames_encoded_coarse": encoded_coarse,
        "encoder_work_ratio": round(encoded_dense / max(encoded_coarse, 1), 2),
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training speed", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the report here (default: print only)")
    parser.add_argument("--config", choices=["small", "full"], default="small",
                        help="model size (default small)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint (default: the bundled demo weights for small, else random weights)")
    add_inference_options(parser, tuning=True)
    parser.add_argument("--frames", type=int, default=None,
                        help="run the reference on a ~N-frame case and extrapolate (full model on a CPU; "
                             "default: the reference runs on the whole case)")
    parser.add_argument("--frames-per-sweep", type=int, default=140,
                        help="replica case size, 6 sweeps (default 140, the challenge's)")
    parser.add_argument("--seed", type=int, default=5000, help="replica case seed, not a training seed (default 5000)")
    parser.add_argument("--no-flops", action="store_true",
                        help="skip FLOP counting and the memory estimate (default: count them)")
    parser.add_argument("--compare-search", type=int, default=0, metavar="CASES",
                        help="instead of timing: coarse-to-fine vs dense scan on CASES replica cases (frames, "
                             "challenge scores); the small model's weights, or a label oracle without weights "
                             "(default 0: time one case)")
    parser.add_argument("--oracle-noise", type=float, default=0.5,
                        help="logit noise of the label oracle (default 0.5)")
    parser.add_argument("--quick", action="store_true",
                        help="small config, 6 x 4 frames, batch 8: a CI smoke run of well under a minute "
                             "(default: the options above)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    if args.quick:
        args.config = "small"
        args.frames_per_sweep = min(args.frames_per_sweep, 4)
        args.batch_size = args.batch_size or 8
        args.frames = None
    device = resolve_device(args.device)
    notes: list[str] = []
    weights = choose_weights(args.config, args.weights)
    if args.config == "full" and weights.config.width != ModelConfig().width:
        raise SystemExit(f"--config full but {weights.path} holds the {weights.config.name} model")
    config = Config(model=weights.config).replace(**{**inference_overrides(args), "device": device.type})

    full_stack = make_case(args.seed, args.frames_per_sweep)
    n_frames = len(full_stack)
    subset = args.frames is not None and args.frames < n_frames
    short_stack = make_case(args.seed, max(4, math.ceil(args.frames / 6))) if subset else full_stack

    network = Network(weights.model(), config, device)
    search = FrameSearch.for_network(network)
    # The reference runs fp32 at our batch size (on CUDA the one auto-sized from free memory).
    reference = ReferenceNetwork(weights.model(), config, device, network.batch_size)
    warm_up([network, reference], full_stack)

    ours = run_case(network, full_stack, search)
    ours_short = run_case(network, short_stack, search) if subset else ours
    ref = run_case(reference, short_stack, ReferenceSearch())
    reference.close()
    io_wall, io_cpu, _ = time_read_write(full_stack, ours.frame, ours.mask)

    scale = n_frames / len(short_stack)  # reference per-frame stages, extrapolated to the whole case
    rows = stage_table(ours, ref, scale, io_wall)
    seconds = sum(r["seconds"] for r in rows)
    reference_seconds = sum(r["reference_seconds"] for r in rows)
    same = ours_short.frame == ref.frame
    if subset:
        notes.append(f"reference timed on a {len(short_stack)}-frame replica case (seed {args.seed}) and its "
                     f"per-frame stages scaled by {scale:.2f} to the {n_frames}-frame case; ours measured on the "
                     "whole case")
    if not weights.meaningful:
        notes.append(weights.note)

    report: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "config": args.config,
        "model": weights.config.name,
        "weights": str(weights.path) if weights.path else "random",
        "weights_note": weights.note,
        "torch": torch.__version__,
        "case": {"generator": "training.data.replica", "seed": args.seed, "frames_per_sweep": args.frames_per_sweep},
        "frames": n_frames,
        "frames_encoded": ours.frames_encoded,
        "frames_decoded": ours.frames_decoded,
        "reference_frames_encoded": n_frames,
        "seconds": round(seconds, 3),
        "reference_seconds": round(reference_seconds, 3),
        "speedup_vs_reference": round(reference_seconds / seconds, 3) if seconds > 0 else None,
        "cpu_seconds": round(ours.cpu_seconds["pipeline"] + sum(io_cpu.values()), 3),
        "reference_cpu_seconds": round(ref.cpu_seconds["pipeline"] * scale + sum(io_cpu.values()), 3),
        "frames_per_second": round(n_frames / seconds, 3),
        "reference_frames_per_second": round(n_frames / reference_seconds, 3),
        "frame": ours.frame,
        "reference_frame": ref.frame,
        "same_frame_as_reference": bool(same),
        "same_frame_scope": (f"{len(short_stack)}-frame replica case" if subset else "the benchmarked case"),
        "extrapolated": bool(subset),
        "stages": rows,
        "settings": {**network.describe(), **search.describe()},
        "search": ours.extra["search"],
        "memory": {"host_peak_rss_mb": round(ours.peak_rss_mb, 1),
                   "reference_host_peak_rss_mb": round(ref.peak_rss_mb, 1),
                   "cuda_max_allocated_mb": ours.cuda_max_allocated_mb,
                   "reference_cuda_max_allocated_mb": ref.cuda_max_allocated_mb},
        "warm_up": "one untimed batch per pipeline before the timed runs",
        "notes": notes,
    }
    if not args.no_flops:
        report["flops"] = flops_report(network, weights, report, device)
        if device.type == "cpu" and not args.quick:  # the T4 estimate is about the full model
            model = weights.model()  # fp32, LoRA merged as in inference (peft's unmerged attention
            if hasattr(model, "merge_lora"):  # adapter allocates weight-sized temporaries on every call)
                model.merge_lora()
            per_frame = activation_bytes_per_frame(model.eval(), weights.config, batch=4)
            report["memory"]["estimate_t4"] = memory_estimate(model, weights.config, 32, per_frame)
    return report


def flops_report(network: Network, weights: Weights, report: dict, device: torch.device) -> dict:
    flops = count_flops(network.model, weights.config, device)
    encode_s = next((r["seconds"] for r in report["stages"] if r["stage"] == "encode"), 0.0)
    out = {k: round(v, 2) for k, v in flops.items()}
    out["case_tflop_dense"] = round(flops["total_gflop"] * report["frames"] / 1e3, 2)
    out["case_tflop_ours"] = round((flops["encoder_gflop"] * report["frames_encoded"] +
                                    flops["decoder_gflop"] * report["frames_decoded"]) / 1e3, 2)
    out["encoder_achieved_tflops"] = round(flops["encoder_gflop"] * report["frames_encoded"] / 1e3 /
                                           max(encode_s, 1e-9), 4)
    peak = gpu_peak_tflops(report["device_name"]) if device.type == "cuda" else None
    out["peak_tflops"] = peak
    out["encoder_floor_s"] = None if peak is None else round(
        flops["encoder_gflop"] * report["frames_encoded"] / 1e3 / peak, 3)
    out["encoder_vs_floor"] = None if peak is None else round(encode_s / out["encoder_floor_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare_search:
        report = compare_search(args)
        print(f"same frame in {report['same_frame']}/{report['cases']} cases; mean challenge score dense "
              f"{report['mean_score_dense']:.4f}, coarse {report['mean_score_coarse']:.4f}; encoder work "
              f"{report['frames_encoded_dense']} -> {report['frames_encoded_coarse']} frames "
              f"({report['encoder_work_ratio']:.2f}x less); network: {report['network']}")
    else:
        report = run_benchmark(args)
        print_report(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
