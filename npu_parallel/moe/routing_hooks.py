"""Routing hooks: see (``record_routing``) and replace (``override_routing``) a converted model's top-k choice.

Each converted :class:`~npu_parallel.moe.block.MoEBlock` has ``routing_hook = None``; its ``route()`` calls the
hook only when one is installed (a None check is all the cost without one). The hook sits after the family's own
router ran, on its output:

- ``raw_logits [T, E]``: the router's linear output, before any bias, softmax/sigmoid or group mask;
- ``scores [T, E]``: what the family's top-k ranks (DeepSeek-V3: ``sigmoid(raw) + e_score_correction_bias``
  with the groups left out masked; V2 ``group_limited_greedy``: softmax with them masked to 0; others softmax);
- ``ids [T, k]`` and ``weights [T, k]``: the experts each token goes to and the weights of their outputs.

An override replaces the top-k: ``fn(layer, router_input [T, H], raw_logits, scores)`` returns ``ids`` or
``(ids, weights)``; without weights the family's own are taken at the chosen ids (:mod:`~npu_parallel.moe.
routing_rule`: DeepSeek-V3's sigmoid probabilities without the bias, normalised and scaled, with their gradient).
Every rank of a tp group routes the same tokens, and a rank that disagreed would send tokens to the wrong
experts, so the result is broadcast from the tp group's first rank before dispatch (``agree="broadcast"``) or
compared across the group (``agree="check"``, a RoutingDisagreement on every rank). With ep > tp each tp group
routes its own tokens: the agreement is within the tp group. The load counters, the V3 bias update and the
load-balancing loss see the overridden ids (a remote-code MoEGate's own auxiliary loss still counts its own).

Records are taken from the same tensors (detached), so they are whole and identical on every rank of a tp
group; a recomputation in the backward (activation checkpointing) records nothing. Shapes: T tokens of the
forward (batch x sequence, flattened), H hidden, E routed experts, k top-k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.moe.block import MoEBlock
from npu_parallel.moe.routing_rule import RouterMath

__all__ = [
    "FIELDS",
    "OverrideFn",
    "RoutingDisagreement",
    "RoutingRecord",
    "RoutingRecorder",
    "override_routing",
    "record_routing",
]

FIELDS = ("raw_logits", "scores", "ids", "weights")
AGREE = ("broadcast", "check")
OverrideFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, ...]"]


class RoutingDisagreement(RuntimeError):
    """``override_routing(..., agree="check")``: the ranks of a tp group chose different experts."""


@dataclass
class RoutingRecord:
    """One MoE layer's routing in one forward; a field not asked for is None."""

    raw_logits: torch.Tensor | None = None  # [T, E]
    scores: torch.Tensor | None = None  # [T, E]
    ids: torch.Tensor | None = None  # [T, k] int64
    weights: torch.Tensor | None = None  # [T, k]


@dataclass
class RoutingRecorder:
    """What ``record_routing`` yields: ``layers[i]`` is decoder layer i's list of records, one per forward."""

    fields: tuple[str, ...]
    device: torch.device | None
    layers: dict[int, list[RoutingRecord]] = field(default_factory=dict)

    def add(self, layer: int, values: dict[str, torch.Tensor]) -> None:
        kept = {}
        for name in self.fields:
            t = values[name].detach()
            kept[name] = t.to(self.device, copy=True) if self.device is not None else t.clone()
        self.layers.setdefault(layer, []).append(RoutingRecord(**kept))

    def clear(self) -> None:
        for records in self.layers.values():
            records.clear()


class BlockHook:
    """The hook one block calls from ``route()``: its recorders and its override, if any."""

    def __init__(self, layer: int, math: RouterMath) -> None:
        self.layer, self.math = layer, math
        self.recorders: list[RoutingRecorder] = []
        self.override: OverrideFn | None = None
        self.agree = "broadcast"

    @property
    def idle(self) -> bool:
        return not self.recorders and self.override is None

    def __call__(
        self, block: MoEBlock, hidden_states: torch.Tensor, output: object, ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        raw = block.raw_logits(rows, output, weights)  # [T, E]; remote code, transformers 4.x: the fp32 linear
        assert raw is not None, f"{type(block.gate).__name__} gives no logits and has no [E, H] weight"
        scores = self.math.scores(raw, block.gate)  # [T, E]
        with torch.no_grad():
            self.math.check(raw, scores, ids, weights)
        if self.override is not None:
            ids, weights = self._override(block, rows, raw, scores, ids, weights)
        if self.recorders and torch._C._current_graph_task_id() == -1:  # not a recomputation in the backward
            values = {"raw_logits": raw, "scores": scores, "ids": ids, "weights": weights}
            for rec in self.recorders:
                rec.add(self.layer, values)
        return ids, weights

    def _override(self, block, rows, raw, scores, own_ids, own_weights) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.override is not None
        out = self.override(self.layer, rows, raw, scores)
        ids, weights = (out[0], out[1]) if isinstance(out, tuple | list) else (out, None)
        where = f"override_routing: layer {self.layer}"
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or tuple(ids.shape) != tuple(own_ids.shape):
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(
                f"{where}: fn returned ids {got}; it must return integer expert ids of shape "
                f"{tuple(own_ids.shape)} (tokens, top_k) on the router input's device"
            )
        if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != own_ids.shape):
            raise ValueError(f"{where}: fn returned weights that are not a tensor of shape {tuple(own_ids.shape)}")
        ids = self._agree(ids.to(own_ids.device, torch.int64).contiguous(), block)
        low, high = ids.aminmax()
        if low.item() < 0 or high.item() >= self.math.num_experts:  # the same ids on every rank: all raise
            raise ValueError(f"{where}: fn returned expert ids outside [0, {self.math.num_experts})")
        if weights is None:
            return ids, self.math.weights(raw, ids).to(own_weights.dtype)
        weights = weights.to(own_weights.dtype)
        agreed = self._agree(weights.detach().clone(), block)
        return ids, weights + (agreed - weights.detach())  # rank 0's values, this rank's gradient path

    def _agree(self, t: torch.Tensor, block: MoEBlock) -> torch.Tensor:
        tp = block.tp
        if tp.size == 1 or tp.group is None:
            return t
        if self.agree == "broadcast":
            dist.broadcast(t, src=tp.ranks[0], group=tp.group)
            return t
        low, high = t.clone(), t.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=tp.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=tp.group)
        if not torch.equal(low, high):
            raise RoutingDisagreement(
                f"override_routing: layer {self.layer}: the ranks of the tp group {list(tp.ranks)} chose different "
                f"experts or weights; make fn deterministic or use agree='broadcast' (rank {tp.ranks[0]}'s choice)"
            )
        return t


