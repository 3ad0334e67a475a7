"""``moe_impl="alltoall"`` / ``"alltoall_static"``: experts spread over an ep group of several tp groups, tokens
sent to the ranks owning their experts by all-to-all and brought back weighted.

Every rank of a tp group holds the same tokens, so each tp rank dispatches only its share of them: rows
``[lo, hi)`` (``T_l = ceil(T / tp)`` each). Its combined output fills those rows of a ``[T, H]`` partial whose
other rows are zero; the MoE block's one all-reduce over tp, which sums the shared experts' partial outputs
anyway, assembles the full output (an all-gather for free). Backward mirrors it: the block's f on the input
sums the tp ranks' disjoint row gradients, so every token's gradient arrives exactly once.

Legend: T tokens of the tp group, T_l this tp rank's share, k top-k, E experts (global), ep ranks in the ep
group, E_local = E / ep experts per rank, S = T_l * k slots sent, R rows received, C capacity per (source
rank, expert), H hidden.

Overlap (``overlap_shared``, on by default; ``NPU_PARALLEL_OVERLAP_SHARED=0`` or ``overlap_shared=False`` turns it
off): the block's shared-expert work runs while the tokens' all-to-all is in flight (``dispatch_overlapped``) and
while the outputs' all-to-all is (``combine_overlapped``); the backward mirrors it (the reverse all-to-alls are
started by autograd before the shared experts' backward and waited on after it). Same ops on the same values as
without it: the results are equal bit for bit (tests/test_overlap.py).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from npu_parallel.moe.dispatchers.base import Dispatcher, Routed
from npu_parallel.moe.dispatchers.static import StaticDispatcher, capacity_rows
from npu_parallel.moe.experts import ExpertMatmul, LocalExperts
from npu_parallel.moe.grouped_gemm import grouped_mm
from npu_parallel.parallel.collectives import all_to_all, all_to_all_counts, all_to_all_start, all_to_all_wait
from npu_parallel.parallel.state import TRIVIAL, Group

T = TypeVar("T")
OVERLAP_ENV = "NPU_PARALLEL_OVERLAP_SHARED"  # "0": no overlap where the dispatcher was not told otherwise


def overlap_default(overlap_shared: bool | None) -> bool:
    """The ``overlap_shared`` option: as given, else on unless the environment turns it off."""
    if overlap_shared is None:
        return os.environ.get(OVERLAP_ENV, "1").strip().lower() not in ("0", "false", "off", "no")
    if not isinstance(overlap_shared, bool):
        raise ValueError(f"overlap_shared={overlap_shared!r}: must be True or False (None: on unless {OVERLAP_ENV}=0)")
    return overlap_shared


def _exchange(
    rows: torch.Tensor,
    group: Group,
    out_splits: list[int] | None,
    in_splits: list[int] | None,
    work: Callable[[], T],
    overlap: bool,
) -> tuple[torch.Tensor, T]:
    """``(all_to_all(rows, ...), work())``; with ``overlap``, ``work`` runs while the rows are in flight."""
    if not overlap or group.size == 1:
        return all_to_all(rows, group, out_splits, in_splits), work()
    rows, flight = all_to_all_start(rows, group, out_splits, in_splits)
    done = work()
    return all_to_all_wait(rows, flight), done


def _nothing() -> None:
    return None


def token_share(tokens: int, tp: Group) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of the tp group's tokens that this tp rank dispatches (the last share may be short)."""
    block = -(-tokens // tp.size)
    lo = min(tp.rank * block, tokens)
    return lo, min(lo + block, tokens)


def _place(y: torch.Tensor, lo: int, tokens: int) -> torch.Tensor:
    """``y [T_l, H]`` as rows ``[lo, lo + T_l)`` of a zero ``[T, H]``."""
    return F.pad(y, (0, 0, lo, tokens - lo - y.shape[0]))


def _local_matmul(device: torch.device, counts: list[int], counts_dev: torch.Tensor) -> ExpertMatmul:
    """The grouped GEMM over rows grouped by local expert: torch_npu's kernel on an NPU, ours elsewhere."""
    if device.type == "npu":
        from npu_parallel.moe.npu_ops import npu_grouped_mm, npu_ops

        ops = npu_ops()
        return lambda a, w: npu_grouped_mm(ops, a, w, counts_dev)
    offs = counts_dev.cumsum(0).to(torch.int32)
    return lambda a, w: grouped_mm(a, w, counts, offs)


class _Overlapping(Dispatcher):
    """The all-to-all dispatchers' four entry points over their ``_dispatch`` / ``_combine``, which take the work to
    overlap and whether to overlap it (plain ``dispatch`` / ``combine``: nothing, synchronously)."""

    overlap_shared = True

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> Routed:
        return self._dispatch(x, indices, weights, experts, _nothing, False)[0]

    def dispatch_overlapped(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        experts: LocalExperts,
        work: Callable[[], T],
    ) -> tuple[Routed, T]:
        return self._dispatch(x, indices, weights, experts, work, self.overlap_shared)

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        return self._combine(y, routed, _nothing, False)[0]

    def combine_overlapped(self, y: torch.Tensor, routed: Routed, work: Callable[[], T]) -> tuple[torch.Tensor, T]:
        return self._combine(y, routed, work, self.overlap_shared)

    @abc.abstractmethod
    def _dispatch(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        experts: LocalExperts,
        work: Callable[[], T],
        overlap: bool,
    ) -> tuple[Routed, T]: ...

    @abc.abstractmethod
    def _combine(
        self, y: torch.Tensor, routed: Routed, work: Callable[[], T], overlap: bool
    ) -> tuple[torch.Tensor, T]: ...


@dataclass
class _Combine:
    lo: int  # first row of this tp rank's share
    share: int  # T_l, its rows
    tokens: torch.Tensor  # [S] the token (in the share) of each sent slot, in send order
    weights: torch.Tensor  # [S] its routing weight
    regroup: torch.Tensor  # [R] received row -> its place grouped by local expert
    send: list[int]  # slots sent to each ep rank
    recv: list[int]  # rows received from each ep rank
    x: torch.Tensor  # [T, H] the input (shape and dtype of the output)


class AllToAllDispatcher(_Overlapping, name="alltoall", order=40):
    """Dropless, one host sync per layer: the exchanged per-expert slot counts, which size the all-to-all
    and the grouped GEMM. Picked by ``moe_impl="auto"`` when ep_size > tp_size. Float keys where it sorts."""

    cross_group = True

    def __init__(self, *, overlap_shared: bool | None = None) -> None:
        super().__init__()
        self.tp, self.ep = TRIVIAL, TRIVIAL
        self.overlap_shared = overlap_default(overlap_shared)

    def bind(self, tp: Group, ep: Group) -> None:
        self.tp, self.ep = tp, ep

    def options(self) -> dict:
        return {} if self.overlap_shared else {"overlap_shared": False}

    def _dispatch(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        experts: LocalExperts,
        work: Callable[[], T],
        overlap: bool,
    ) -> tuple[Routed, T]:
        t, k = indices.shape
        n_local, ep = experts.num_local, self.ep
        lo, hi = token_share(t, self.tp)
        flat = indices[lo:hi].reshape(-1)  # [S] global expert of each slot
        # sorted by global expert: grouped by destination ep rank, then by expert there
        order = torch.sort(flat.to(torch.float32), stable=True).indices  # [S]
        send_dev = flat.new_zeros(experts.num_experts).scatter_add_(0, flat, torch.ones_like(flat))
        send_dev = send_dev.view(ep.size, n_local)  # [ep, E_local] slots for each rank's experts
        recv_dev = all_to_all_counts(send_dev, ep)  # [ep, E_local] rows each rank sends to my experts
        send_host, recv_host = torch.stack([send_dev, recv_dev]).tolist()  # the one host sync
        send, recv = [sum(r) for r in send_host], [sum(r) for r in recv_host]
        tokens = torch.div(order, k, rounding_mode="floor")  # [S]
        # [R, H] by source, then expert; the shared experts run while the rows are in flight
        rows, done = _exchange(x[lo:hi].index_select(0, tokens), ep, recv, send, work, overlap)
        # group the received rows by local expert (sources interleave): a stable sort of float keys
        ids = torch.arange(n_local, device=x.device).repeat(ep.size)  # [ep * E_local]
        keys = ids.repeat_interleave(recv_dev.reshape(-1), output_size=sum(recv))  # [R]
        regroup = torch.sort(keys.to(torch.float32), stable=True).indices  # [R]
        counts = [sum(col) for col in zip(*recv_host, strict=True)]  # [E_local] rows per local expert
        matmul = _local_matmul(x.device, counts, recv_dev.sum(0))
        w = weights[lo:hi].reshape(-1).index_select(0, order)  # [S]
        state = _Combine(lo, hi - lo, tokens, w, regroup, send, recv, x)
        return Routed(rows.index_select(0, regroup), matmul, state), done

    def _combine(self, y: torch.Tensor, routed: Routed, work: Callable[[], T], overlap: bool) -> tuple[torch.Tensor, T]:
        c: _Combine = routed.state
        y = torch.zeros_like(y).index_copy(0, c.regroup, y)  # [R, H] back in arrival order
        back, done = _exchange(y, self.ep, c.send, c.recv, work, overlap)  # [S, H] in send order
        back = (back * c.weights.unsqueeze(-1)).to(c.x.dtype)
        share = c.x.new_zeros(c.share, c.x.shape[-1]).index_add(0, c.tokens, back)  # [T_l, H]
        return _place(share, c.lo, c.x.shape[0]), done  # [T, H], partial: this tp rank's share


@dataclass
class _StaticCombine:
    lo: int
    rows: torch.Tensor  # [S] each slot's row of the send buffer (E * C: the trash row)
    weights: torch.Tensor  # [T_l, k]
    t: int  # T
    dtype: torch.dtype


class AllToAllStaticDispatcher(_Overlapping, StaticDispatcher, name="alltoall_static", order=41):
    """Fixed shapes, no host sync (graph mode): an ``[E, C, H]`` send buffer, equal all-to-all splits, batched
    matmuls on ``[E_local, ep * C, H]``. Dropless by default (``C = T_l``); ``capacity_factor`` as for
    ``"static"``. Every rank of the ep group must pass the same number of tokens (fixed shapes)."""

    cross_group = True

    def __init__(
        self,
        *,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int | None = None,
        overlap_shared: bool | None = None,
    ) -> None:
        super().__init__(
            capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity
        )
        self.tp, self.ep = TRIVIAL, TRIVIAL
        self.overlap_shared = overlap_default(overlap_shared)

    def bind(self, tp: Group, ep: Group) -> None:
        self.tp, self.ep = tp, ep

    def options(self) -> dict:
        return {**super().options(), **({} if self.overlap_shared else {"overlap_shared": False})}

    def _dispatch(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        experts: LocalExperts,
        work: Callable[[], T],
        overlap: bool,
    ) -> tuple[Routed, T]:
        t, k = indices.shape
        n, n_local, ep = experts.num_experts, experts.num_local, self.ep
        lo, hi = token_share(t, self.tp)
        c = self.capacity(-(-t // self.tp.size), k, n)  # the same on every tp rank
        keys = indices[lo:hi].reshape(-1)  # [S] global expert
        rows, self.stats["dropped"] = capacity_rows(keys, n, c)
        slots = x[lo:hi].unsqueeze(1).expand(hi - lo, k, x.shape[-1]).reshape(-1, x.shape[-1])  # [S, H]
        buf = x.new_zeros(n * c + 1, x.shape[-1]).index_add(0, rows, slots)[:-1]  # [E * C, H], by destination
        got, done = _exchange(buf, ep, None, None, work, overlap)
        got = got.view(ep.size, n_local, c, -1)  # [ep (source), E_local, C, H]
        got = got.transpose(0, 1).reshape(n_local, ep.size * c, -1)  # [E_local, ep * C, H]
        return Routed(got, torch.bmm, _StaticCombine(lo, rows, weights[lo:hi], t, x.dtype)), done

    def _combine(self, y: torch.Tensor, routed: Routed, work: Callable[[], T], overlap: bool) -> tuple[torch.Tensor, T]:
        s: _StaticCombine = routed.state
        n_local, h = y.shape[0], y.shape[-1]
        y = y.view(n_local, self.ep.size, -1, h).transpose(0, 1).reshape(-1, h)  # [ep * E_local * C, H] by source
        y, done = _exchange(y, self.ep, None, None, work, overlap)  # [E * C, H] my slots' outputs
        y = torch.cat([y, y.new_zeros(1, h)]).index_select(0, s.rows)  # [S, H]; the trash row reads zero
        share = (y * s.weights.reshape(-1, 1)).to(s.dtype).view(*s.weights.shape, h).sum(dim=1)  # [T_l, H]
        return _place(share, s.lo, s.t), done
