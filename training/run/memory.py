"""How much device memory a training step needs, and the cheapest set-up that fits (checkpointing, accumulation).

The estimate is measured, not guessed from formulas: one forward pass (plus the loss) at micro-batch 1 and
at 2 runs under `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for the
backward pass. Their distinct storages, minus the model's own parameters, are the activations; the
difference between the two passes is the cost of one more frame, the rest is what a step keeps whatever its
size (e.g. the half-precision copies autocast makes of the frozen weights). Bytes saved inside the
encoder's transformer blocks are counted apart: with gradient checkpointing a block keeps only its input,
and its activations come back one block at a time during the backward pass.

    step(micro, checkpointing) = weights + gradients + AdamW state (2 x fp32 per trainable weight) + WORKSPACE
                                 + cast copies + BACKWARD_FACTOR x (fixed activations + micro x activations per frame)

Where gradients reach the encoder, the half-precision copies autocast makes of its frozen weights are saved
for the backward pass, so the hooks count them. Where none do (an encoder under no_grad or frozen), nothing
is saved and the hooks see nothing, yet the copies are made; the estimate then counts one half-precision
copy of the frozen block weights ("cast copies"). That is conservative on a GPU, where the copies are
transient; on the CPU, oneDNN's half-precision matmuls of such an encoder held more than that once the
micro-batch grew past one frame (docs/notes/training-memory.md).

BACKWARD_FACTOR covers what the backward pass holds beside the saved activations (the gradients of the
largest ones), WORKSPACE the kernels' scratch memory; both were calibrated against the measured peak of a
real step (`python -m training memory --measure N`, small and full configurations on the CPU;
docs/notes/training-memory.md). On a GPU the plan also keeps HEADROOM of the free memory for the allocator's
fragmentation.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from algorithm.runtime import DeviceError, choose_precision, resolve_device
from training.cli import CommandParser, UsageError, number, run_command
from training.models.build import build_training_model
from training.models.losses import SegLoss, class_weights
from training.models.modes import MODES, ModelOptions, mode_argument
from training.params import POSITIVE
from training.run.step import TrainView, make_step

log = logging.getLogger("training")

GiB = 1024 ** 3
BACKWARD_FACTOR = 1.1
WORKSPACE = GiB // 4
HEADROOM = 0.08  # of the device's free memory, kept for fragmentation and the CUDA context's growth


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step, by what holds them."""

    weights: int  # every parameter and buffer, in its stored dtype
    training_state: int  # gradients + AdamW moments of the trainable parameters (fp32)
    fixed_activations: int  # kept for backward whatever the batch size
    per_frame: int  # kept for backward per frame of the micro-batch, without checkpointing
    per_frame_blocks: int  # of which inside the encoder's transformer blocks (0: no gradient reaches them)
    per_frame_block_inputs: int  # what checkpointing keeps instead: every block's input, per frame
    blocks: int
    cast_copies: int = 0  # half-precision copies of frozen encoder weights that no saved tensor shows

    @property
    def can_checkpoint(self) -> bool:
        return self.blocks > 0 and self.per_frame_blocks > 0

    def activations(self, micro_batch: int, checkpointing: bool = False) -> int:
        per_frame = self.per_frame
        if checkpointing and self.can_checkpoint:
            # block activations replaced by the block inputs, plus one block recomputed at a time
            per_frame = (per_frame - self.per_frame_blocks + self.per_frame_block_inputs
                         + self.per_frame_blocks // self.blocks)
        return self.fixed_activations + micro_batch * per_frame

    def step(self, micro_batch: int, checkpointing: bool = False) -> int:
        return int(self.weights + self.training_state + WORKSPACE + self.cast_copies
                   + BACKWARD_FACTOR * self.activations(micro_batch, checkpointing))


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int  # frames per forward pass on one process
    accumulate: int  # micro-batches per optimiser step
    grad_checkpointing: bool
    estimate_bytes: int
    budget_bytes: int | None  # None: unknown (CPU), nothing adapted
    fits: bool

    def describe(self) -> str:
        budget = "no budget (CPU)" if self.budget_bytes is None else f"budget {self.budget_bytes / GiB:.1f} GiB"
        verdict = "" if self.fits else " - DOES NOT FIT even at micro-batch 1 with checkpointing"
        return (f"estimated step memory {self.estimate_bytes / GiB:.2f} GiB ({budget}): micro-batch "
                f"{self.micro_batch} x {self.accumulate} accumulated, gradient checkpointing "
                f"{'on' if self.grad_checkpointing else 'off'}{verdict}")

    def to_dict(self) -> dict:
        return asdict(self)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder's transformer blocks (what gradient checkpointing wraps): open_clip or timm layouts."""
    encoder = getattr(model, "encoder", model)
    visual = getattr(encoder, "visual", encoder)
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None) if transformer is not None else getattr(visual, "blocks", None)
    return list(blocks) if blocks is not None else []


