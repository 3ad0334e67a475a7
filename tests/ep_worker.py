"""Rank worker: expert parallelism over several tp groups (all-to-all) against the unconverted model.

Each dp rank runs its own rows of one global batch; the reference runs the whole batch. The converted model goes
through ``npu_parallel.data_parallel`` (FSDP2: dense weights over dp, routed experts over edp at ep > tp), whose
gradients must be those of the mean loss over the global batch: the loss after one SGD step says whether they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import npu_parallel
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.tools.audit import OpAudit

from .common import seeded_ids, sgd_step
from .equivalence import SGD_LR
from .models import load_reference

ROWS, SEQ = 4, 16  # the global batch: every dp size here (1, 2, 4) divides its rows


def _batch(vocab: int) -> torch.Tensor:
    return seeded_ids(vocab, ROWS, SEQ, 1234)


def average_grads(model, state) -> None:
    """Each gradient -> that of the mean loss over the global batch, by hand (what data_parallel does with FSDP2):
    dense summed over dp, routed experts summed over edp (their ep group's tokens are in them already), both / dp.
    For a model stepped without data_parallel (tests/ep_checkpoint_worker.py)."""
    experts = {id(p) for m in model.modules() if isinstance(m, LocalExperts) for p in m.parameters()}
    for p in model.parameters():
        if p.grad is None:
            continue
        group = state.edp if id(p) in experts else state.dp
        if group.size > 1:
            dist.all_reduce(p.grad, group=group.group)
        p.grad /= state.dp_size


def _load(path: Path, name: str):
    """The unconverted model; a batch-level load-balancing loss (Qwen's) off: it is not linear in the batch, so
    dp ranks averaging their own batches' aux losses (as every data-parallel run does) is not the global one (the
    converted model's own balance loss is turned off the same way: ``aux_loss_coef=0``)."""
    model = load_reference(name, path)
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = 0.0
    return model


def _reference(path: Path, name: str):
    ref = _load(path, name)
    ids = _batch(ref.config.vocab_size)
    ref.train()
    out = ref(input_ids=ids, labels=ids)
    out.loss.backward()
    sgd_step(ref, SGD_LR)
    with torch.no_grad():
        after = ref(input_ids=ids, labels=ids).loss
    return ids, out.logits.detach(), out.loss.detach(), after


def compare(ckpt_root: str, names: list[str], layouts: list[tuple[int, int, str]]) -> dict:
    """{(name, tp, ep, moe_impl): metrics} for every name and layout, in one launch."""
    refs = {name: _reference(Path(ckpt_root) / name, name) for name in names}
    results = {}
    for tp, ep, moe_impl in layouts:
        state = npu_parallel.init_distributed(tp, ep_size=ep)
        rows = ROWS // state.dp_size
        for name in names:
            ids, ref_logits, ref_loss, ref_after = refs[name]
            mine = ids[state.dp_rank * rows : (state.dp_rank + 1) * rows]
            model = npu_parallel.convert_model(
                _load(Path(ckpt_root) / name, name), state, moe_impl=moe_impl, aux_loss_coef=0.0
            )
            model.train()
            npu_parallel.data_parallel(model, state, precision="fp32")
            layers = model.model.layers
            moe_layers = [f"model.layers.{i}" for i, lay in enumerate(layers) if hasattr(lay.mlp, "experts")]
            with OpAudit(model=model) as audit:
                out = model(input_ids=mine, labels=mine)
                out.loss.backward()
            sgd_step(model, SGD_LR)
            with torch.no_grad():
                after = model(input_ids=mine, labels=mine).loss
            losses = torch.stack([out.loss.detach(), after])
            dist.all_reduce(losses)
            losses /= state.world_size  # tp ranks hold the same loss: the mean over dp
            diff = (out.logits.detach() - ref_logits[state.dp_rank * rows : (state.dp_rank + 1) * rows]).abs().max()
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            syncs = audit.counts_by_scope("host_sync", phase="forward")
            block = layers[int(moe_layers[0].split(".")[-1])].mlp
            experts = block.experts.gate_up_proj
            results[f"{name} tp={tp} ep={ep} {moe_impl}"] = {
                "expert_mesh": experts.device_mesh.size(),
                "dispatcher": block.dispatcher.name,
                "local_experts": block.experts.num_local,
                "logits_max_diff": diff.item(),
                "loss": losses[0].item(),
                "ref_loss": ref_loss.item(),
                "loss_after_step": losses[1].item(),
                "ref_loss_after_step": ref_after.item(),
                "banned_ops": [(e.op, e.where) for e in audit.banned()],
                "host_syncs_per_moe_layer": [syncs.get(s, 0) for s in moe_layers],
                "host_syncs_forward_total": audit.host_syncs(phase="forward"),
                "host_syncs_backward_total": audit.host_syncs(phase="backward"),
                "alltoall_forward": audit.collectives(name="alltoall", phase="forward"),
            }
            del model
    return results
