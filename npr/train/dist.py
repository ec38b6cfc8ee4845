"""torch.distributed for the trainer: process group from torchrun's environment (or one plain
process), the sums the loss needs across ranks, and the model wrapper that syncs gradients.

    DDP   (strategy "ddp", gloo on CPU / NCCL on GPU): every rank holds the whole model; its
          engine decodes with that same module, so new weights need no copy.
    FSDP2 (strategy "fsdp", torch.distributed.fsdp.fully_shard): parameters are sharded; the
          engine keeps a full copy that `gather_full_state` refreshes after each update.

Both average gradients over ranks; the trainer's losses are sums over a rank's tokens divided
by the GLOBAL token count, so each rank scales its loss by world_size (`grad_scale`) and the
synced gradient is the gradient of the whole batch's loss.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None   # None: single process, no process group
    owns_group: bool = False     # init_distributed created the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """A new tensor: the sum of t over ranks (t itself is not modified)."""
        out = t.detach().clone()
        if self.distributed:
            dev = out.device
            moved = out.to(self.device) if self.backend == "nccl" else out
            tdist.all_reduce(moved, op=tdist.ReduceOp.SUM)
            out = moved.to(dev)
        return out

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        if self.distributed:
            moved = out.to(self.device) if self.backend == "nccl" else out
            tdist.all_reduce(moved, op=tdist.ReduceOp.MAX)
            out = moved.to(t.device)
        return out

    def sum_floats(self, *xs: float) -> list[float]:
        return [float(v) for v in self.all_reduce_sum(torch.tensor(xs, dtype=torch.float64))]

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
            self.owns_group = False


def init_distributed(backend: str = "auto", device: str = "auto") -> DistContext:
    """From torchrun's RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR/PORT); one plain process when
    they are absent. backend "auto": NCCL when CUDA is used, else gloo. device "auto": cuda:
    LOCAL_RANK when CUDA is available, else cpu."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"dist backend must be auto | gloo | nccl, got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1 and not tdist.is_initialized():
        return DistContext(device=dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("dist backend nccl needs CUDA devices; use gloo on CPU")
    owns = False
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, rank=rank, world_size=world)
        owns = True
    return DistContext(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local,
                       device=dev, backend=tdist.get_backend(), owns_group=owns)


def wrap_model(model: nn.Module, ctx: DistContext, strategy: str = "ddp") -> nn.Module:
    """The module the trainer runs forward/backward through. Single process: model itself."""
    if strategy not in STRATEGIES:
        raise ValueError(f"dist strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(model, "layers", []):
        fully_shard(layer)
    fully_shard(model)
    return model


def grad_scale(ctx: DistContext) -> float:
    """Factor on each rank's loss so that the ranks' averaged gradient is the batch's gradient."""
    return float(ctx.world_size)


@contextlib.contextmanager
def no_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for this backward (gradient accumulation); FSDP2 and plain
    modules: no-op (FSDP2 reduce-scatters every backward)."""
    if enabled and hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and hasattr(module, "no_sync") else module


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: full tensor}; FSDP2 DTensors are all-gathered (every rank must call)."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t
    return out


def set_threads(ctx: DistContext) -> int:
    """Ranks sharing one CPU split its cores: torch threads = cores // local ranks, unless
    OMP_NUM_THREADS is set (torchrun sets it to 1). Returns torch.get_num_threads()."""
    if ctx.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(ctx.world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    elif "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    return torch.get_num_threads()
