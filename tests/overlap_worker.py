"""Rank worker: the all-to-all dispatchers with the shared experts overlapped (``overlap_shared=True``) against the
same dispatchers without it, bit for bit: logits, loss and every gradient, and the op audit of the overlapped run."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import npu_parallel
from npu_parallel.moe.dispatchers import implementation
from npu_parallel.parallel import collectives
from npu_parallel.tools.audit import OpAudit

from .common import seeded_ids
from .models import load_reference

ROWS, SEQ = 2, 16  # per dp rank: each its own rows, so the all-to-all moves different tokens both ways


class _AsyncCount:
    """Counts ``all_to_all_single`` calls made with ``async_op=True`` (the overlapped path) while installed."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = dist.all_to_all_single

    def __enter__(self) -> _AsyncCount:
        def counted(*args, **kwargs):
            self.calls += bool(kwargs.get("async_op", False))
            return self._real(*args, **kwargs)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._real


class _BackwardOrder:
    """The order, in one backward, of the async all-to-all's backward halves and of the gradients of one MoE
    block's shared-expert projections and routed experts (post-accumulate hooks) while installed."""

    def __init__(self, block) -> None:
        self.log: list[str] = []
        self._real = collectives._AllToAllStart.backward, collectives._AllToAllWait.backward
        self._hooks = [
            getattr(block.shared_module(), n).weight.register_post_accumulate_grad_hook(self._note(n))
            for n in ("gate_proj", "up_proj", "down_proj")
        ]
        self._hooks.append(block.experts.gate_up_proj.register_post_accumulate_grad_hook(self._note("experts")))

    def _note(self, what: str):
        return lambda *_: self.log.append(what)

    def __enter__(self) -> _BackwardOrder:
        start, wait = self._real

        def start_bwd(ctx, grad):
            self.log.append("wait")
            return start(ctx, grad)

        def wait_bwd(ctx, grad):
            self.log.append("launch")
            return wait(ctx, grad)

        collectives._AllToAllStart.backward, collectives._AllToAllWait.backward = start_bwd, wait_bwd
        return self

    def __exit__(self, *exc) -> None:
        collectives._AllToAllStart.backward, collectives._AllToAllWait.backward = self._real
        for h in self._hooks:
            h.remove()


def _run(path: Path, name: str, state, impl: str, overlap: bool) -> dict:
    """One converted model's train-mode forward + backward (audited) and an eval forward."""
    model = npu_parallel.convert_model(
        load_reference(name, path), state, moe_impl=implementation(impl)(overlap_shared=overlap)
    )
    ids = seeded_ids(model.config.vocab_size, ROWS, SEQ, 99 + state.dp_rank)
    layers = model.model.layers
    moe = [f"model.layers.{i}" for i, lay in enumerate(layers) if hasattr(lay.mlp, "experts")]
    block = layers[int(moe[0].split(".")[-1])].mlp  # the first MoE layer: the last one backward reaches
    model.train()
    with _AsyncCount() as fwd, OpAudit(model=model) as audit:
        out = model(input_ids=ids, labels=ids)
        with _AsyncCount() as bwd, _BackwardOrder(block) as order:
            out.loss.backward()
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits
    syncs = audit.counts_by_scope("host_sync", phase="forward")
    return {
        "logits": out.logits.detach(),
        "loss": out.loss.detach(),
        "eval_logits": eval_logits,
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "overlap_shared": block.dispatcher.overlap_shared,
        "shared": block.shared_module() is not None,
        "halves": hasattr(block.shared_module(), "forward_first"),  # gate/up then down: overlapping both exchanges
        "backward_order": order.log[-8:],  # the first MoE layer's: the last 8 entries
        "async_forward": fwd.calls - bwd.calls,
        "async_backward": bwd.calls,
        "moe_layers": len(moe),
        "banned_ops": [(e.op, e.where) for e in audit.banned()],
        "host_syncs_per_moe_layer": [syncs.get(s, 0) for s in moe],
        "host_syncs_backward": audit.host_syncs(phase="backward"),
        "alltoall_forward": audit.collectives(name="alltoall", phase="forward"),
        "alltoall_backward": audit.collectives(name="alltoall", phase="backward"),
    }


def _everywhere(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    t = torch.tensor(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def compare(ckpt_root: str, cases: list[tuple[str, int, int, str]]) -> dict:
    """{"name tp= ep= impl": comparison} for each case, overlap on against off, in one launch."""
    results = {}
    for name, tp, ep, impl in cases:
        state = npu_parallel.init_distributed(tp, ep_size=ep)
        on, off = (_run(Path(ckpt_root) / name, name, state, impl, overlap) for overlap in (True, False))
        differ = sorted(
            n for n in off["grads"] if not torch.equal(on["grads"].get(n, off["grads"][n] + 1), off["grads"][n])
        )
        results[f"{name} tp={tp} ep={ep} {impl}"] = {
            "logits_equal": _everywhere(torch.equal(on["logits"], off["logits"])),
            "loss_equal": _everywhere(torch.equal(on["loss"], off["loss"])),
            "eval_logits_equal": _everywhere(torch.equal(on["eval_logits"], off["eval_logits"])),
            "grads_equal": _everywhere(not differ and on["grads"].keys() == off["grads"].keys()),
            "grads_differing": differ,
            "grads": len(off["grads"]),
            **{f"{k}_on": on[k] for k in ("overlap_shared", "async_forward", "async_backward", "alltoall_forward")},
            **{f"{k}_off": off[k] for k in ("overlap_shared", "async_forward", "async_backward", "alltoall_forward")},
            **{k: on[k] for k in ("shared", "halves", "moe_layers", "banned_ops", "host_syncs_per_moe_layer")},
            "backward_order_on": on["backward_order"],
            "host_syncs_backward_on": on["host_syncs_backward"],
            "alltoall_backward_on": on["alltoall_backward"],
            "alltoall_backward_off": off["alltoall_backward"],
        }
    return results
