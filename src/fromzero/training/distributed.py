"""Multi-process training under ``torchrun``: process group, data sharding, reductions.

    torchrun --nproc_per_node 2 -m fromzero pretrain --config recipes/shakespeare-char.yaml --dist.strategy ddp

torchrun starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the
rendezvous address); :func:`init_distributed` reads them and joins the process group: nccl on
CUDA (each process on ``cuda:LOCAL_RANK``), gloo on CPU. ``train.batch_size`` is per process, so
a step sees ``batch_size x world_size x grad_accum_steps`` sequences; every rank draws the same
global batch from the shared seed and keeps its own rows (:func:`rank_rows`), which makes a run on
N ranks use exactly the samples a 1-process run with N x the batch uses. Rank 0 alone writes the
run directory.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fromzero.errors import FromzeroError

STRATEGIES = ("none", "ddp")
TIMEOUT_MINUTES = 10  # a rank that dies makes the others fail after this, instead of hanging


@dataclass
class DistConfig:
    """How a run spreads over processes (launch with torchrun)."""

    strategy: str = "none"
    """none (one process) | ddp (DistributedDataParallel: every rank holds the model, gradients are averaged)."""


@dataclass
class DistContext:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def init_distributed(strategy: str, device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (strategy ddp); returns the context and this rank's device."""
    if strategy not in STRATEGIES:
        raise FromzeroError(f"dist.strategy {strategy!r} is not supported (supported: {', '.join(STRATEGIES)})")
    if strategy == "none":
        return DistContext(), device
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise FromzeroError(
            f"dist.strategy {strategy} needs one process per device started by torchrun, e.g. "
            "torchrun --nproc_per_node 2 -m fromzero pretrain --config RECIPE --dist.strategy ddp"
        )
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))
    return ctx, device


def rank_rows(x: torch.Tensor, ctx: DistContext, micro_batches: int) -> torch.Tensor:
    """This rank's rows of a global batch of ``micro_batches`` chunks: in chunk j the global rows
    are [rank 0's b | rank 1's b | ...], so chunk j on N ranks is chunk j of the 1-process run."""
    if ctx.world_size == 1:
        return x
    chunks = x.chunk(micro_batches)
    return torch.cat([c.chunk(ctx.world_size)[ctx.rank] for c in chunks])


def mean_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a tensor over all ranks (a no-op in one process)."""
    if ctx.world_size == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def broadcast_text(text: str, ctx: DistContext) -> str:
    """Rank 0's string on every rank (e.g. the timestamped run directory)."""
    if ctx.world_size == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