def _blocks(model: nn.Module, layers: Sequence[int] | None, what: str) -> list[tuple[int, MoEBlock]]:
    from npu_parallel.moe.load import layer_index, moe_blocks

    found: list[tuple[int, MoEBlock]] = []
    for path, block in moe_blocks(model):
        index = layer_index(path)
        found.append((index if index is not None else len(found), block))
    if not found:
        raise ValueError(
            f"{what}: {type(model).__name__} has no converted MoE block; pass a model returned by "
            f"npu_parallel.convert_model, load_pretrained or load_sharded"
        )
    if layers is None:
        return found
    known = {i for i, _ in found}
    unknown = [i for i in layers if i not in known]
    if unknown:
        raise ValueError(f"{what}: layers={list(layers)}: {unknown} are not MoE layers; MoE layers: {sorted(known)}")
    wanted = set(layers)
    return [(i, b) for i, b in found if i in wanted]


def _installed(block: MoEBlock) -> BlockHook | None:
    hook = block.routing_hook
    return hook if isinstance(hook, BlockHook) else None


def _hook(block: MoEBlock, layer: int) -> BlockHook:
    hook = _installed(block)
    if hook is None:
        hook = BlockHook(layer, block.routing_math())  # one math per block: RSample's check is the hook's too
        block.routing_hook = hook
    return hook


def _release(block: MoEBlock) -> None:
    hook = _installed(block)
    if hook is not None and hook.idle:
        block.routing_hook = None


@contextlib.contextmanager
def record_routing(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    fields: Sequence[str] = FIELDS,
    device: str | torch.device | None = "cpu",
) -> Iterator[RoutingRecorder]:
    """Record the routing of ``layers`` (decoder layer indices; None: every MoE layer) in every forward.

    ``rec.layers[i]`` lists one :class:`RoutingRecord` per forward (``generate``: one per decoding step) with
    ``fields`` (of ``raw_logits``, ``scores``, ``ids``, ``weights``), copied to ``device`` (None: kept where they
    are). Memory is what the chosen layers and fields take: ``[T, E]`` floats for logits and scores, ``[T, k]``.
    """
    bad = [f for f in fields if f not in FIELDS]
    if bad or not fields:
        raise ValueError(f"record_routing: fields={list(fields)}: choose among {list(FIELDS)}")
    chosen = _blocks(model, layers, "record_routing")
    rec = RoutingRecorder(tuple(fields), torch.device(device) if device is not None else None)
    for layer, block in chosen:
        _hook(block, layer).recorders.append(rec)
        rec.layers.setdefault(layer, [])
    try:
        yield rec
    finally:
        for _, block in chosen:
            hook = _installed(block)
            if hook is not None and rec in hook.recorders:
                hook.recorders.remove(rec)
            _release(block)


@contextlib.contextmanager
def override_routing(
    model: nn.Module, fn: OverrideFn, layers: Sequence[int] | None = None, agree: str = "broadcast"
) -> Iterator[None]:
    """Replace the top-k choice of ``layers`` (None: every MoE layer) by ``fn(layer, router_input, raw_logits,
    scores) -> ids | (ids, weights)`` (``[T, k]``), made identical on every rank of the tp group before dispatch."""
    if agree not in AGREE:
        raise ValueError(f"override_routing: agree={agree!r}: choose {AGREE[0]!r} or {AGREE[1]!r}")
    if not callable(fn):
        raise TypeError(f"override_routing: fn must be callable(layer, router_input, raw_logits, scores), not {fn!r}")
    chosen = _blocks(model, layers, "override_routing")
    taken = [i for i, b in chosen if (h := _installed(b)) is not None and h.override is not None]
    if taken:
        raise ValueError(f"override_routing: layers {taken} are already overridden (one override per layer at a time)")
    for layer, block in chosen:
        new = _hook(block, layer)
        new.override, new.agree = fn, agree
    try:
        yield
    finally:
        for _, block in chosen:
            hook = _installed(block)
            if hook is not None:
                hook.override = None
            _release(block)
