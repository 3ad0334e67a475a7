"""Find the MoE blocks of a model, whatever its layout: where the router, the experts and the shared experts are.

``find_moe_blocks(model)`` walks the module tree and returns one :class:`MoEBlockInfo` per MoE block:

- fused experts (transformers 5.x: ``experts.gate_up_proj [E, 2I, H]``, and npu_parallel's ``LocalExperts``)
  or an ``nn.ModuleList`` of expert MLPs (transformers 4.x, ``trust_remote_code``);
- the router at ``gate`` (DeepSeek, Qwen-MoE, Mixtral 5.x ``mlp.gate``, older Mixtral ``block_sparse_moe.gate``,
  remote-code ``MoEGate``) or ``router``;
- shared experts at ``shared_experts`` / ``shared_expert`` / ``shared_mlp`` (None when absent).

With ``required=True`` (the default) a model without any MoE block raises :class:`NoMoEBlockError`,
whose message lists what was looked at and which modules were seen there.

``router_outputs(router, output)`` turns whatever a router returns into ``(indices, weights, aux_loss)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MoEBlockInfo", "NoMoEBlockError", "find_moe_blocks", "router_outputs", "layer_index"]

ROUTER_NAMES = ("gate", "router")
EXPERTS_NAMES = ("experts",)
SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
BLOCK_NAMES = ("mlp", "block_sparse_moe", "moe", "feed_forward")


class NoMoEBlockError(ValueError):
    """The model has no module with experts plus a router; the message says where we looked."""


@dataclass
class MoEBlockInfo:
    path: str                 # "model.layers.1.mlp"
    block: nn.Module
    router: nn.Module
    router_path: str          # "model.layers.1.mlp.gate"
    experts: nn.Module
    experts_path: str
    layout: str               # "fused" | "modulelist"
    num_experts: int          # global number of routed experts (a converted block holds only its local share)
    num_local_experts: int    # experts held by this module (== num_experts unless converted)
    top_k: int | None
    shared: nn.Module | None
    shared_path: str | None
    layer: int | None         # index in model.layers, when the path has one

    def describe(self) -> str:
        shared = f", shared {self.shared_path}" if self.shared is not None else ""
        local = f" ({self.num_local_experts} local)" if self.num_local_experts != self.num_experts else ""
        return (f"{self.path}: router {self.router_path} ({type(self.router).__name__}), "
                f"{self.num_experts}{local} experts {self.layout} at {self.experts_path}, top_k {self.top_k}{shared}")


def layer_index(path: str) -> int | None:
    """The decoder-layer index in a path like ``model.layers.3.mlp`` (the number after ``layers``/``h``/``blocks``)."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _experts_layout(experts: nn.Module) -> tuple[str, int, int] | None:
    """(layout, global experts, local experts) or None when ``experts`` does not look like routed experts."""
    if isinstance(experts, nn.ModuleList):
        return ("modulelist", len(experts), len(experts)) if len(experts) else None
    gate_up = getattr(experts, "gate_up_proj", None)
    if gate_up is None:
        gate_up = getattr(experts, "w1", None)  # some fused layouts name it after Mixtral's w1
    if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3:
        local = gate_up.shape[0]
        total = getattr(experts, "num_experts", None) or local
        return "fused", int(total), int(local)
    return None


def _top_k(router: nn.Module, block: nn.Module, config) -> int | None:
    for owner in (router, block):
        for attr in ("top_k", "num_experts_per_tok", "topk"):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                return value
    value = getattr(config, "num_experts_per_tok", None) if config is not None else None
    return value if isinstance(value, int) else None


def _first_child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def find_moe_blocks(model: nn.Module, *, required: bool = True) -> list[MoEBlockInfo]:
    """Every MoE block of ``model`` in module order (see the module docstring for the layouts recognised)."""
    config = getattr(model, "config", None)
    found: list[MoEBlockInfo] = []
    for path, module in model.named_modules():
        experts = _first_child(module, EXPERTS_NAMES)
        router = _first_child(module, ROUTER_NAMES)
        if experts is None or router is None:
            continue
        layout = _experts_layout(experts[1])
        if layout is None:
            continue
        shared = _first_child(module, SHARED_NAMES)
        prefix = f"{path}." if path else ""
        kind, total, local = layout
        found.append(MoEBlockInfo(
            path=path, block=module, router=router[1], router_path=prefix + router[0],
            experts=experts[1], experts_path=prefix + experts[0], layout=kind, num_experts=total,
            num_local_experts=local, top_k=_top_k(router[1], module, config),
            shared=shared[1] if shared else None, shared_path=(prefix + shared[0]) if shared else None,
            layer=layer_index(path),
        ))
    if not found and required:
        raise NoMoEBlockError(_explain(model))
    return found


def _explain(model: nn.Module) -> str:
    """Why nothing was found: the decoder layers' children, and any module that had only half of a MoE block."""
    seen: dict[str, set[str]] = {}
    half = []
    for path, module in model.named_modules():
        idx = layer_index(path)
        parts = path.split(".")
        if idx is not None and parts[-1] in BLOCK_NAMES or (idx is not None and parts[-1].isdigit()):
            key = ".".join("*" if p.isdigit() else p for p in parts)
            seen.setdefault(key, set()).add(type(module).__name__)
        names = dict(module.named_children())
        if any(n in names for n in EXPERTS_NAMES) != any(n in names for n in ROUTER_NAMES):
            half.append(f"{path or '<root>'} ({type(module).__name__}: children {sorted(names)})")
    saw = "; ".join(f"{k} = {'/'.join(sorted(v))}" for k, v in sorted(seen.items())) or "no decoder layers"
    msg = (f"no MoE block found in {type(model).__name__}: looked for modules with an `experts` child "
           f"(nn.ModuleList or fused 3-D gate_up_proj) and a `gate`/`router` child, e.g. under "
           f"model.layers.*.{{{','.join(BLOCK_NAMES)}}}; saw: {saw}")
    if half:
        msg += f"; modules with only one of experts/router: {', '.join(half[:5])}"
    return msg


def router_outputs(output) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(indices, weights, aux_loss)`` from a router's output, whatever its order.

    transformers 5.x routers return ``(logits, weights, indices)``, DeepSeek's remote-code ``MoEGate``
    ``(indices, weights[, aux_loss])``; a plain ``nn.Linear`` gate (older Mixtral) returns logits only,
    giving ``(None, None, None)``. The indices are the integer tensor, the weights the floating tensor of
    the same shape, the auxiliary loss a floating scalar.
    """
    if isinstance(output, torch.Tensor) or not isinstance(output, (tuple, list)):
        return None, None, None
    tensors = [t for t in output if isinstance(t, torch.Tensor)]
    indices = next((t for t in tensors if not t.is_floating_point() and t.dim() >= 1), None)
    weights = None
    if indices is not None:
        weights = next((t for t in tensors if t.is_floating_point() and t.shape == indices.shape), None)
    aux = next((t for t in tensors if t.is_floating_point() and t.numel() == 1 and t is not weights), None)
    return indices, weights, aux
