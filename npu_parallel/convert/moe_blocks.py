"""Find a model's MoE blocks through its plan: where the router, the experts and the shared experts are.

``find_moe_blocks(model)`` returns one :class:`MoEBlockInfo` per module that one of the plan's MoE rules
matches (unconverted: fused 3-D experts as in transformers 5.x or an ``nn.ModuleList`` of expert MLPs as
in 4.x and remote code; converted: :class:`~npu_parallel.moe.experts.LocalExperts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from npu_parallel.convert.plan import Plan, config_value, matches
from npu_parallel.convert.plans import plan_for
from npu_parallel.convert.styles import MoE
from npu_parallel.moe.load import layer_index

__all__ = ["MoEBlockInfo", "NoMoEBlockError", "find_moe_blocks", "layer_index"]


class NoMoEBlockError(ValueError):
    """The model has no MoE block where its plan expects one; the message says where we looked."""


@dataclass
class MoEBlockInfo:
    path: str  # "model.layers.1.mlp"
    block: nn.Module
    router: nn.Module
    router_path: str  # "model.layers.1.mlp.gate"
    experts: nn.Module
    experts_path: str
    layout: str  # "fused" | "modulelist"
    num_experts: int  # global number of routed experts (a converted block holds only its local share)
    num_local_experts: int  # experts held by this module (== num_experts unless converted)
    top_k: int | None
    shared: nn.Module | None
    shared_path: str | None
    layer: int | None  # index in model.layers, when the path has one

    def describe(self) -> str:
        shared = f", shared {self.shared_path}" if self.shared is not None else ""
        local = f" ({self.num_local_experts} local)" if self.num_local_experts != self.num_experts else ""
        return (
            f"{self.path}: router {self.router_path} ({type(self.router).__name__}), "
            f"{self.num_experts}{local} experts {self.layout} at {self.experts_path}, top_k {self.top_k}{shared}"
        )


def _experts_layout(experts: nn.Module, total: int | None) -> tuple[str, int, int] | None:
    """(layout, global experts, local experts), or None when ``experts`` holds no routed experts."""
    if isinstance(experts, nn.ModuleList):
        return ("modulelist", total or len(experts), len(experts)) if len(experts) else None
    gate_up = getattr(experts, "gate_up_proj", None)
    if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3:
        local = gate_up.shape[0]
        # converted experts know the global count; transformers' fused experts hold all of them
        return "fused", int(getattr(experts, "num_experts", None) or total or local), int(local)
    return None


def _top_k(router: nn.Module, block: nn.Module, config: object) -> int | None:
    for owner in (router, block):
        for attr in ("top_k", "num_experts_per_tok", "topk"):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                return value
    value = config_value(config, "num_experts_per_tok")
    return value if isinstance(value, int) else None


def _info(path: str, module: nn.Module, style: MoE, plan: Plan, config: object) -> MoEBlockInfo | None:
    router, experts = getattr(module, style.router), getattr(module, style.experts)
    layout = _experts_layout(experts, plan.num_experts(config))
    if layout is None:
        return None
    shared = getattr(module, style.shared, None) if style.shared else None
    prefix = f"{path}." if path else ""
    kind, total, local = layout
    return MoEBlockInfo(
        path=path,
        block=module,
        router=router,
        router_path=prefix + style.router,
        experts=experts,
        experts_path=prefix + style.experts,
        layout=kind,
        num_experts=total,
        num_local_experts=local,
        top_k=_top_k(router, module, config),
        shared=shared,
        shared_path=prefix + style.shared if shared is not None and style.shared else None,
        layer=layer_index(path),
    )


def find_moe_blocks(model: nn.Module, *, required: bool = True) -> list[MoEBlockInfo]:
    """Every MoE block of ``model`` in module order, found where its plan's MoE rules point."""
    config = getattr(model, "config", None)
    plan = plan_for(config)
    rules = plan.moe_rules()
    found = []
    for path, module in model.named_modules():
        for pattern, style in rules:
            if matches(pattern, path) and style.applies(module):
                info = _info(path, module, style, plan, config)
                if info is not None:
                    found.append(info)
                break
    if not found and required:
        raise NoMoEBlockError(_explain(model, plan))
    return found


def _explain(model: nn.Module, plan: Plan) -> str:
    """Why nothing was found: what the plan looks for, and what the decoder layers hold there."""
    rules = plan.moe_rules()
    if not rules:
        return (
            f"no MoE block found in {type(model).__name__}: its plan ({plan.name}) is dense, it declares no MoE block"
        )
    seen: dict[str, set[str]] = {}
    for path, module in model.named_modules():
        for pattern, _ in rules:
            if matches(pattern, path):
                seen.setdefault(pattern, set()).add(type(module).__name__)
    wanted = "; ".join(f"{p} with `{s.router}` and `{s.experts}` children" for p, s in rules)
    saw = "; ".join(f"{k} = {'/'.join(sorted(v))}" for k, v in sorted(seen.items())) or "no module at those paths"
    return f"no MoE block found in {type(model).__name__}: its plan ({plan.name}) looks for {wanted}; saw: {saw}"
