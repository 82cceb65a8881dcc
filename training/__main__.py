"""`python -m training <command>`: the research side in one entry point.

    python -m training prepare ...            -> training.prepare
    python -m training train ...              -> training.train (also under torchrun)
    python -m training evaluate-frames ...    -> training.evaluate_frames
    python -m training threshold-sweep ...    -> training.threshold_sweep
    python -m training reproduce --data DIR --out DIR [--config full --fetalclip PATH]   (also under torchrun)
    python -m training params [--config full] [--json FILE]
    python -m training memory [--config full --mode fixed --batch-size 32 --precision fp16 --budget-gib 15]
    python -m training demo-weights [--out algorithm/weights/fetalclipseg_small_replica.safetensors]

`reproduce` and `demo-weights` are in training.recipes; `params` prints every mode's trainable parameters
(and those that can actually change) beside the paper's; `memory` measures a training step of a mode and
prints the set-up (gradient checkpointing, accumulation) that fits a memory budget, e.g. a T4's.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from training.recipes import DEMO_WEIGHTS, REPO

log = logging.getLogger("training")

DELEGATED = {"prepare": "training.prepare", "train": "training.train", "evaluate-frames": "training.evaluate_frames",
             "threshold-sweep": "training.threshold_sweep"}


def params(args: argparse.Namespace) -> int:
    from training.modes import FETALCLIP_MODES, count_parameters, parameters_table

    counts = count_parameters(args.config, tuple(args.modes or FETALCLIP_MODES), args.lora_rank, args.lora_alpha)
    print(parameters_table(counts))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "modes": counts}, indent=2) + "\n")
    return 0


def memory(args: argparse.Namespace) -> int:
    """Build a mode (random weights), measure its step and plan it for a budget."""
    import torch

    from algorithm.runtime import choose_precision
    from training.losses import SegLoss, class_weights
    from training.memory import GiB, device_budget, measure_step_peak, plan_memory
    from training.modes import SPECS, build_training_model, canonical_mode
    from training.train import TrainView, make_step, measure_step

    mode = canonical_mode(args.mode)
    device = torch.device(args.device)
    # fp16 on the CPU (planning for a GPU without native bf16 from a machine without one): autocast to bf16
    # instead, which keeps the same two bytes per activation
    precision = "bf16" if device.type == "cpu" and args.precision == "fp16" else choose_precision(args.precision, device)
    torch.manual_seed(0)
    model = build_training_model(mode, args.config, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                 decoder=args.decoder, backbone=args.backbone, pretrained=None).to(device)
    model.to(memory_format=torch.channels_last)
    spec = SPECS[mode]
    loss = SegLoss(class_weights([8, 1, 1]), use_mask=spec.segments, mask_loss=spec.mask_loss or "dice").to(device)
    yy, xx = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    sample = (torch.randn(3, 224, 224), (((yy - 112) / 60.0) ** 2 + ((xx - 112) / 45.0) ** 2 < 1).long(),
              torch.tensor(2))
    view = TrainView(model)
    measured = None
    if args.measure:
        # the real step first, on a fresh process: the CPU allocator keeps what the estimate's passes free,
        # which would hide part of the step's peak
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        measured = measure_step_peak(model, make_step(view, loss, sample, device, precision), args.measure, device)
        model.set_grad_checkpointing(False)
    estimate = measure_step(view, loss, sample, device, precision)
    budget = device_budget(device, args.budget_gib)
    plan = plan_memory(estimate, args.batch_size, budget, args.grad_checkpointing, args.accumulate)
    result = {"config": args.config, "mode": mode, "batch_size": args.batch_size, "precision": args.precision,
              "measured_with": f"{precision} autocast on {device}", "estimate": estimate.__dict__,
              "plan": plan.to_dict(),
              "steps_gib": {f"micro {m}, checkpointing {c}": round(estimate.step(m, c) / GiB, 2)
                            for m in (1, args.batch_size) for c in (False, True) if c is False or estimate.can_checkpoint}}
    if measured is not None:
        # one real step (forward, backward, AdamW) against the estimate of the same step, weights excluded
        predicted = estimate.step(args.measure, bool(args.grad_checkpointing)) - estimate.weights
        result["validation"] = {"micro_batch": args.measure, "grad_checkpointing": bool(args.grad_checkpointing),
                                "measured_bytes": measured, "estimated_bytes": predicted,
                                "estimated_over_measured": round(predicted / max(measured, 1), 3)}
    print(json.dumps(result, indent=2))
    print(plan.describe())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if plan.fits else 1


def build_parser() -> argparse.ArgumentParser:
    from training.modes import FETALCLIP_MODES, MODES
    from training.train import add_recipe_arguments

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in DELEGATED.items():
        sub.add_parser(name, add_help=False, help=f"see python -m training {name} --help ({module})")

    rep = sub.add_parser("reproduce", help="prepare -> train every mode -> frame table, threshold sweep -> "
                                           "challenge score -> report")
    rep.add_argument("--data", type=Path, required=True, help="release-layout folder (real or replica)")
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--prepared", type=Path, help="reuse / write prepared data here (default OUT/prepared)")
    rep.add_argument("--modes", nargs="+", default=list(FETALCLIP_MODES), choices=list(FETALCLIP_MODES) + ["cls"])
    rep.add_argument("--baselines", nargs="+", metavar="NAME",
                     help="also train these baselines (training.baselines: densenet, swin, clip_openai, ... or "
                          "a timm name); weights from --pretrained hub, or NAME.safetensors / NAME.pth in "
                          "--baseline-weights")
    rep.add_argument("--baseline-weights", type=Path, help="folder of local baseline weights, one file per name")
    rep.add_argument("--all-sweeps", action="store_true", help="prepare every sweep, not only those with an AC")
    rep.add_argument("--replica", action=argparse.BooleanOptionalAction, default=None,
                     help="the data is the replica (default: detected)")
    rep.add_argument("--skip-cases", action="store_true", help="no whole-case inference / challenge score")
    add_recipe_arguments(rep)
    rep.set_defaults(trials=5)  # the paper's five trials

    par = sub.add_parser("params", help="trainable parameters of every mode beside the paper's")
    par.add_argument("--config", default="full", choices=["full", "small"])
    par.add_argument("--modes", nargs="+", choices=list(FETALCLIP_MODES))
    par.add_argument("--lora-rank", type=int, default=8)
    par.add_argument("--lora-alpha", type=int)
    par.add_argument("--json", type=Path)

    mem = sub.add_parser("memory", help="measure a training step and the set-up that fits a budget")
    mem.add_argument("--config", default="full", choices=["full", "small"])
    mem.add_argument("--mode", default="fixed", choices=list(MODES))
    mem.add_argument("--backbone")
    mem.add_argument("--decoder", choices=["unetr", "separable"])
    mem.add_argument("--lora-rank", type=int, default=8)
    mem.add_argument("--lora-alpha", type=int)
    mem.add_argument("--batch-size", type=int, default=32, help="frames per step on one device")
    mem.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    mem.add_argument("--device", default="cpu")
    mem.add_argument("--budget-gib", type=float, help="memory budget (default: the GPU's free memory)")
    mem.add_argument("--accumulate", type=int)
    mem.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    mem.add_argument("--measure", type=int, metavar="MICRO",
                     help="also run one real step of MICRO frames and compare its measured peak with the estimate")
    mem.add_argument("--json", type=Path)

    demo = sub.add_parser("demo-weights", help="train the bundled small replica weights on the CPU")
    demo.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    demo.add_argument("--work", type=Path, default=REPO / "build" / "demo_weights")
    demo.add_argument("--cases", type=int, default=60)
    demo.add_argument("--frames-per-sweep", type=int, default=48)
    demo.add_argument("--seed", type=int, default=2025)
    demo.add_argument("--epochs", type=int, default=42)
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument("--warmup-steps", type=int, default=50)
    demo.add_argument("--negatives-per-positive", type=float, default=0.75)
    demo.add_argument("--head-negatives-per-positive", type=float, default=4.0,
                      help="extra negatives per positive for the frame head only (no decoder pass)")
    demo.add_argument("--mine-epochs", type=int, default=0,
                      help="then fine-tune this many epochs with hard-negative mining (default 0: none)")
    demo.add_argument("--hard-negatives", type=float, default=0.5,
                      help="stage 2: fraction of the negatives drawn by the frame head's P(abdomen)")
    demo.add_argument("--mine-lr", type=float, default=3e-4)
    demo.add_argument("--val-max-frames", type=int, default=160)
    demo.add_argument("--fractions", type=float, nargs=3, default=(0.85, 0.1, 0.05))
    demo.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (1: a third of the CPU time of 2 on a shared machine)")
    demo.add_argument("--max-steps", type=int)
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("--check", action="store_true", help="then score the weights on replica cases seed 424242")
    demo.add_argument("--check-cases", type=int, default=4)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
    from training.distributed import shutdown
    from training.recipes import demo_weights, reproduce
    from training.snapshot import SnapshotError
    from training.train import configure_logging

    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reproduce":
        from algorithm.inference import resolve_device
        from algorithm.runtime import choose_precision

        try:
            choose_precision(args.precision, resolve_device(args.device))
        except ValueError as exc:
            parser.error(str(exc))
    try:
        if args.command == "reproduce":
            return reproduce(args)
        if args.command == "params":
            return params(args)
        if args.command == "memory":
            return memory(args)
        args.argv = argv[1:]
        return demo_weights(args)
    except SnapshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
