"""NPU-safe expert dispatch: which tokens each local expert computes and how outputs are combined.

Every implementation takes the replicated tokens ``x [T, H]``, the router's ``indices``/``weights``
``[T, k]`` over the global experts, and returns this rank's partial output ``[T, H]`` (the local
experts' weighted sum). None uses ``nonzero``, boolean-mask indexing, ``unique`` or ``.any()``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from npu_parallel.moe.experts import LocalExperts
from npu_parallel.parallel.device import torch_npu_module
from npu_parallel.moe.grouped_gemm import grouped_mm
from npu_parallel.moe.npu import npu_moe


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


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Rows per local expert. Dropless (None): ``tokens``, since top-k picks distinct experts, an expert
    gets at most one slot per token. With a factor f: ``ceil(f * tokens * top_k / num_experts)``."""
    if capacity_factor is None:
        return tokens
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def static(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts,
           capacity_factor: float | None = None, stats: dict | None = None) -> torch.Tensor:
    """Fixed shapes and no host sync (NPU graph mode / ACL graph): capacity buffers ``[E_local, C, H]``.

    Each local slot gets row ``expert * C + position``, its position counted in token order (a cumsum of
    one-hot keys, no sort). Slots of other ranks' experts, and slots past an expert's capacity, go to a
    trash row whose output is zero: with a ``capacity_factor`` the latest tokens of an over-full expert
    are dropped (their count is put in ``stats["dropped"]`` as a device tensor); ``None`` is dropless.
    """
    t, k = indices.shape
    n_local = experts.num_local
    c = capacity(t, k, experts.num_experts, capacity_factor)
    keys = _local_keys(indices, experts).reshape(-1)
    # a comparison, not F.one_hot: one_hot checks its input's range with a host sync
    onehot = (keys.unsqueeze(1) == torch.arange(n_local + 1, device=keys.device)).to(keys.dtype)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1
    kept = (keys < n_local) & (position < c)
    rows = torch.where(kept, keys * c + position, torch.full_like(keys, n_local * c))
    if stats is not None:
        stats["dropped"] = ((keys < n_local) & ~kept).sum()
    slots = x.unsqueeze(1).expand(t, k, x.shape[-1]).reshape(t * k, -1)
    buf = x.new_zeros(n_local * c + 1, x.shape[-1]).index_add(0, rows, slots)[:-1].view(n_local, c, -1)
    gate, up = torch.bmm(buf, experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    y = torch.bmm(experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2)).reshape(n_local * c, -1)
    y = torch.cat([y, y.new_zeros(1, y.shape[-1])]).index_select(0, rows)  # the trash row reads zeros
    return (y * weights.reshape(-1, 1)).to(x.dtype).view(t, k, -1).sum(dim=1)


IMPLEMENTATIONS: dict[str, Callable] = {"grouped": grouped, "static": static, "masked": masked, "npu": npu_moe}


def resolve(moe_impl: str, device_type: str) -> str:
    """The concrete implementation for ``moe_impl`` ("auto" picks per device)."""
    if moe_impl == "auto":
        return "npu" if device_type == "npu" else "grouped"
    if moe_impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"moe_impl={moe_impl!r} is not an implementation; use one of {['auto', *IMPLEMENTATIONS]}"
        )
    if moe_impl == "npu" and torch_npu_module() is None:
        raise ValueError("moe_impl='npu' needs torch_npu (pip install -e .[npu] over your CANN stack); "
                         "use moe_impl='grouped' on this machine")
    return moe_impl
