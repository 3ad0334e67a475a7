"""What ``npu-parallel verify`` captures on a model: per decoder layer the attention output, the MLP/MoE output and
the router's expert indices, weights and auxiliary loss (forward hooks), and every parameter's gradient at full
shape. The same hooks serve the tp path (one forward) and the pipeline path (each stage's layers,
:mod:`npu_parallel.tools.verify_pipeline`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from npu_parallel.convert.moe_blocks import MoEBlockInfo, find_moe_blocks, layer_index
from npu_parallel.convert.plan import matches
from npu_parallel.convert.plans import plan_for
from npu_parallel.convert.styles import MLP, MoE

__all__ = ["Capture", "forward_with_capture", "full_grads", "grad_group"]


# -- capture --------------------------------------------------------------------------------------------


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: cannot compare it layer by layer")
    return list(layers)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _mlp_blocks(model: nn.Module, moe: list[MoEBlockInfo]) -> dict[int, nn.Module]:
    """Per decoder layer, the block the plan's MoE or MLP rules point at (the MoE block on MoE layers)."""
    found = {b.layer: b.block for b in moe if b.layer is not None}
    patterns = [p for p, style in plan_for(model.config).rules if isinstance(style, (MLP, MoE))]
    for path, module in model.named_modules():
        layer = layer_index(path)
        if layer is not None and layer not in found and any(matches(p, path) for p in patterns):
            found[layer] = module
    return found


class Capture:
    """Forward hooks on every decoder layer's attention, MLP/MoE block and router."""

    def __init__(self, model: nn.Module):
        self.data: dict[int, dict] = {}
        self.handles = []
        moe = find_moe_blocks(model, required=False)
        routers = {b.layer: b.router for b in moe if b.layer is not None}
        self.moe_layers = sorted(routers)
        self.router_paths = tuple(b.router_path for b in moe)
        mlps = _mlp_blocks(model, moe)
        for i, layer in enumerate(_decoder_layers(model)):
            self.data[i] = {}
            attn = getattr(layer, "self_attn", None)
            if attn is not None:
                self.handles.append(attn.register_forward_hook(self._store(i, "attn_out")))
            if i in mlps:
                self.handles.append(mlps[i].register_forward_hook(self._store(i, "mlp_out")))
            if i in routers:
                self.handles.append(routers[i].register_forward_hook(self._router(i)))

    def _store(self, i: int, key: str):
        def hook(module, args, out):
            t = _first_tensor(out)
            if t is not None:
                self.data[i][key] = t.detach().float().clone()

        return hook

    def _router(self, i: int):
        from npu_parallel.moe.router import router_outputs

        def hook(module, args, out):
            indices, weights, aux = router_outputs(out)
            if indices is not None:
                self.data[i]["indices"] = indices.detach().reshape(-1, indices.shape[-1]).clone()
            if weights is not None:
                self.data[i]["weights"] = weights.detach().float().reshape(-1, weights.shape[-1]).clone()
            if aux is not None:
                self.data[i]["aux"] = aux.detach().float().reshape(()).clone()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def grad_group(name: str, router_paths: tuple[str, ...]) -> tuple[int | None, str]:
    """(decoder layer or None, gradient group) of a parameter; routers are the plan's (``router_paths``)."""
    layer = layer_index(name)
    if layer is None:
        if "embed" in name:
            return None, "g_embed"
        if "lm_head" in name:
            return None, "g_lm_head"
        return None, "g_final_norm"
    if "norm" in name.rsplit(".", 2)[-2] and ".self_attn." not in name:
        return layer, "g_norm"
    if ".self_attn." in name:
        return layer, "g_attn"
    if any(name.startswith(path + ".") for path in router_paths):
        return layer, "g_router"
    return layer, "g_mlp"


def full_grads(model, state) -> dict[str, torch.Tensor]:
    """Every parameter's gradient at full (global) shape, on every rank: sharded ones all-gathered over tp (and
    over dp under data_parallel)."""
    import torch.distributed as dist

    from npu_parallel.parallel.data_parallel import full_tensor
    from npu_parallel.parallel.shard_spec import spec_of

    params = dict(model.named_parameters())
    grads = {}
    # every rank's [start, stop) of each sharded parameter
    ranges: list[dict[str, tuple[int, int]]] = [{} for _ in range(state.tp_size)]
    if state.tp_size > 1:
        mine = {n: (s.start, s.stop) for n, p in params.items() if (s := spec_of(p)) is not None}
        dist.all_gather_object(ranges, mine, group=state.tp_group)
    for name, p in params.items():
        # a data_parallel model's gradients are DTensors sharded over dp: whole over dp first
        g = full_tensor(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype, device=state.device)
        spec = spec_of(p)
        if spec is None or state.tp_size == 1:
            grads[name] = (g if spec is None else spec.trim(g)).detach().float().cpu()
            continue
        parts = [torch.empty_like(g) for _ in range(state.tp_size)]
        dist.all_gather(parts, g.contiguous(), group=state.tp_group)
        full = torch.zeros(spec.global_shape(g.shape), dtype=torch.float32)
        for r, part in enumerate(parts):
            start, stop = ranges[r][name]
            replace(spec, start=start, stop=stop).place(part.float().cpu(), full)
        grads[name] = full
    return grads


def forward_with_capture(model, ids, backward: bool):
    cap = Capture(model)
    model.train()  # routers' auxiliary losses; the tiny and the published models have no dropout
    try:
        out = model(input_ids=ids, labels=ids)
        if backward:
            out.loss.backward()
    finally:
        cap.remove()
    aux = getattr(out, "aux_loss", None)
    return cap, {
        "logits": out.logits.detach().float(),
        "loss": out.loss.detach().float(),
        "aux_loss": aux.detach().float() if isinstance(aux, torch.Tensor) else None,
    }