def _saved_bytes(model: nn.Module, step: Callable[[int], torch.Tensor], batch: int) -> tuple[int, int, int]:
    """(all, inside transformer blocks, block inputs) bytes autograd keeps after a forward of `batch` frames."""
    parameters = {_storage_key(p) for p in model.parameters()}
    seen: dict[tuple[int, int], bool] = {}
    inside = [0]
    block_inputs = [0]

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in parameters and key not in seen:
            seen[key] = inside[0] > 0
        return t

    def enter(module, args):
        inside[0] += 1
        if args and isinstance(args[0], torch.Tensor):
            block_inputs[0] += args[0].numel() * args[0].element_size()

    def leave(module, args, output):
        inside[0] -= 1

    handles = []
    for block in transformer_blocks(model):
        handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step(batch)
        del loss
    finally:
        for handle in handles:
            handle.remove()
    total = sum(nbytes for (_, nbytes) in seen)
    blocks = sum(nbytes for (_, nbytes), in_block in seen.items() if in_block)
    return total, blocks, block_inputs[0]


@contextlib.contextmanager
def _preserved(model: nn.Module):
    """Run probe passes without changing the model: buffers (BatchNorm statistics) and RNG restored."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])


def estimate_step_memory(model: nn.Module, step: Callable[[int], torch.Tensor],
                         half_precision: bool = False) -> MemoryEstimate:
    """Measure `step(batch) -> loss` (forward + loss of `batch` frames, under the training autocast;
    `half_precision`: that autocast is to bf16 or fp16)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    training_state = sum(p.numel() for p in trainable) * 4 * 3  # gradient + two AdamW moments, fp32
    blocks = transformer_blocks(model)
    with _preserved(model):
        one, one_blocks, one_inputs = _saved_bytes(model, step, 1)
        two, two_blocks, two_inputs = _saved_bytes(model, step, 2)
    per_frame = max(two - one, 0)
    per_frame_blocks = max(two_blocks - one_blocks, 0)
    cast_copies = 0
    if half_precision and blocks and per_frame_blocks == 0:
        cast_copies = sum(p.numel() * 2 for block in blocks for p in block.parameters()
                          if not p.requires_grad and p.is_floating_point())
    return MemoryEstimate(weights=weights, training_state=training_state, fixed_activations=max(one - per_frame, 0),
                          per_frame=per_frame, per_frame_blocks=per_frame_blocks,
                          per_frame_block_inputs=max(two_inputs - one_inputs, 0), blocks=len(blocks),
                          cast_copies=cast_copies)


def measure_step(view: TrainView, loss: SegLoss, sample: tuple[torch.Tensor, ...], device: torch.device,
                 precision: str, channels_last: bool = True) -> MemoryEstimate:
    """The estimate of a training step of `view` + `loss` (`estimate_step_memory`), measured on copies of `sample`."""
    return estimate_step_memory(view.model, make_step(view, loss, sample, device, precision, channels_last),
                                half_precision=precision in ("bf16", "fp16"))


def _divisors(n: int) -> Iterable[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_memory(estimate: MemoryEstimate, batch_per_process: int, budget_bytes: int | None,
                grad_checkpointing: bool | None = None, accumulate: int | None = None) -> MemoryPlan:
    """The set-up of a step of `batch_per_process` frames that fits `budget_bytes`.

    Choices left as None are made here, cheapest first: nothing; gradient checkpointing (same arithmetic,
    ~30 % more compute, only where gradients reach the encoder blocks); then accumulation over 2, 4, ...
    micro-batches (divisors of the batch; the Dice and BatchNorm then see micro-batches). Without a budget
    (CPU) nothing is adapted. When nothing fits, the smallest set-up is returned with fits False.
    """
    if accumulate is not None and (accumulate < 1 or batch_per_process % accumulate):
        raise UsageError(f"--accumulate {accumulate} does not divide the batch of {batch_per_process} per process")
    if grad_checkpointing is not None:
        checkpointing_options = [grad_checkpointing]
    else:
        checkpointing_options = [False] + ([True] if estimate.can_checkpoint else [])
    accumulate_options = [accumulate] if accumulate is not None else list(_divisors(batch_per_process))
    if budget_bytes is None:
        checkpointing_options, accumulate_options = checkpointing_options[:1], accumulate_options[:1]
    plans = []
    for steps in accumulate_options:
        for checkpointing in checkpointing_options:
            micro = batch_per_process // steps
            need = estimate.step(micro, checkpointing)
            plan = MemoryPlan(micro, steps, checkpointing, need, budget_bytes,
                              fits=budget_bytes is None or need <= budget_bytes)
            if plan.fits:
                return plan
            plans.append(plan)
    return min(plans, key=lambda p: p.estimate_bytes)


def device_budget(device: torch.device, override_gib: float | None = None) -> int | None:
    """Bytes a step may use: `override_gib`, else the GPU's free memory less HEADROOM; None on the CPU."""
    if override_gib is not None:
        return int(override_gib * GiB)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * (1 - HEADROOM))



