"""This rank's routed experts, stored fused as in transformers 5.x whatever the source layout.

Shapes: E experts (global), E_local this rank's experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from npu_parallel.parallel.state import Group
from npu_parallel.parallel.shard_spec import ShardSpec, ShardedModule, even_range, mark, shard_tensor

# ``matmul(rows, w)``: each expert e's group of rows times ``w[e]``, ``w [E_local, K, N]`` -> rows of width N.
# The dispatcher supplies it with the rows (grouped GEMM with counts, bmm on capacity buffers, ...).
ExpertMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LocalExperts(ShardedModule):
    """Experts ``[expert_start, expert_start + num_local)`` of ``num_experts``.

    ``gate_up_proj [E_local, 2I, H]`` and ``down_proj [E_local, H, I]``, the names and layout of
    transformers' fused experts, so a converted model's state dict reads like the HF one.
    """

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn, num_experts: int,
                 expert_start: int):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn
        self.num_experts, self.expert_start = num_experts, expert_start
        self.num_local = gate_up_proj.shape[0]

    @classmethod
    def from_module(cls, experts: nn.Module, tp: Group) -> LocalExperts:
        """Slice this rank's experts out of fused 3-D parameters or an ``nn.ModuleList`` of MLPs."""
        if isinstance(experts, nn.ModuleList):
            num = len(experts)
            start, stop = even_range(num, tp.size, tp.rank)
            mine = list(experts[start:stop])
            for mlp in mine:
                if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
                    raise NotImplementedError("routed experts with biases are not supported")
            gate_up = torch.stack(
                [torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data], dim=0) for m in mine]
            )
            down = torch.stack([m.down_proj.weight.data for m in mine])
            act_fn, requires_grad = mine[0].act_fn, mine[0].gate_proj.weight.requires_grad
        else:
            num = experts.gate_up_proj.shape[0]
            start, stop = even_range(num, tp.size, tp.rank)
            gate_up = shard_tensor(experts.gate_up_proj.data, 0, start, stop)
            down = shard_tensor(experts.down_proj.data, 0, start, stop)
            act_fn, requires_grad = experts.act_fn, experts.gate_up_proj.requires_grad
        spec = ShardSpec(0, start, stop, num, stop - start)
        return cls(
            mark(nn.Parameter(gate_up, requires_grad=requires_grad), spec),
            mark(nn.Parameter(down, requires_grad=requires_grad), spec),
            act_fn, num, start,
        )

    def forward(self, rows: torch.Tensor, matmul: ExpertMatmul) -> torch.Tensor:
        """Each local expert's gated MLP, ``down(act(x @ gate) * (x @ up))``, on its group of ``rows``."""
        # rows [..., H] grouped by expert as the dispatcher laid them out; gate_up_proj [E_local, 2I, H]
        gate, up = matmul(rows, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # [..., I] each
        return matmul(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))  # [..., H]

    def extra_repr(self) -> str:
        return (f"experts [{self.expert_start}, {self.expert_start + self.num_local}) of {self.num_experts}, "
                f"hidden={self.gate_up_proj.shape[2]}, intermediate={self.down_proj.shape[2]}")
