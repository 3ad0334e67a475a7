"""This rank's routed experts, stored fused as in transformers 5.x whatever the source layout.

Shapes: E experts (global), E_local this rank's experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from npu_parallel.parallel import kernels
from npu_parallel.parallel.shard_spec import ShardedModule, ShardSpec, even_range, mark, shard_tensor
from npu_parallel.parallel.state import Group

# ``matmul(rows, w)``: each expert e's group of rows times ``w[e]``, ``w [E_local, K, N]`` -> rows of width N.
# The dispatcher supplies it with the rows (grouped GEMM with counts, bmm on capacity buffers, ...).
ExpertMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def is_silu(act_fn: object) -> bool:
    """Whether an activation module is SiLU (torch's or transformers'), the gate of a SwiGLU."""
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def _linear(module: nn.Module, name: str) -> nn.Linear:
    lin = getattr(module, name)
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"expert {name} is a {type(lin).__name__}, not nn.Linear")
    return lin


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    t = getattr(module, name)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fused experts' {name} is a {type(t).__name__}, not a tensor")
    return t


class LocalExperts(ShardedModule):
    """Experts ``[expert_start, expert_start + num_local)`` of ``num_experts``.

    ``gate_up_proj [E_local, 2I, H]`` and ``down_proj [E_local, H, I]``, the names and layout of
    transformers' fused experts, so a converted model's state dict reads like the HF one.
    """

    np_routed_experts = True  # parallel.data_parallel.EXPERTS_MARKER: may be sharded over an expert mesh

    def __init__(
        self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn, num_experts: int, expert_start: int
    ):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn
        self.num_experts, self.expert_start = num_experts, expert_start
        self.num_local = gate_up_proj.shape[0]

    @classmethod
    def from_module(cls, experts: nn.Module, ep: Group) -> LocalExperts:
        """Slice this ep rank's experts out of fused 3-D parameters or an ``nn.ModuleList`` of MLPs."""
        if isinstance(experts, nn.ModuleList):
            num = len(experts)
            start, stop = even_range(num, ep.size, ep.rank)
            mine = [[_linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")] for mlp in experts[start:stop]]
            if any(lin.bias is not None for lins in mine for lin in lins):
                raise NotImplementedError("routed experts with biases are not supported")
            gate_up = torch.stack([torch.cat([g.weight.data, u.weight.data], dim=0) for g, u, _ in mine])
            down = torch.stack([d.weight.data for _, _, d in mine])
            act_fn, requires_grad = experts[start].act_fn, mine[0][0].weight.requires_grad
        else:
            fused_gate_up, fused_down = _tensor(experts, "gate_up_proj"), _tensor(experts, "down_proj")
            num = fused_gate_up.shape[0]
            start, stop = even_range(num, ep.size, ep.rank)
            gate_up = shard_tensor(fused_gate_up.data, 0, start, stop)
            down = shard_tensor(fused_down.data, 0, start, stop)
            act_fn, requires_grad = experts.act_fn, fused_gate_up.requires_grad
        spec = ShardSpec(0, start, stop, num, stop - start, axis="ep")
        return cls(
            mark(nn.Parameter(gate_up, requires_grad=requires_grad), spec),
            mark(nn.Parameter(down, requires_grad=requires_grad), spec),
            act_fn,
            num,
            start,
        )

    def forward(self, rows: torch.Tensor, matmul: ExpertMatmul) -> torch.Tensor:
        """Each local expert's gated MLP, ``down(act(x @ gate) * (x @ up))``, on its group of ``rows``."""
        # rows [..., H] grouped by expert as the dispatcher laid them out; gate_up_proj [E_local, 2I, H]
        h = self.project(rows, "gate_up_proj", matmul)  # [..., 2I]: gate | up
        if is_silu(self.act_fn):
            act = kernels.swiglu(h)  # [..., I], npu_swiglu's layout exactly
        else:
            gate, up = h.chunk(2, dim=-1)
            act = self.act_fn(gate) * up
        return self.project(act, "down_proj", matmul)  # [..., H]

    def project(self, rows: torch.Tensor, name: str, matmul: ExpertMatmul) -> torch.Tensor:
        """``rows`` times the fused weight ``name`` ``[E_local, N, K]``, plus its LoRA adapter's output if any."""
        y = matmul(rows, getattr(self, name).transpose(1, 2))  # [..., N]
        lora = self._modules.get("lora")  # convert/lora.py: a ModuleDict of ExpertLora by weight name
        if isinstance(lora, nn.ModuleDict) and name in lora:
            y = y + lora[name](rows, matmul)
        return y

    def extra_repr(self) -> str:
        return (
            f"experts [{self.expert_start}, {self.expert_start + self.num_local}) of {self.num_experts}, "
            f"hidden={self.gate_up_proj.shape[2]}, intermediate={self.down_proj.shape[2]}"
        )
