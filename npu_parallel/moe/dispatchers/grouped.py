"""``moe_impl="grouped"``: slots sorted by local expert, each expert on exactly its contiguous rows (grouped GEMM).

Shapes: T tokens, k top-k, E_local this rank's experts, R local slots (rows computed), H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npu_parallel.moe.dispatchers.base import ANY_DEVICE, Dispatcher, Routed, local_keys, slot_counts
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.moe.grouped_gemm import grouped_mm


@dataclass
class _Combine:
    tokens: torch.Tensor  # [R] the token of each row
    weights: torch.Tensor  # [R] the routing weight of each row
    x: torch.Tensor  # [T, H] the input (shape and dtype of the output)


class GroupedDispatcher(Dispatcher, name="grouped", order=0):
    """The default off-NPU: one host sync per layer (the per-expert row counts the grouped GEMM takes).

    Float keys for the sort: an integer sort falls back to the AI-CPU on Ascend.
    """

    auto_for = (ANY_DEVICE,)

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> Routed:
        k, n_local = indices.shape[-1], experts.num_local
        keys = local_keys(indices, experts).reshape(-1)  # [T*k], E_local for other ranks' slots
        order = torch.sort(keys.to(torch.float32), stable=True).indices  # [T*k] local slots first, by expert
        counts_dev = slot_counts(keys, n_local + 1)  # [E_local + 1]
        counts = counts_dev.tolist()[:n_local]  # the one host sync
        order = order[: sum(counts)]  # [R]
        offs = counts_dev[:n_local].cumsum(0).to(torch.int32)
        tokens = torch.div(order, k, rounding_mode="floor")  # [R]
        rows = x.index_select(0, tokens)  # [R, H]
        w = weights.reshape(-1).index_select(0, order)  # [R]
        return Routed(rows, lambda a, b: grouped_mm(a, b, counts, offs), _Combine(tokens, w, x))

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        c: _Combine = routed.state
        y = (y * c.weights.unsqueeze(-1)).to(c.x.dtype)  # [R, H]
        return torch.zeros_like(c.x).index_add(0, c.tokens, y)  # [T, H]
