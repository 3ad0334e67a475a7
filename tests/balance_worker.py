"""Rank workers for the load-balancing loss tests: router gradients of the converted model at tp 1, 2, 4 against
the unconverted one plus a reference loss written here from DeepSeek's equations (transformers' DeepSeek classes
compute none), or transformers' own ``load_balancing_loss_func`` (Mixtral, Qwen) with ``output_router_logits``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import npu_parallel
from npu_parallel.tools.audit import OpAudit

from .common import seeded_ids

# (checkpoint, config overrides for both models, overrides for the converted one only, reference kind)
CASES = {
    "v2_seq": ("deepseek_v2_group", dict(aux_loss_alpha=0.1, seq_aux=True), {}, "deepseek"),
    "v2_token": ("deepseek_v2", dict(aux_loss_alpha=0.1, seq_aux=False), {}, "deepseek"),
    "v3_seq": ("deepseek_v3", dict(aux_loss_alpha=0.1, seq_aux=True), {}, "deepseek"),
    # the converted model is told nothing about router logits: it adds the loss anyway
    "mixtral": ("mixtral", dict(router_aux_loss_coef=0.1), dict(output_router_logits=False), "transformers"),
    "qwen3_moe": ("qwen3_moe", dict(router_aux_loss_coef=0.1), dict(output_router_logits=False), "transformers"),
}


def reference_deepseek_aux(
    routed: list[tuple[torch.Tensor, torch.Tensor]], alpha: float, seq: bool, sigmoid: bool, batch: int
) -> torch.Tensor:
    """DeepSeek's balance loss per MoE layer, summed, from (router logits [T, E], routed indices [T, k]).

    V2 (softmax, MoEGate): P_i the mean score, f_i = E / (T k) * slots of expert i among the routed top-k; with
    seq_aux per sequence and averaged. V3 (sigmoid, report eqs. 17-20): s' = s / sum_j s_j and the indicator over
    the top-k of the affinities s (no bias, no group limit).
    """
    total = torch.zeros(())
    for logits, idx in routed:
        t, e = logits.shape
        k = idx.shape[-1]
        if sigmoid:
            s = logits.float().sigmoid()
            scores = s / s.sum(dim=-1, keepdim=True)
            idx = torch.topk(s, k, dim=-1).indices
        else:
            scores = logits.float().softmax(dim=-1)
        if seq:
            s_len = t // batch
            f = F.one_hot(idx.reshape(batch, s_len * k), e).float().sum(dim=1) * e / (s_len * k)  # [B, E]
            p = scores.reshape(batch, s_len, e).mean(dim=1)
            total = total + alpha * (f * p).sum(dim=1).mean()
        else:
            f = F.one_hot(idx.reshape(-1), e).float().mean(dim=0) * e
            total = total + alpha * (scores.mean(dim=0) * f).sum()
    return total


def _load(path: Path, **overrides) -> torch.nn.Module:
    """The unconverted model, its config changed by ``overrides`` (keys transformers' class may not declare)."""
    config = AutoConfig.from_pretrained(path)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)


def _gates(model) -> list[tuple[int, torch.nn.Module]]:
    return [(i, layer.mlp.gate) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _reference(path: Path, both: dict, kind: str, ids: torch.Tensor) -> dict:
    """The unconverted model's loss with the balance term, its aux value, its router gradients with and without."""
    ref = _load(path, **both).train()
    grads = {}
    for with_aux in (True, False):
        routed: list = []
        hooks = [
            g.register_forward_hook(lambda m, a, o, seen=routed: seen.append((o[0], o[2]))) for _, g in _gates(ref)
        ]
        if kind == "transformers":
            out = ref(input_ids=ids, labels=ids, output_router_logits=with_aux)
            loss, aux = out.loss, (out.aux_loss if with_aux else None)
        else:
            out = ref(input_ids=ids, labels=ids)
            aux = None
            if with_aux:
                cfg = ref.config
                sigmoid = cfg.model_type == "deepseek_v3"
                aux = reference_deepseek_aux(routed, cfg.aux_loss_alpha, cfg.seq_aux, sigmoid, ids.shape[0])
            loss = out.loss + (aux if aux is not None else 0.0)
        for h in hooks:
            h.remove()
        ref.zero_grad()
        loss.backward()
        grads[with_aux] = {i: g.weight.grad.clone() for i, g in _gates(ref)}
        if with_aux:
            result = {"loss": loss.item(), "aux": aux.item()}
    effect = max((grads[True][i] - grads[False][i]).abs().max().item() for i in grads[True])
    return {**result, "grads": grads[True], "aux_effect": effect}


def router_grads(ckpt_root: str, tps: list[int], audit_tp: int) -> dict:
    """Every case at every tp size of ``tps`` in this one launch: (case, tp) -> the differences to the reference."""
    ids = seeded_ids(250, 2, 12, 5)
    refs = {name: _reference(Path(ckpt_root) / ckpt, both, kind, ids) for name, (ckpt, both, _, kind) in CASES.items()}
    out = {}
    for tp in tps:
        state = npu_parallel.init_distributed(tp)
        for name, (ckpt, both, mine, _) in CASES.items():
            loaded = _load(Path(ckpt_root) / ckpt, **both, **mine)
            model = npu_parallel.convert_model(loaded, state).train()
            result = model(input_ids=ids, labels=ids)
            result.loss.backward()
            ref = refs[name]
            diff = max((g.weight.grad - ref["grads"][i]).abs().max().item() for i, g in _gates(model))
            row = {
                "grad_diff": diff,
                "aux_effect": ref["aux_effect"],
                "loss": result.loss.item(),
                "ref_loss": ref["loss"],
                "aux": result.aux_loss.item(),
                "ref_aux": ref["aux"],
            }
            if tp == audit_tp:
                with OpAudit(model=model) as audit:
                    model(input_ids=ids, labels=ids).loss.backward()
                row["banned_ops"] = [(e.op, e.where) for e in audit.banned()]
                row["host_syncs_forward"] = audit.host_syncs(phase="forward")
                off = npu_parallel.convert_model(
                    _load(Path(ckpt_root) / ckpt, **both, **mine),
                    state,
                    aux_loss_coef=0.0,
                ).train()
                with OpAudit(model=off) as audit:
                    loss_off = off(input_ids=ids, labels=ids)
                row["host_syncs_forward_without_aux"] = audit.host_syncs(phase="forward")
                row["aux_off"] = loss_off.aux_loss
            out[f"{name}@tp{tp}"] = row
    return out
