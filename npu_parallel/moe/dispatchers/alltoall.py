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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from npu_parallel.moe.dispatchers.base import Dispatcher, Routed
from npu_parallel.moe.dispatchers.static import StaticDispatcher, capacity_rows
from npu_parallel.moe.experts import ExpertMatmul, LocalExperts
from npu_parallel.moe.grouped_gemm import grouped_mm
from npu_parallel.parallel.collectives import all_to_all, all_to_all_counts
from npu_parallel.parallel.state import TRIVIAL, Group


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


class AllToAllDispatcher(Dispatcher, name="alltoall", order=40):
    """Dropless, one host sync per layer: the exchanged per-expert slot counts, which size the all-to-all
    and the grouped GEMM. Picked by ``moe_impl="auto"`` when ep_size > tp_size. Float keys where it sorts."""

    cross_group = True

    def __init__(self) -> None:
        super().__init__()
        self.tp, self.ep = TRIVIAL, TRIVIAL

    def bind(self, tp: Group, ep: Group) -> None:
        self.tp, self.ep = tp, ep

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> Routed:
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
        rows = all_to_all(x[lo:hi].index_select(0, tokens), ep, recv, send)  # [R, H] by source, then expert
        # group the received rows by local expert (sources interleave): a stable sort of float keys
        ids = torch.arange(n_local, device=x.device).repeat(ep.size)  # [ep * E_local]
        keys = ids.repeat_interleave(recv_dev.reshape(-1), output_size=sum(recv))  # [R]
        regroup = torch.sort(keys.to(torch.float32), stable=True).indices  # [R]
        counts = [sum(col) for col in zip(*recv_host, strict=True)]  # [E_local] rows per local expert
        matmul = _local_matmul(x.device, counts, recv_dev.sum(0))
        w = weights[lo:hi].reshape(-1).index_select(0, order)  # [S]
        return Routed(rows.index_select(0, regroup), matmul, _Combine(lo, hi - lo, tokens, w, regroup, send, recv, x))

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        c: _Combine = routed.state
        y = torch.zeros_like(y).index_copy(0, c.regroup, y)  # [R, H] back in arrival order
        back = all_to_all(y, self.ep, c.send, c.recv)  # [S, H] in send order
        back = (back * c.weights.unsqueeze(-1)).to(c.x.dtype)
        share = c.x.new_zeros(c.share, c.x.shape[-1]).index_add(0, c.tokens, back)  # [T_l, H]
        return _place(share, c.lo, c.x.shape[0])  # [T, H], partial: this tp rank's share


@dataclass
class _StaticCombine:
    lo: int
    rows: torch.Tensor  # [S] each slot's row of the send buffer (E * C: the trash row)
    weights: torch.Tensor  # [T_l, k]
    t: int  # T
    dtype: torch.dtype


class AllToAllStaticDispatcher(StaticDispatcher, name="alltoall_static", order=41):
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
    ) -> None:
        super().__init__(
            capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity
        )
        self.tp, self.ep = TRIVIAL, TRIVIAL

    def bind(self, tp: Group, ep: Group) -> None:
        self.tp, self.ep = tp, ep

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> Routed:
        t, k = indices.shape
        n, n_local, ep = experts.num_experts, experts.num_local, self.ep
        lo, hi = token_share(t, self.tp)
        c = self.capacity(-(-t // self.tp.size), k, n)  # the same on every tp rank
        keys = indices[lo:hi].reshape(-1)  # [S] global expert
        rows, self.stats["dropped"] = capacity_rows(keys, n, c)
        slots = x[lo:hi].unsqueeze(1).expand(hi - lo, k, x.shape[-1]).reshape(-1, x.shape[-1])  # [S, H]
        buf = x.new_zeros(n * c + 1, x.shape[-1]).index_add(0, rows, slots)[:-1]  # [E * C, H], by destination
        got = all_to_all(buf, ep).view(ep.size, n_local, c, -1)  # [ep (source), E_local, C, H]
        got = got.transpose(0, 1).reshape(n_local, ep.size * c, -1)  # [E_local, ep * C, H]
        return Routed(got, torch.bmm, _StaticCombine(lo, rows, weights[lo:hi], t, x.dtype))

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        s: _StaticCombine = routed.state
        n_local, h = y.shape[0], y.shape[-1]
        y = y.view(n_local, self.ep.size, -1, h).transpose(0, 1).reshape(-1, h)  # [ep * E_local * C, H] by source
        y = all_to_all(y, self.ep)  # [E * C, H] my slots' outputs
        y = torch.cat([y, y.new_zeros(1, h)]).index_select(0, s.rows)  # [S, H]; the trash row reads zero
        share = (y * s.weights.reshape(-1, 1)).to(s.dtype).view(*s.weights.shape, h).sum(dim=1)  # [T_l, H]
        return _place(share, s.lo, s.t)
