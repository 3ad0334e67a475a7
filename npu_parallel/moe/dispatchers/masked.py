"""``moe_impl="masked"``: the seed's reference, every local expert on every token weighted by a dense float mask.

No host sync and no data-dependent shape; ``E_local / k`` times the expert work of the others.
Shapes: T tokens, k top-k, E_local this rank's experts, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npu_parallel.moe.dispatchers.base import Dispatcher, Routed
from npu_parallel.moe.experts import LocalExperts


def _per_expert(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``rows [E_local, T, K]`` -> ``[E_local, T, N]``, one matmul per expert (as the seed computed it)."""
    return torch.stack([rows[e] @ w[e] for e in range(w.shape[0])])


@dataclass
class _Combine:
    mask: torch.Tensor  # [E_local, T] each token's routing weight for each local expert (0: not routed there)
    dtype: torch.dtype  # the input's


class MaskedDispatcher(Dispatcher, name="masked", order=20):
    """The reference the others are tested against."""

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> Routed:
        local = torch.arange(experts.num_local, device=indices.device) + experts.expert_start  # [E_local]
        hit = (indices.unsqueeze(0) == local.view(-1, 1, 1)).to(weights.dtype)  # [E_local, T, k]
        mask = (hit * weights).sum(dim=-1)  # [E_local, T]
        rows = x.unsqueeze(0).expand(experts.num_local, -1, -1)  # [E_local, T, H], a view: no copy
        return Routed(rows, _per_expert, _Combine(mask, x.dtype))

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        c: _Combine = routed.state
        out = y.new_zeros(y.shape[1:], dtype=c.dtype)  # [T, H]
        for e in range(y.shape[0]):  # expert by expert, in the seed's order of summation
            out = out + (y[e] * c.mask[e].unsqueeze(-1)).to(c.dtype)
        return out
