"""Autograd-aware collectives: Megatron's conjugate f/g pairs over the tensor-parallel group, all-to-all over ep.

Every public function takes the group as a :class:`~npu_parallel.parallel.state.Group` handle and is the
identity when the group has one rank, so a tp=1 model runs without collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from npu_parallel.parallel.state import Group


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(_size(group), dim=-1)[_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce backward (enter a region where ranks hold different shards)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward, identity backward (leave the region: sum the partial results)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim forward; keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    """Keep this rank's slice of the last dim forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last(grad, ctx.group), None


class _ReduceGradColumns(torch.autograd.Function):
    """Identity forward; backward all-reduces only columns [start:] of the gradient.

    For a replicated projection whose output feeds both a sharded consumer (its gradient is already
    full) and a replicated consumer used by every rank's shard (its gradient is partial per rank).
    """

    @staticmethod
    def forward(ctx, x, start, group):
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        cols = grad[..., ctx.start :].contiguous()
        grad[..., ctx.start :] = _all_reduce(cols, ctx.group)
        return grad, None, None


def copy_to_tp(x: torch.Tensor, tp: Group) -> torch.Tensor:
    return x if tp.size == 1 else _CopyToTP.apply(x, tp.group)


def reduce_from_tp(x: torch.Tensor, tp: Group) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp.group)


def gather_from_tp(x: torch.Tensor, tp: Group) -> torch.Tensor:
    return x if tp.size == 1 else _GatherFromTP.apply(x, tp.group)


def scatter_to_tp(x: torch.Tensor, tp: Group) -> torch.Tensor:
    return x if tp.size == 1 else _ScatterToTP.apply(x, tp.group)


def reduce_grad_columns(x: torch.Tensor, start: int, tp: Group) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceGradColumns.apply(x, start, tp.group)


def reduce_grad(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Identity forward, all-reduce backward: makes a replicated value's gradient the full one."""
    return copy_to_tp(x, tp)


def _all_to_all(x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group) -> torch.Tensor:
    """Rows ``[sum(in_splits), ...]`` -> ``[sum(out_splits), ...]``; None splits: equal parts."""
    x = x.contiguous()
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty(rows, *x.shape[1:])
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """All-to-all of rows forward; the reverse all-to-all (splits swapped) backward."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, group: Group, out_splits: list[int] | None = None, in_splits: list[int] | None = None
) -> torch.Tensor:
    """``all_to_all_single`` with autograd over ``group``: ``in_splits[r]`` rows of ``x`` go to rank r,
    ``out_splits[r]`` rows come from it (host lists; None: equal parts). The identity on a group of one rank."""
    return x if group.size == 1 else _AllToAll.apply(x, out_splits, in_splits, group.group)


def all_to_all_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """Exchange per-destination counts ``[size, n]`` (no autograd): row r of the result came from rank r."""
    return counts if group.size == 1 else _all_to_all(counts, None, None, group.group)


class InFlight:
    """An all-to-all started by :func:`all_to_all_start` and not yet waited on (forward), and the reverse
    all-to-all its backward started (``grad_work`` into ``grad_rows``), waited on by the start's backward."""

    def __init__(self, group, out_splits: list[int] | None, in_splits: list[int] | None) -> None:
        self.group, self.out_splits, self.in_splits = group, out_splits, in_splits
        self.work: dist.Work | None = None
        self.sent: torch.Tensor | None = None  # the send buffer, kept alive until the wait
        self.grad_work: dist.Work | None = None
        self.grad_sent: torch.Tensor | None = None
        self.grad_rows: torch.Tensor | None = None  # the input's gradient, filled when grad_work is done


def _start(x: torch.Tensor, out_splits, in_splits, group) -> tuple[torch.Tensor, torch.Tensor, dist.Work]:
    """``all_to_all_single(async_op=True)``: (send buffer, receive buffer, work); the buffer is filled at wait."""
    x = x.contiguous()
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty(rows, *x.shape[1:])
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    assert work is not None  # async_op=True always returns a Work
    return x, out, work


class _AllToAllStart(torch.autograd.Function):
    """Start the all-to-all (forward); backward waits for the reverse all-to-all that the wait's backward
    started, so autograd runs whatever was computed between start and wait in the forward (the shared
    experts' backward: later nodes run first) while the gradient rows travel."""

    @staticmethod
    def forward(ctx, x, flight):
        ctx.flight = flight
        flight.sent, rows, flight.work = _start(x, flight.out_splits, flight.in_splits, flight.group)
        return rows  # not yet filled: only _AllToAllWait reads it, after the wait

    @staticmethod
    def backward(ctx, grad):
        f = ctx.flight
        f.grad_work.wait()  # grad: the rows' gradient, already sent back by the wait's backward
        rows, f.grad_work, f.grad_sent, f.grad_rows = f.grad_rows, None, None, None
        return rows, None


class _AllToAllWait(torch.autograd.Function):
    """Wait for the all-to-all (forward); backward starts the reverse all-to-all (splits swapped)."""

    @staticmethod
    def forward(ctx, rows, flight):
        ctx.flight = flight
        flight.work.wait()
        flight.work, flight.sent = None, None
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        f = ctx.flight
        f.grad_sent, f.grad_rows, f.grad_work = _start(grad, f.in_splits, f.out_splits, f.group)
        return grad, None  # passed on to _AllToAllStart's backward, which waits and returns the input's gradient


def all_to_all_start(
    x: torch.Tensor, group: Group, out_splits: list[int] | None = None, in_splits: list[int] | None = None
) -> tuple[torch.Tensor, InFlight | None]:
    """:func:`all_to_all` started asynchronously: ``(rows, flight)``; ``rows`` may be read only after
    ``all_to_all_wait(rows, flight)``, which returns them. The same values and gradients as ``all_to_all``."""
    if group.size == 1:
        return x, None
    flight = InFlight(group.group, out_splits, in_splits)
    return _AllToAllStart.apply(x, flight), flight


def all_to_all_wait(rows: torch.Tensor, flight: InFlight | None) -> torch.Tensor:
    """The rows of an all-to-all begun by :func:`all_to_all_start`, once they have arrived."""
    return rows if flight is None else _AllToAllWait.apply(rows, flight)
