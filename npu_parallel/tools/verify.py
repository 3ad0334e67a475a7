"""``npu-parallel verify``: the converted model against transformers', layer by layer, on each rank.

Every rank loads the converted model with ``load_pretrained``; rank 0 also builds the reference
(``AutoModelForCausalLM.from_pretrained``). Both see the same seeded random batch; forward hooks capture
per decoder layer the attention output, the MLP/MoE output, the router's expert indices and weights
(and auxiliary loss); then the logits and loss, and with ``backward`` every parameter's gradient,
gathered to full shape over the tp group (ShardSpec dim, padding trimmed) and compared by group.
The MLP/MoE blocks and the routers are where the model's plan puts them (:func:`find_moe_blocks`).

tp = 1 runs in this process, each tp > 1 on launched ranks (:func:`npu_parallel.tools.jobs.run_jobs`);
inside a torchrun job (``WORLD_SIZE`` set) the one tp size equal to the world size runs in place.
The report (tolerances, failures, table, plot) is :mod:`npu_parallel.tools.verify_report`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace
from typing import cast

import torch
from torch import nn

from npu_parallel.convert.conversion import conversion_info
from npu_parallel.convert.moe_blocks import MoEBlockInfo, find_moe_blocks, layer_index
from npu_parallel.convert.plan import matches
from npu_parallel.convert.plans import plan_for
from npu_parallel.convert.styles import MLP, MoE
from npu_parallel.parallel.state import ParallelState
from npu_parallel.tools.jobs import in_torchrun, quiet, random_batch, run_jobs, timed
from npu_parallel.tools.verify_report import GRAD_GROUPS, MODEL_GRADS, MODEL_OUTPUTS

__all__ = ["Capture", "compare", "run_verify", "verify_rank"]


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


def _grad_group(name: str, router_paths: tuple[str, ...]) -> tuple[int | None, str]:
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


def _full_grads(model, state) -> dict[str, torch.Tensor]:
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


def _forward(model, ids, backward: bool):
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


def _perturb(model: nn.Module, spec: str, state: ParallelState) -> None:
    """Debug: ``RANK:LAYER`` adds noise to that tp rank's routed experts in that layer (proves verify fails)."""
    rank, layer = (int(x) for x in spec.split(":"))
    if state.tp_rank != rank:
        return
    experts = {b.layer: b.experts for b in find_moe_blocks(model)}[layer]
    w = experts.gate_up_proj
    assert isinstance(w, torch.Tensor)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=g).to(w) * 0.5)


def verify_rank(
    path: str,
    state: ParallelState,
    *,
    dtype: str = "float32",
    moe_impl: str = "auto",
    backward: bool = False,
    batch: int = 2,
    seq: int = 16,
    seed: int = 1234,
    perturb: str | None = None,
) -> dict | None:
    """One tp size on this rank: rank 0 returns the raw differences, the others None."""
    from npu_parallel.checkpoint.load import load_pretrained, load_unconverted

    quiet()
    torch_dtype = getattr(torch, dtype)
    # the conversion is what is verified: the load-balancing loss the converted model adds in train mode (which
    # transformers' DeepSeek classes lack) is off on both sides; tests/test_balance.py proves it on its own
    model = load_pretrained(path, state, dtype=torch_dtype, moe_impl=moe_impl, progress=False, aux_loss_coef=0.0)
    if perturb:
        _perturb(model, perturb, state)
    ids = random_batch(model.config.vocab_size, batch, seq, seed).to(state.device)
    cap, outs = _forward(model, ids, backward)
    grads = _full_grads(model, state) if backward else {}
    moe_impl_used = conversion_info(model).moe_impl
    del model
    if state.rank != 0:
        return None
    ref = load_unconverted(path, torch_dtype)  # from_pretrained; the dequantized model for fp8
    cast(nn.Module, ref).to(state.device)  # cast: transformers' decorated `to` confuses mypy
    rule = plan_for(ref.config).balance
    if rule is not None and rule.model_coef_attr and hasattr(ref, rule.model_coef_attr):
        setattr(ref, rule.model_coef_attr, 0.0)  # transformers' own (output_router_logits): off, as above
    ref_cap, ref_outs = _forward(ref, ids, backward)
    ref_grads = (
        {
            n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu()
            for n, p in ref.named_parameters()
        }
        if backward
        else {}
    )
    result = compare(ref_cap, cap, ref_outs, outs, ref_grads, grads)
    result.update(
        tp=state.tp_size,
        dtype=dtype,
        moe_impl=moe_impl_used,
        batch=[batch, seq],
        model_type=ref.config.model_type,
        backward=backward,
    )
    return result


