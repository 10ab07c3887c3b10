"""Data parallelism through PyTorch's own engine: ``torchrun`` starts the processes, this module joins
them (gloo on the CPU, NCCL on GPUs) and wraps the model in DDP or shards it with FSDP2.

Nothing here schedules work across machines itself; without ``torchrun`` (no ``WORLD_SIZE``) training
is one process and the model is left unwrapped.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and saves."""
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the processes (itself when alone)."""
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value


def is_main_process() -> bool:
    """True outside ``torchrun`` and on rank 0 inside it: the process that reports."""
    return not dist.is_initialized() or dist.get_rank() == 0


def join(device: torch.device) -> World:
    """The :class:`World` of this process; under ``torchrun`` the process group is started here (once),
    and on GPUs each process takes the GPU of its ``LOCAL_RANK``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def wrap(model: nn.Module, world: World, fsdp: bool) -> nn.Module:
    """``model`` in DDP, or sharded by FSDP2 ``fully_shard`` (each layer, then the whole) with ``fsdp``."""
    if fsdp:
        if world.size == 1:
            raise ValueError(
                "--fsdp shards over several processes: start them with torchrun --nproc-per-node N"
            )
        from torch.distributed.fsdp import fully_shard

        from neoxja.network import GPTNeoXJapaneseLayer

        # Each transformer layer its own shard group (found by type, so a peft-wrapped model works too).
        for layer in [m for m in model.modules() if isinstance(m, GPTNeoXJapaneseLayer)]:
            fully_shard(layer)
        fully_shard(model)
        return model
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def no_sync(model: nn.Module, last: bool) -> AbstractContextManager:
    """Skip DDP's gradient all-reduce on every micro-batch but the ``last`` of a step."""
    if last or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()