# ------------------------------------------------------------------------------------------ validation

def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_step_peak(model: nn.Module, step: Callable[[int], torch.Tensor], micro_batch: int,
                      device: torch.device) -> int:
    """Measured extra memory of one real training step (forward, backward, AdamW) of `micro_batch` frames,
    over what the model held before: CUDA's peak allocation, or on the CPU the peak resident size (VmHWM,
    reset through /proc/self/clear_refs). Call it on a fresh process's first step: the CPU allocator keeps
    freed memory, so later steps would read low. Compare with `MemoryEstimate.step(micro) - weights`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current resident size
        before = _resident_bytes("VmRSS")
    with _preserved(model):
        loss = step(micro_batch)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _resident_bytes("VmHWM")
    optimizer.zero_grad(set_to_none=True)
    return int(peak - before)


# ------------------------------------------------------------------------------------------ command

def run_memory_command(args: argparse.Namespace) -> int:
    """Build a mode (random weights), measure its step and plan it for a budget."""
    try:
        device = resolve_device(args.device)
    except DeviceError as error:
        raise UsageError(str(error)) from None
    # fp16 on the CPU (planning for a GPU without native bf16 from a machine without one): autocast to bf16
    # instead, which keeps the same two bytes per activation
    precision = "bf16" if device.type == "cpu" and args.precision == "fp16" else choose_precision(args.precision, device)
    torch.manual_seed(0)
    options = ModelOptions(args.mode, args.config, decoder=args.decoder, lora_rank=args.lora_rank,
                           lora_alpha=args.lora_alpha, backbone=args.backbone)
    model = build_training_model(options).to(device)
    model.to(memory_format=torch.channels_last)
    spec = options.spec
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
    result = {"config": args.config, "mode": options.mode, "batch_size": args.batch_size, "precision": args.precision,
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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training memory`: measure a mode's training step and print the set-up that fits a budget."""
    mem = CommandParser(prog="python -m training memory", description=__doc__.splitlines()[0])
    mem.add_argument("--config", default="full", choices=["full", "small"],
                     help="full: FetalCLIP's ViT-L/14 encoder; small: a small network for tests and the CPU")
    mem.add_argument("--mode", default="fixed", type=mode_argument, choices=MODES,
                     help="what would train (training.models.modes)")
    mem.add_argument("--backbone", help="mode baseline (which needs one): its backbone (default: none)")
    mem.add_argument("--decoder", choices=["unetr", "separable"], help="mode fixed: its decoder (default: unetr)")
    mem.add_argument("--lora-rank", type=POSITIVE, default=8, help="LoRA rank")
    mem.add_argument("--lora-alpha", type=POSITIVE, help="LoRA alpha (default: 2 x rank)")
    mem.add_argument("--batch-size", type=POSITIVE, default=32, help="frames per step on one device")
    mem.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                     help="the training autocast (fp16 is measured as bf16 on the CPU: the same bytes)")
    mem.add_argument("--device", default="cpu", help="where to measure: cpu, cuda or cuda:N")
    mem.add_argument("--budget-gib", type=number(float, above=0),
                     help="memory budget (default: the GPU's free memory; none on the CPU)")
    mem.add_argument("--accumulate", type=POSITIVE, help="micro-batches per step (default: the fewest that fit)")
    mem.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                     help="gradient checkpointing (default: only when the step does not fit otherwise)")
    mem.add_argument("--measure", type=POSITIVE, metavar="MICRO",
                     help="also run one real step of MICRO frames and compare its measured peak with the estimate "
                          "(default: estimate only)")
    mem.add_argument("--json", type=Path, help="also write the result here (default: printed only)")
    args = mem.parse_args(argv)
    return run_command(lambda: run_memory_command(args))
