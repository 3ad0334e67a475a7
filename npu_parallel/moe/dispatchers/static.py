"""``moe_impl="static"``: fixed shapes and no host sync (NPU graph mode / ACL graph), capacity buffers.

Each local slot gets row ``expert * C + position`` of a ``[E_local * C + 1, H]`` buffer, its position counted
in token order (a cumsum of one-hot keys, no sort). Slots of other ranks' experts, and slots past an expert's
capacity ``C``, go to the last, trash row, whose output reads zero. Dropless by default (``C = T``); with a
``capacity_factor`` the latest tokens of an over-full expert are dropped and counted in ``stats["dropped"]``.

Shapes: T tokens, k top-k, E experts (global), E_local this rank's experts, C capacity per expert, H hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from npu_parallel.moe.dispatchers.base import Dispatcher, Routed, local_keys
from npu_parallel.moe.experts import LocalExperts


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float | None, min_capacity: int = 0) -> int:
    """Rows per local expert. Dropless (None): ``tokens``, since top-k picks distinct experts, an expert
    gets at most one slot per token. With a factor f: ``max(min_capacity, ceil(f * tokens * top_k / num_experts))``
    (DeepSpeed-MoE's rule), at most ``tokens``."""
    if capacity_factor is None:
        return tokens
    return max(1, min(tokens, max(min_capacity, math.ceil(capacity_factor * tokens * top_k / num_experts))))


def capacity_rows(keys: torch.Tensor, n: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's buffer row ``key * C + position`` (``n * C``: the trash row) for flat ``keys [T*k]`` in
    ``[0, n]`` (``n``: not computed here), and the number of slots dropped past capacity (a device tensor)."""
    # a comparison, not F.one_hot: one_hot checks its input's range with a host sync
    onehot = (keys.unsqueeze(1) == torch.arange(n + 1, device=keys.device)).to(keys.dtype)  # [T*k, n+1]
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # [T*k] the slot's place in its expert's queue
    kept = (keys < n) & (position < c)
    rows = torch.where(kept, keys * c + position, torch.full_like(keys, n * c))  # [T*k]
    return rows, ((keys < n) & ~kept).sum()


@dataclass
class _Combine:
    rows: torch.Tensor  # [T*k] each slot's buffer row (E_local * C: the trash row)
    weights: torch.Tensor  # [T, k]
    dtype: torch.dtype  # the input's


class StaticDispatcher(Dispatcher, name="static", order=10):
    """Batched matmuls on ``[E_local, C, H]`` buffers; zero host syncs. ``capacity_factor``: None is dropless."""

    def __init__(
        self,
        *,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(self.option_error(key, value))
        if min_capacity is not None:
            if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
                raise ValueError(f"min_capacity={min_capacity!r}: must be an integer >= 0 (token slots per expert)")
            if capacity_factor is None and eval_capacity_factor is None:
                raise ValueError(
                    f"min_capacity={min_capacity}: a floor under the capacity, which is dropless without one; "
                    f"pass capacity_factor (and/or eval_capacity_factor) too"
                )
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity or 0

    def capacity(self, tokens: int, top_k: int, num_experts: int) -> int:
        """This forward's rows per expert: ``eval_capacity_factor`` in eval mode when given, else the factor."""
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        return capacity(tokens, top_k, num_experts, factor, self.min_capacity)

    @classmethod
    def option_error(cls, key: str, value: object) -> str:
        return (
            f"{key}={value!r} needs moe_impl={cls.name!r} and a value > 0 (e.g. 1.25); "
            f"the other implementations never drop tokens"
        )

    def options(self) -> dict:
        given = {
            "capacity_factor": self.capacity_factor,
            "eval_capacity_factor": self.eval_capacity_factor,
            "min_capacity": self.min_capacity or None,
        }
        return {k: v for k, v in given.items() if v is not None}

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> Routed:
        t, k = indices.shape
        n_local = experts.num_local
        c = self.capacity(t, k, experts.num_experts)
        keys = local_keys(indices, experts).reshape(-1)  # [T*k]
        rows, self.stats["dropped"] = capacity_rows(keys, n_local, c)
        slots = x.unsqueeze(1).expand(t, k, x.shape[-1]).reshape(t * k, -1)  # [T*k, H]
        buf = x.new_zeros(n_local * c + 1, x.shape[-1]).index_add(0, rows, slots)[:-1].view(n_local, c, -1)
        return Routed(buf, torch.bmm, _Combine(rows, weights, x.dtype))  # buf [E_local, C, H]

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        c: _Combine = routed.state
        t, k = c.weights.shape
        y = y.reshape(-1, y.shape[-1])  # [E_local * C, H]
        y = torch.cat([y, y.new_zeros(1, y.shape[-1])]).index_select(0, c.rows)  # [T*k, H]; trash row reads zero
        return (y * c.weights.reshape(-1, 1)).to(c.dtype).view(t, k, -1).sum(dim=1)  # [T, H]
