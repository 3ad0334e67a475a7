"""init_distributed(): torchrun's environment -> process groups (tp inside, dp across) -> ParallelState."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import device as _device

logger = logging.getLogger(__name__)


@dataclass
class ParallelState:
    device: torch.device
    backend: str
    rank: int
    world_size: int
    tp_size: int
    tp_rank: int
    tp_group: object | None
    dp_size: int
    dp_rank: int
    dp_group: object | None
    local_rank: int = 0
    tp_ranks: tuple[int, ...] = field(default=(0,))
    dp_ranks: tuple[int, ...] = field(default=(0,))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} device={self.device} backend={self.backend} "
            f"tp={self.tp_rank}/{self.tp_size} dp={self.dp_rank}/{self.dp_size}"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tp_size(tp_size: int, world_size: int) -> None:
    """Raise a ValueError naming the valid sizes when tp_size cannot split world_size."""
    if not isinstance(tp_size, int) or tp_size < 1 or world_size % tp_size:
        raise ValueError(
            f"tp_size={tp_size!r} must be a positive divisor of the world size {world_size} "
            f"(world = tp x dp); use one of {divisors(world_size)} or change --nproc_per_node"
        )


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def group_layout(world_size: int, tp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """TP groups of contiguous ranks (one node's cards) and the strided DP groups across them."""
    dp_size = world_size // tp_size
    tp_groups = [list(range(d * tp_size, (d + 1) * tp_size)) for d in range(dp_size)]
    dp_groups = [list(range(t, world_size, tp_size)) for t in range(tp_size)]
    return tp_groups, dp_groups


def init_distributed(
    tp_size: int | None = None, *, backend: str | None = None, timeout_s: float | None = None
) -> ParallelState:
    """Read torchrun's environment (or run as a single process), pick device and backend, build tp/dp groups.

    ``tp_size=None`` means all ranks form one tensor-parallel group. Reuses a process group that
    already exists. On Ascend, HCCL defaults are exported before the group is created.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    tp_size = world_size if tp_size is None else tp_size
    check_tp_size(tp_size, world_size)  # before any collective: every rank raises the same error

    kind = _device.device_type()
    if backend is None:
        backend = _device.backend_for(kind)
    if backend == "gloo" and kind != "cpu":
        kind = "cpu"  # gloo moves CPU tensors; keep the model where the backend can reach it
    if kind == "npu":
        applied = _device.apply_hccl_defaults()
        if applied:
            logger.info("HCCL defaults applied: %s", applied)
    dev = _device.local_device(kind, local_rank)

    if not dist.is_initialized():
        kwargs = {"backend": backend, "rank": rank, "world_size": world_size}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" not in os.environ and world_size == 1:
            kwargs["store"] = dist.HashStore()
        if kind != "cpu":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    else:
        backend = dist.get_backend()

    tp_groups, dp_groups = group_layout(world_size, tp_size)
    tp_group = dp_group = None
    # new_group is collective over the world: every rank creates every group in the same order.
    for ranks in tp_groups:
        g = dist.new_group(ranks) if world_size > 1 else dist.group.WORLD
        if rank in ranks:
            tp_group, tp_ranks = g, tuple(ranks)
    for ranks in dp_groups:
        g = dist.new_group(ranks) if world_size > 1 else dist.group.WORLD
        if rank in ranks:
            dp_group, dp_ranks = g, tuple(ranks)

    state = ParallelState(
        device=dev,
        backend=backend,
        rank=rank,
        world_size=world_size,
        tp_size=tp_size,
        tp_rank=rank % tp_size,
        tp_group=tp_group,
        dp_size=world_size // tp_size,
        dp_rank=rank // tp_size,
        dp_group=dp_group,
        local_rank=local_rank,
        tp_ranks=tp_ranks,
        dp_ranks=dp_ranks,
    )
    logger.info("initialised %s", state.describe())
    return state


def single_rank_state(device: torch.device | str = "cpu") -> ParallelState:
    """A tp=1 state with no process group, for offline tools and the unconverted reference."""
    return ParallelState(
        device=torch.device(device), backend="none", rank=0, world_size=1, tp_size=1, tp_rank=0,
        tp_group=None, dp_size=1, dp_rank=0, dp_group=None,
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
