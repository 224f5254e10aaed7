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

STRATEGIES = ("none", "ddp", "fsdp")
TIMEOUT_MINUTES = 10  # a rank that dies makes the others fail after this, instead of hanging


@dataclass
class DistConfig:
    """How a run spreads over processes (launch with torchrun)."""

    strategy: str = "none"
    """none (one process) | ddp (DistributedDataParallel: every rank holds the model, gradients are averaged) | fsdp (FSDP2: parameters, gradients and optimizer state sharded across ranks)."""


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


# ---------------------------------------------------------------------------------------------
# FSDP2


def shard_model(model: torch.nn.Module, device: torch.device, ctx: DistContext, dtype: str) -> None:
    """FSDP2 ``fully_shard`` on every transformer block, then the whole model (in place).

    Each block's parameters are gathered just before it runs and freed after; gradients are
    reduce-scattered. With bf16 the gathered parameters are bf16 and gradients reduce in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" \
        else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module, tied_head: bool) -> dict[str, torch.Tensor]:
    """The unsharded weights (a collective: every rank calls it), as a plain checkpoint stores them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    if tied_head:
        state.pop("lm_head.weight", None)  # stored once, as transformer.wte.weight
    return {k: v.contiguous() for k, v in state.items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded (a collective).

    Before the first step there is no state, and nothing to save: get_optimizer_state_dict
    would create it by running a zero-gradient step, which counts as AdamW's step 1 (the first
    real update would then be 0.74 x lr). An empty marker is saved instead.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:
        return {"state": {}, "param_groups": []}
    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a name-keyed full optimizer state into any model (sharded or not)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not state.get("state"):
        return  # saved before the first step: a fresh optimizer is the same

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
