"""``moe_impl="npu"``: torch_npu's fused permute / grouped matmul / unpermute kernels (docs/npu_kernels.md).

Shapes: T tokens, k top-k, E experts (global), E_local this rank's experts, R local slots, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npu_parallel.moe.dispatchers.base import Dispatcher, Routed, local_keys, slot_counts
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.moe.npu_ops import NpuOps, npu_grouped_mm, npu_ops
from npu_parallel.parallel import device as _device


@dataclass
class _Combine:
    sorted_indices: torch.Tensor  # [T*k] int32, each slot's row in the permuted order
    weights: torch.Tensor  # [T, k]
    slots: int  # T*k
    dtype: torch.dtype  # the input's


class NpuDispatcher(Dispatcher, name="npu", order=30):
    """No host sync when this rank holds every expert, one (the local row count) under expert parallelism.

    ``ops``: the kernels (default: torch_npu's through :func:`npu_ops`; tests pass a CPU stand-in).
    """

    auto_for = ("npu",)

    def __init__(self, *, ops: NpuOps | None = None) -> None:
        super().__init__()
        if ops is None:
            if _device.torch_npu_module() is None:
                raise ValueError(
                    "moe_impl='npu' needs torch_npu (pip install -e .[npu] over your CANN stack); "
                    "use moe_impl='grouped' on this machine"
                )
            ops = npu_ops()  # names kernels an old torch_npu lacks, at conversion rather than in the first step
        self.ops = ops

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> Routed:
        n_local, slots = experts.num_local, indices.numel()
        keys = local_keys(indices, experts)  # [T, k], E_local for other ranks' slots
        permuted, sorted_indices = self.ops.npu_moe_token_permute(x, keys.to(torch.int32))  # [T*k, H], [T*k]
        counts = slot_counts(keys.reshape(-1), n_local)[:n_local]  # [E_local]
        if experts.expert_start == 0 and n_local == experts.num_experts:
            rows = slots  # every slot is local: no sentinel rows, no sync
        else:
            rows = int(counts.sum())  # the one host sync: the grouped matmul wants sum(group_list) == rows of x
        ops = self.ops
        return Routed(
            permuted[:rows],
            lambda a, w: npu_grouped_mm(ops, a, w, counts),  # rows [R, H]
            _Combine(sorted_indices, weights, slots, x.dtype),
        )

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        c: _Combine = routed.state
        if y.shape[0] < c.slots:  # the sentinel slots' rows: zeros, so other ranks' slots contribute nothing
            y = torch.cat([y, y.new_zeros(c.slots - y.shape[0], y.shape[-1])])  # [T*k, H]
        # routing weights and the k-slot sum in the weights' dtype, as the grouped dispatcher does
        out = self.ops.npu_moe_token_unpermute(y.to(c.weights.dtype), c.sorted_indices, probs=c.weights)
        return out.to(c.dtype)  # [T, H]
