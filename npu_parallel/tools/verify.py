"""``npu-parallel verify``: the converted model against transformers', layer by layer, on each rank.

Every rank loads the converted model with ``load_pretrained``; rank 0 also builds the reference
(``AutoModelForCausalLM.from_pretrained``). Both see the same seeded random batch; forward hooks capture
per decoder layer the attention output, the MLP/MoE output, the router's expert indices and weights
(and auxiliary loss); then the logits and loss, and with ``backward`` every parameter's gradient,
gathered to full shape over the tp group (ShardSpec dim, padding trimmed) and compared by group.
The MLP/MoE blocks and the routers are where the model's plan puts them (:func:`find_moe_blocks`).

tp = 1 runs in this process, each tp > 1 on launched ranks (:func:`npu_parallel.tools.jobs.run_jobs`);
inside a torchrun job (``WORLD_SIZE`` set) the one tp size equal to the world size runs in place. At pp > 1 each tp
size runs on ``tp x pp`` ranks as pipeline stages (:mod:`npu_parallel.tools.verify_pipeline`).
The report (tolerances, failures, table, plot) is :mod:`npu_parallel.tools.verify_report`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from npu_parallel.convert.conversion import conversion_info
from npu_parallel.convert.moe_blocks import find_moe_blocks
from npu_parallel.convert.plans import plan_for
from npu_parallel.parallel.state import ParallelState
from npu_parallel.tools.jobs import in_torchrun, quiet, random_batch, run_jobs, timed
from npu_parallel.tools.verify_capture import Capture, forward_with_capture, full_grads, grad_group
from npu_parallel.tools.verify_report import GRAD_GROUPS, MODEL_GRADS, MODEL_OUTPUTS

__all__ = ["Capture", "compare", "run_verify", "verify_rank"]

_full_grads = full_grads  # the name the test workers import


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
    grad_accum: int | None = None,
) -> dict | None:
    """One layout (tp, and pp stages) on this rank: rank 0 returns the raw differences, the others None.

    At pp > 1 the model runs as a 1F1B pipeline over ``grad_accum`` (default pp) copies of the batch
    (:mod:`npu_parallel.tools.verify_pipeline`); its stages' figures are compared on rank 0 as at pp 1."""
    from npu_parallel.checkpoint.load import load_pretrained, load_unconverted

    quiet()
    torch_dtype = getattr(torch, dtype)
    # the conversion is what is verified: the load-balancing loss the converted model adds in train mode (which
    # transformers' DeepSeek classes lack) is off on both sides; tests/test_balance.py proves it on its own
    model = load_pretrained(path, state, dtype=torch_dtype, moe_impl=moe_impl, progress=False, aux_loss_coef=0.0)
    if perturb:
        _perturb(model, perturb, state)
    ids = random_batch(model.config.vocab_size, batch, seq, seed).to(state.device)
    layout: dict = {}
    if state.pp_size > 1:
        from npu_parallel.tools.verify_pipeline import pipelined_capture

        micro = grad_accum or state.pp_size
        cap, outs, grads, layout = pipelined_capture(model, ids, state, backward=backward, micro=micro)
    else:
        cap, outs = forward_with_capture(model, ids, backward)
        grads = full_grads(model, state) if backward else {}
    moe_impl_used = conversion_info(model).moe_impl
    del model
    if state.rank != 0:
        return None
    ref = load_unconverted(path, torch_dtype)  # from_pretrained; the dequantized model for fp8
    cast(nn.Module, ref).to(state.device)  # cast: transformers' decorated `to` confuses mypy
    rule = plan_for(ref.config).balance
    if rule is not None and rule.model_coef_attr and hasattr(ref, rule.model_coef_attr):
        setattr(ref, rule.model_coef_attr, 0.0)  # transformers' own (output_router_logits): off, as above
    ref_cap, ref_outs = forward_with_capture(ref, ids, backward)
    ref_grads = (
        {
            n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu()
            for n, p in ref.named_parameters()
        }
        if backward
        else {}
    )
    result = compare(ref_cap, cap, ref_outs, outs, ref_grads, grads)
    for stage in layout.get("stages", []):  # which stage ran each layer
        for row in result["layers"][slice(*stage["layers"])]:
            row["stage"] = stage["stage"]
    result.update(
        layout,
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
        key = grad_group(name, ref_cap.router_paths)
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
    pp_sizes: list[int] | None = None,
    dtype: str = "float32",
    moe_impl: str = "auto",
    backward: bool = False,
    batch: int = 2,
    seq: int = 16,
    seed: int = 1234,
    perturb: str | None = None,
    grad_accum: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[tuple[int, int], dict]:
    """(tp, pp) -> raw result, one run per tp size at each pp size (``tp x pp`` ranks; in place inside torchrun,
    at the layout of the world). Empty on non-zero ranks.

    ``progress`` gets a line as each layout (and each of its ranks) starts and finishes.
    """
    kwargs = dict(dtype=dtype, moe_impl=moe_impl, backward=backward, batch=batch, seq=seq, seed=seed, perturb=perturb)
    what = f"comparing with transformers{' (forward and backward)' if backward else ''}"
    results = {}
    pps = pp_sizes or [1]
    if in_torchrun():  # the caller checked tp x pp = WORLD_SIZE
        layouts = [(int(os.environ["WORLD_SIZE"]) // pps[0], pps[0])]
    else:
        layouts = [(tp, pp) for pp in pps for tp in tp_sizes]
    for tp, pp in layouts:
        job = {
            "task": "verify",
            "path": str(path),
            "kwargs": {**kwargs, "grad_accum": grad_accum} if pp > 1 else kwargs,
        }

        def run(say: Callable[[str], None] | None, tp: int = tp, pp: int = pp, job: dict = job) -> list:
            return run_jobs(tp, [job], progress=say, pp=pp)

        (result,) = timed(what, tp, run, progress, pp=pp)
        if result is not None:
            results[(result["tp"], result.get("pp", 1))] = result
    return results
