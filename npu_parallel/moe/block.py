"""The tensor/expert-parallel MoE block: replicated router, local experts, sharded shared experts, one all-reduce."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from npu_parallel.moe import dispatch
from npu_parallel.parallel.collectives import copy_to_tp, reduce_from_tp, reduce_grad
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.parallel.shard_spec import ShardedModule
from npu_parallel.parallel.state import Group


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on ``x``; backward gives ``loss`` a gradient of one (DeepSeek's remote-code trick)."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.dtype, ctx.needs = loss.dtype, loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, (torch.ones(1, dtype=ctx.dtype, device=grad.device) if ctx.needs else None)


def hf_router_outputs(out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """transformers 5.x routers return ``(router_logits, weights, indices)``."""
    _, weights, indices = out
    return indices, weights, None


def remote_router_outputs(out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DeepSeek's remote-code ``MoEGate`` returns ``(indices, weights[, aux_loss])`` (V3's has no aux loss)."""
    indices, weights, *rest = out
    return indices, weights, (rest[0] if rest else None)


ROUTER_OUTPUTS: dict[str, Callable] = {"MoEGate": remote_router_outputs}


def router_outputs_for(router: nn.Module) -> Callable:
    return ROUTER_OUTPUTS.get(type(router).__name__, hf_router_outputs)


class TensorParallelMoE(ShardedModule):
    """A MoE block converted for TP: every rank routes all tokens with the replicated router, runs its
    ``E/tp`` experts and its shard of the shared experts, and one all-reduce sums both partial outputs.

    Gradients: f on the expert input makes the hidden-state gradient whole; the routing weights pass
    through an all-reduce-in-backward so the router, which each rank holds whole, gets the full
    gradient (each rank alone only sees its own experts' share of it).
    """

    def __init__(self, gate: nn.Module, experts: LocalExperts, shared_experts: nn.Module | None,
                 shared_down: str | None, tp: Group, moe_impl: str, router_outputs: Callable,
                 shared_expert_gate: nn.Module | None = None, shared_name: str = "shared_experts"):
        super().__init__()
        self.gate, self.experts = gate, experts
        # the source model's attribute name (shared_experts, shared_expert), so parameter names do not change
        self.shared_name = shared_name
        if shared_experts is not None:
            setattr(self, shared_name, shared_experts)
        self.shared_expert_gate = shared_expert_gate  # Qwen2-MoE: sigmoid(gate(x)) scales the shared expert
        self.shared_down = shared_down  # its bias is added once, after the all-reduce
        self.tp, self.moe_impl = tp, moe_impl
        self._router_outputs = router_outputs
        self._dispatch = dispatch.IMPLEMENTATIONS[moe_impl]
        self.capacity_factor: float | None = None  # "static" only: None is dropless
        self.stats: dict = {}  # "static": tokens dropped by this rank in the last forward ("dropped", a device tensor)
        self.last_aux_loss: torch.Tensor | None = None  # for logging; its gradient flows through AddAuxiliaryLoss

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        indices, weights, aux_loss = self._router_outputs(self.gate(hidden_states))
        weights = reduce_grad(weights, self.tp)
        x = copy_to_tp(hidden_states.reshape(-1, shape[-1]), self.tp)
        kwargs = {"capacity_factor": self.capacity_factor, "stats": self.stats} if self.moe_impl == "static" else {}
        y = self._dispatch(x, indices.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1), self.experts, **kwargs)
        shared_experts = self.shared_module()
        if shared_experts is not None:
            shared = shared_experts(x)
            if self.shared_expert_gate is not None:
                # per-token scale, replicated; its gradient is partial per rank like the routing weights
                scale = torch.sigmoid(self.shared_expert_gate(hidden_states.reshape(-1, shape[-1])))
                shared = reduce_grad(scale, self.tp) * shared
            y = y + shared
        y = reduce_from_tp(y, self.tp)
        bias = getattr(shared_experts, self.shared_down).bias if shared_experts is not None else None
        if bias is not None:
            y = y + bias
        y = y.view(shape)
        self.last_aux_loss = aux_loss.detach() if aux_loss is not None else None
        if aux_loss is not None and self.training:
            y = AddAuxiliaryLoss.apply(y, aux_loss)
        return y

    def shared_module(self) -> nn.Module | None:
        return getattr(self, self.shared_name, None)

    def extra_repr(self) -> str:
        return f"moe_impl={self.moe_impl!r}"
