"""Rank worker: the converted model against the unconverted reference, on every variant, at one tp size."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import npu_parallel
from npu_parallel.tools.audit import OpAudit

from .common import seeded_ids, sgd_step
from .models import load_reference

SGD_LR = 2.0


def _batch(vocab: int) -> torch.Tensor:
    return seeded_ids(vocab, 2, 16, 1234)


def _gate_losses(model) -> list:
    """Hooks collecting what remote-code MoEGates return as their auxiliary loss (their model puts it in the
    gradient only; the converted model adds it to ``out.loss`` as well)."""
    seen: list = []

    def hook(module, args, out):
        if isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], torch.Tensor) and out[2].numel() == 1:
            seen.append(out[2].detach())

    handles = [m.register_forward_hook(hook) for m in model.modules() if hasattr(m, "alpha") and hasattr(m, "top_k")]
    return seen, handles


def _step(model, ids, reference: bool = False):
    """Loss and logits, then one SGD step and the loss after it (a reference's MoEGate losses added to its loss)."""
    seen, handles = _gate_losses(model) if reference else ([], [])
    model.train()
    out = model(input_ids=ids, labels=ids)
    loss = out.loss.detach() + sum(seen)
    out.loss.backward()
    sgd_step(model, SGD_LR)
    seen.clear()
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss + sum(seen)
    for h in handles:
        h.remove()
    return loss, out.logits.detach(), after


def _numel(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def compare(ckpt_root: str, names: list[str], tp: int, moe_impl: str = "auto") -> dict:
    state = npu_parallel.init_distributed(tp)
    results = {}
    for name in names:
        path = Path(ckpt_root) / name
        ref = load_reference(name, path)
        ids = _batch(ref.config.vocab_size)
        full = _numel(ref)
        ref_loss, ref_logits, ref_after = _step(ref, ids, reference=True)
        del ref

        model = npu_parallel.convert_model(load_reference(name, path), state, moe_impl=moe_impl)
        loss, logits, after = _step(model, ids)

        moe_layers = [
            f"model.layers.{i}" for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")
        ]
        dense_layers = [
            f"model.layers.{i}" for i, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts")
        ]
        with OpAudit(model=model) as audit:
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        model.zero_grad(set_to_none=True)
        reduces = audit.counts_by_scope("collective", name="allreduce", phase="forward")
        syncs = audit.counts_by_scope("host_sync", phase="forward")

        shares = [None] * state.world_size
        dist.all_gather_object(shares, _numel(model) / full)
        results[name] = {
            "logits_max_diff": (logits - ref_logits).abs().max().item(),
            "logits_shape": tuple(logits.shape),
            "ref_logits_shape": tuple(ref_logits.shape),
            "loss": loss.item(),
            "ref_loss": ref_loss.item(),
            "loss_after_step": after.item(),
            "ref_loss_after_step": ref_after.item(),
            "param_share_per_rank": shares,
            "banned_ops": [(e.op, e.where) for e in audit.banned()],
            "host_syncs_per_moe_layer": [syncs.get(s, 0) for s in moe_layers],
            "host_syncs_forward_total": audit.host_syncs(phase="forward"),
            "allreduce_per_moe_layer": [reduces.get(s, 0) for s in moe_layers],
            "allreduce_per_dense_layer": [reduces.get(s, 0) for s in dense_layers],
            "allreduce_outside_layers": reduces.get("", 0),
            "allgather_forward": audit.collectives(name="allgather", phase="forward"),
            "allreduce_backward": audit.collectives(name="allreduce", phase="backward"),
        }
        del model
    return results
