"""Multi-process training under ``torchrun``: process group, data sharding, reductions, FSDP2.

:func:`init_distributed` joins the group torchrun set up (nccl on CUDA, each process on
``cuda:LOCAL_RANK``; gloo on CPU). ``train.batch_size`` is per process; every rank draws the same
global batch from the shared seed and keeps its own rows (:func:`rank_rows`), so N ranks use
exactly the samples of one process with N x the batch. Rank 0 alone writes the run directory.
User guide: docs/distributed.md.
"""

from __future__ import annotations

import datetime
from pathlib import Path
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fromzero.errors import FromzeroError

STRATEGIES = ("none", "ddp", "fsdp")
CHECKPOINT_FORMATS = ("full", "sharded")
SHARDED_DIR = "sharded"  # inside a checkpoint directory: torch.distributed.checkpoint files
TIMEOUT_ENV = "FROMZERO_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600  # a rank that dies makes the others fail after this, instead of hanging


@dataclass
class DistConfig:
    """How a run spreads over processes (launch with torchrun)."""

    strategy: str = "none"
    """none (one process) | ddp (DistributedDataParallel: every rank holds the model, gradients are averaged) | fsdp (FSDP2: parameters, gradients and optimizer state sharded across ranks)."""
    checkpoint: str = "full"
    """fsdp checkpoints: full (rank 0 gathers weights + optimizer into model.safetensors + trainer_state.pt; needs the whole model in rank 0's CPU memory) | sharded (each rank writes its shards with torch.distributed.checkpoint into <checkpoint>/sharded/, nothing gathered; needs a filesystem all ranks share). Both resume at any world size, or in one process; ddp and none always write full checkpoints."""

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise FromzeroError(f"dist.strategy {self.strategy!r} is not supported (supported: {', '.join(STRATEGIES)})")
        if self.checkpoint not in CHECKPOINT_FORMATS:
            raise FromzeroError(f"dist.checkpoint must be one of {', '.join(CHECKPOINT_FORMATS)}, got {self.checkpoint!r}")


@dataclass
class DistContext:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(strategy: str, device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (strategy ddp / fsdp, already validated by the
    run's config); returns the context and this rank's device."""
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    return ctx, device


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks before failing (env FROMZERO_DIST_TIMEOUT,
    seconds; default 600). A rank that died then ends the run with an error instead of a hang."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise FromzeroError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


_COLLECTIVE_FAILURES = ("connection closed by peer", "connection reset", "broken pipe", "timed out", "timeout",
                        "nccl", "gloo", "socket", "watchdog")


def is_collective_failure(e: BaseException) -> bool:
    """Whether an exception comes from a collective whose peers are gone (not a bug in the step)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(marker in text for marker in _COLLECTIVE_FAILURES)


def lost_rank_error(e: BaseException, ctx: DistContext) -> FromzeroError:
    """A collective that failed because another rank died or the network broke, as one line."""
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return FromzeroError(
        f"rank {ctx.rank} lost contact with the other {ctx.world_size - 1} rank(s) (a process died, "
        f"or the network failed or timed out after {collective_timeout().total_seconds():.0f} s: "
        f"{detail}); the last checkpoint is intact: restart with --resume"
    )


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


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path) -> None:
    """Every rank writes its own shards of the weights (and optimizer state) under ``path``
    (a collective); rank 0 also writes the ``.metadata`` index that maps each tensor's pieces
    to files. Pass optimizer=None before the first step (see :func:`full_optimizer_state`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))


def check_sharded(path) -> None:
    """Refuse a sharded checkpoint whose index names a shard file that is missing or shorter
    than the index says (a copy that lost files, a crash mid-write)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # missing or unreadable .metadata
        raise FromzeroError(f"sharded checkpoint {path} has no readable index (.metadata): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise FromzeroError(f"sharded checkpoint {path} is missing shard {name} (written by another rank?); cannot resume from it")
        if file.stat().st_size < size:
            raise FromzeroError(f"sharded checkpoint {path}: shard {name} is truncated ({file.stat().st_size} of {size} bytes)")


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path) -> None:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``), sharded or not: DCP reads
    whichever pieces this rank's tensors need, so any world size (or one process) resumes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    check_sharded(path)
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # a checkpoint of another model, or a damaged one
        raise FromzeroError(f"cannot load sharded checkpoint {path}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__}") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_sharded_checkpoint(directory: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The loader of FSDP-sharded checkpoints (config.json + sharded/), registered in
    :mod:`fromzero.checkpoint`: the full model, in one process."""
    from fromzero.checkpoint import CONFIG_FILE, read_json
    from fromzero.models import build_model

    config = read_json(Path(directory) / CONFIG_FILE, "model config")
    try:
        model = build_model(config)
    except FromzeroError as e:
        raise FromzeroError(f"{Path(directory) / CONFIG_FILE}: {e}") from None
    load_sharded(model, None, Path(directory) / SHARDED_DIR)
    return model.to(device).eval()