def _maxdiff(a, b) -> float | None:
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        return math.inf
    return (a.float().cpu() - b.float().cpu()).abs().max().item() if a.numel() else 0.0


def _router_compare(ref: dict, got: dict) -> tuple[float | None, float | None]:
    """(percent of tokens with the same top-k expert set, max abs diff of their weights matched by expert)."""
    if "indices" not in ref or "indices" not in got:
        return None, None
    ri, gi = ref["indices"].cpu(), got["indices"].cpu()
    if ri.shape != gi.shape:
        return 0.0, math.inf
    rs, rorder = ri.sort(dim=-1)
    gs, gorder = gi.sort(dim=-1)
    same = (rs == gs).all(dim=-1)
    agree = 100.0 * same.float().mean().item()
    wdiff = None
    if "weights" in ref and "weights" in got and same.any():
        rw = ref["weights"].cpu().gather(-1, rorder)[same]
        gw = got["weights"].cpu().gather(-1, gorder)[same]
        wdiff = (rw - gw).abs().max().item()
    return agree, wdiff


def compare(ref_cap: Capture, cap: Capture, ref_outs: dict, outs: dict, ref_grads: dict, grads: dict) -> dict:
    """Max abs differences per layer and for the model; gradients by group (routers: the reference's plan's)."""
    layers = []
    grad_diffs: dict[tuple[int | None, str], float] = {}
    missing = sorted(set(ref_grads) ^ set(grads))
    for name, g in grads.items():
        if name not in ref_grads:
            continue
        key = _grad_group(name, ref_cap.router_paths)
        d = _maxdiff(ref_grads[name], g)
        if d is not None:
            grad_diffs[key] = max(grad_diffs.get(key, 0.0), d)
    for i, ref in ref_cap.data.items():
        got = cap.data.get(i, {})
        agree, wdiff = _router_compare(ref, got)
        row = {
            "layer": i,
            "kind": "moe" if i in ref_cap.moe_layers else "dense",
            "attn_out": _maxdiff(ref.get("attn_out"), got.get("attn_out")),
            "mlp_out": _maxdiff(ref.get("mlp_out"), got.get("mlp_out")),
            "router_agree": agree,
            "router_w": wdiff,
            "aux": _maxdiff(ref.get("aux"), got.get("aux")),
        }
        for g in GRAD_GROUPS:
            row[g] = grad_diffs.get((i, g))
        layers.append(row)
    model_row = {k: _maxdiff(ref_outs[k], outs[k]) for k in MODEL_OUTPUTS}
    for g in MODEL_GRADS:
        model_row[g] = grad_diffs.get((None, g))
    return {"layers": layers, "model": model_row, "unmatched_params": missing}


# -- running ---------------------------------------------------------------------------------------------


def run_verify(
    path: str,
    tp_sizes: list[int],
    *,
    dtype: str = "float32",
    moe_impl: str = "auto",
    backward: bool = False,
    batch: int = 2,
    seq: int = 16,
    seed: int = 1234,
    perturb: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[int, dict]:
    """tp -> raw result, one run per tp size (in place inside torchrun). Empty on non-zero ranks.

    ``progress`` gets a line as each tp size (and each of its ranks) starts and finishes.
    """
    kwargs = dict(dtype=dtype, moe_impl=moe_impl, backward=backward, batch=batch, seq=seq, seed=seed, perturb=perturb)
    job = {"task": "verify", "path": str(path), "kwargs": kwargs}
    what = f"comparing with transformers{' (forward and backward)' if backward else ''}"
    results = {}
    for tp in [int(os.environ["WORLD_SIZE"])] if in_torchrun() else tp_sizes:

        def run(say: Callable[[str], None] | None, tp: int = tp) -> list:
            return run_jobs(tp, [job], progress=say)

        (result,) = timed(what, tp, run, progress)
        if result is not None:
            results[result["tp"]] = result
    return results
