"""NPU-safe expert dispatch: which tokens each local expert computes and how outputs are combined.

Every implementation takes the replicated tokens ``x [T, H]``, the router's ``indices``/``weights``
``[T, k]`` over the global experts, and returns this rank's partial output ``[T, H]`` (the local
experts' weighted sum). None uses ``nonzero``, boolean-mask indexing, ``unique`` or ``.any()``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .experts import LocalExperts
from .grouped_gemm import grouped_mm


def _local_keys(indices: torch.Tensor, experts: LocalExperts) -> torch.Tensor:
    """Local expert number of each token-slot, ``num_local`` (a sentinel that sorts last) when remote."""
    local = indices - experts.expert_start
    inside = (local >= 0) & (local < experts.num_local)
    return torch.where(inside, local, torch.full_like(local, experts.num_local))


def grouped(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> torch.Tensor:
    """Sort token-slots by local expert and run each expert on exactly its contiguous rows (grouped GEMM).

    One host sync per call (the per-expert counts). Float keys for the sort: integer sort falls back to
    the AI-CPU on Ascend.
    """
    k, n_local = indices.shape[-1], experts.num_local
    keys = _local_keys(indices, experts).reshape(-1)
    order = torch.sort(keys.to(torch.float32), stable=True).indices
    # scatter_add into a fixed-size buffer: bincount sizes its output from the data (a hidden sync)
    counts_dev = keys.new_zeros(n_local + 1).scatter_add_(0, keys, torch.ones_like(keys))
    counts = counts_dev.tolist()[:n_local]  # the one host sync
    order = order[: sum(counts)]
    offs = counts_dev[:n_local].cumsum(0).to(torch.int32)
    tokens = torch.div(order, k, rounding_mode="floor")
    xs = x.index_select(0, tokens)
    gate, up = grouped_mm(xs, experts.gate_up_proj.transpose(1, 2), counts, offs).chunk(2, dim=-1)
    h = grouped_mm(experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2), counts, offs)
    w = weights.reshape(-1).index_select(0, order)
    h = (h * w.unsqueeze(-1)).to(x.dtype)
    return torch.zeros_like(x).index_add(0, tokens, h)


def masked(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> torch.Tensor:
    """The seed's reference: every local expert on every token, weighted by a dense float mask."""
    out = torch.zeros_like(x)
    for e in range(experts.num_local):
        w = ((indices == experts.expert_start + e).to(weights.dtype) * weights).sum(dim=-1)
        out = out + (experts.ffn(x, e) * w.unsqueeze(-1)).to(x.dtype)
    return out


IMPLEMENTATIONS: dict[str, Callable] = {"grouped": grouped, "masked": masked}


def resolve(moe_impl: str, device_type: str) -> str:
    """The concrete implementation for ``moe_impl`` ("auto" picks per device)."""
    if moe_impl == "auto":
        return "grouped"
    if moe_impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"moe_impl={moe_impl!r} is not an implementation; use one of {['auto', *IMPLEMENTATIONS]}"
        )
    return moe_impl
