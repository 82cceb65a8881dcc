"""torch.distributed plumbing: one process group for a whole command, rank 0 does the single-copy work.

Under `torchrun` (WORLD_SIZE/RANK/LOCAL_RANK set) every command joins one process group (NCCL on GPUs,
gloo on the CPU) and keeps it for its whole run, so `reproduce` can prepare data on rank 0 while the
others wait, train every mode with DDP, and score on rank 0. Without torchrun everything is one process
and every collective here is a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from algorithm.runtime import resolve_device

# Rank 0 alone prepares data (close to an hour for the real release on a small CPU) or scores whole test
# cases while the other ranks wait at a barrier; the default collective timeout (10 to 30 min) would end the run there.
BARRIER_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup_distributed(device_name: str) -> DistContext:
    """This process's place: joins the torchrun process group once (later calls reuse it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not initialised():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=BARRIER_TIMEOUT)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistContext(rank, world, local_rank, device)


def shutdown() -> None:
    if initialised():
        dist.destroy_process_group()


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's `obj` (picklable, small) on rank 0 in rank order; None on the other ranks."""
    if ctx.world <= 1:
        return [obj]
    gathered: list[Any] | None = [None] * ctx.world if ctx.main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def reduce_device(ctx: DistContext) -> torch.device:
    """Where collectives' tensors live: the GPU for NCCL, the CPU for gloo."""
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
