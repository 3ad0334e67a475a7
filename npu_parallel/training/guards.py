"""Decisions every rank must take alike: an input error seen by some ranks, a non-finite step, a tp group whose
ranks were handed different batches. Each is reduced over the ranks, so no rank raises while others wait."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.parallel.data_parallel import local_tensor
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.errors import ConfigError

T = TypeVar("T")

# odd multipliers of the position (mod 2**31 - 1) make the hash see order, not only the multiset of ids
_HASH_PRIME = 2_147_483_647
_HASH_MULT = 1_000_003


def _distributed(state: ParallelState) -> bool:
    return state.world_size > 1 and dist.is_initialized()


def agree(fn: Callable[[], T], state: ParallelState) -> T:
    """``fn()`` on every rank; when it raises on any rank, every rank raises (none is left waiting).

    A rank that failed raises its own exception; the others raise the failing rank's ConfigError (with its rank
    named), or a RuntimeError naming the rank and the exception of any other failure.
    """
    result, failure = None, None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, once every rank has learnt of it
        failure = exc
    if _distributed(state):
        mine = None
        if isinstance(failure, ConfigError):
            mine = (True, str(failure))
        elif failure is not None:
            mine = (False, f"{type(failure).__name__}: {failure}")
        everyone: list = [None] * state.world_size
        dist.all_gather_object(everyone, mine)
        failed = [(r, f) for r, f in enumerate(everyone) if f is not None]
        if failed and failure is None:
            rank, (is_config, message) = failed[0]
            if is_config:
                raise ConfigError(f"{message} (seen on rank {rank})")
            raise RuntimeError(f"rank {rank} failed while checking the run's inputs ({message}); see its output")
    if failure is not None:
        raise failure
    return result  # type: ignore[return-value]


def any_rank(flag: bool, state: ParallelState) -> bool:
    """True on every rank when ``flag`` is True on any: an int32 MAX all-reduce over the world, on the device."""
    t = torch.tensor([int(flag)], dtype=torch.int32, device=state.device)
    if _distributed(state):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def step_is_finite(loss: float, grad_norm: torch.Tensor, state: ParallelState) -> bool:
    """Whether the loss and the gradient norm are finite on every rank (the same answer everywhere)."""
    bad = not math.isfinite(loss) or not bool(torch.isfinite(grad_norm).all())
    return not any_rank(bad, state)


def nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of this rank's first parameter holding NaN or Inf, if any (no collective)."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(local_tensor(p).detach()).all()):  # this rank's rows under data_parallel
            return name
    return None


def weights_are_finite(model: nn.Module, state: ParallelState) -> bool:
    """Whether every parameter on every rank is finite (checked before a checkpoint is written)."""
    return not any_rank(nonfinite_parameter(model) is not None, state)


def batch_hash(input_ids: torch.Tensor) -> torch.Tensor:
    """An int64 fingerprint of a batch (its shape and ids, in order), computed on the batch's device."""
    ids = input_ids.reshape(-1).to(torch.int64)
    positions = torch.arange(ids.numel(), device=ids.device, dtype=torch.int64)
    weights = (positions * _HASH_MULT + 1) % _HASH_PRIME
    digest = ((ids + 1) * weights).remainder(_HASH_PRIME).sum()
    return torch.stack([digest, torch.tensor(ids.numel(), device=ids.device)])


def check_same_batch(input_ids: torch.Tensor, state: ParallelState, step: int) -> None:
    """Raise on every rank when the ranks of a tp group hold different input ids (every tp rank computes the
    same sequences' slices, so each must see the same batch). All-gathers the fingerprint on the tp group, then
    reduces the verdict over the world so the other groups raise too instead of waiting."""
    mismatch: list[int] = []
    if state.tp_size > 1 and _distributed(state):
        mine = batch_hash(input_ids)
        gathered = [torch.empty_like(mine) for _ in range(state.tp_size)]
        dist.all_gather(gathered, mine, group=state.tp_group)
        reference = gathered[0]
        mismatch = [state.tp_ranks[i] for i, h in enumerate(gathered) if not torch.equal(h, reference)]
    if not any_rank(bool(mismatch), state):
        return
    if mismatch:
        raise RuntimeError(
            f"step {step}: the ranks of tensor-parallel group {list(state.tp_ranks)} hold different input ids "
            f"(global ranks {mismatch} differ from rank {state.tp_ranks[0]}); every rank of a tp group must be "
            f"given the same batch: shard data by dp rank only (state.dp_rank, state.dp_size)"
        )
    raise RuntimeError(
        f"step {step}: another tensor-parallel group's ranks hold different input ids (see its ranks' errors); "
        f"every rank of a tp group must be given the same batch"
    )
