"""Reusable parallel styles: each turns one module of a loaded model into its tensor-parallel form.

A plan (plans.py) maps module paths to styles; convert_model applies them. A style that ``owns`` its
subtree converts the children itself; otherwise conversion continues into the children.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

from torch import nn

from npu_parallel.convert.heads import check_heads_patched, divide_heads
from npu_parallel.convert.options import ConversionOptions
from npu_parallel.moe.balance import BalanceRule
from npu_parallel.moe.block import MoEBlock
from npu_parallel.moe.dispatchers import Dispatcher
from npu_parallel.moe.experts import LocalExperts, is_silu
from npu_parallel.moe.gate_options import GateNoise, GateOptions
from npu_parallel.moe.routing_rule import RouterRule
from npu_parallel.parallel import kernels
from npu_parallel.parallel.collectives import copy_to_tp
from npu_parallel.parallel.linear import (
    ColumnParallelLinear,
    GradSummedRMSNorm,
    HeadSelectLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from npu_parallel.parallel.state import Group
from npu_parallel.parallel.vocab import ParallelLMHead, VocabParallelEmbedding

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What styles need beyond the module: ranks, group, config, the MoE dispatcher (resolved once)."""

    tp: Group
    config: object
    dispatcher: Dispatcher
    options: ConversionOptions = field(default_factory=ConversionOptions)  # aux_loss_coef, gate_options, ...
    converted: dict = field(default_factory=dict)  # path -> new module, for styles that refer to others
    balance: BalanceRule | None = None  # the family's load-balancing loss
    ep: Group | None = None  # the ranks splitting the routed experts (None: the tp group)
    router_rule: RouterRule | None = None  # the family's routing math (routing hooks)


class Style:
    owns_subtree = False

    def applies(self, module: nn.Module) -> bool:
        return True

    def apply(self, module: nn.Module, ctx: Context, path: str) -> nn.Module:
        raise NotImplementedError


class LinearStyle(Style):
    """A style for one ``nn.Linear``: ``build`` makes its parallel form."""

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def apply(self, module: nn.Module, ctx: Context, path: str) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{type(self).__name__} expects nn.Linear at {path!r}, found {type(module).__name__}")
        return self.build(module, ctx)

    def build(self, linear: nn.Linear, ctx: Context) -> nn.Module:
        raise NotImplementedError


@dataclass
class Colwise(LinearStyle):
    """Output features split; f on the input unless an enclosing style already applied it."""

    input_grad_reduce: bool = True

    def build(self, linear: nn.Linear, ctx: Context) -> nn.Module:
        return ColumnParallelLinear.from_linear(linear, ctx.tp, input_grad_reduce=self.input_grad_reduce)


@dataclass
class Rowwise(LinearStyle):
    """Input features split; output all-reduced (or left partial for the enclosing block to reduce)."""

    reduce_output: bool = True

    def build(self, linear: nn.Linear, ctx: Context) -> nn.Module:
        return RowParallelLinear.from_linear(linear, ctx.tp, reduce_output=self.reduce_output)


@dataclass
class ReplicatedSumGradFrom(LinearStyle):
    """Kept whole on every rank; output-gradient columns from ``config.<start_attr>`` on are all-reduced."""

    start_attr: str

    def build(self, linear: nn.Linear, ctx: Context) -> nn.Module:
        return ReplicatedLinear(linear, getattr(ctx.config, self.start_attr), ctx.tp)


@dataclass
class ShardHeads(Style):
    """Divides head-count attributes that the module's own forward reads (the linears are split by rules)."""

    attrs: tuple[str, ...] = ("num_heads",)

    def apply(self, module, ctx, path):
        values = {n: getattr(module, n) // ctx.tp.size for n in self.attrs if isinstance(getattr(module, n, None), int)}
        check_heads_patched(module, path, divide_heads(module, values), ctx.tp.size, type(self).__name__)
        return module


class VocabParallel(Style):
    def applies(self, module):
        return isinstance(module, nn.Embedding)

    def apply(self, module, ctx, path):
        new = VocabParallelEmbedding.from_embedding(module, ctx.tp)
        ctx.converted["embedding"] = new
        return new


class LMHead(LinearStyle):
    """Column-parallel over the vocab, logits gathered; shares the embedding shard when weights are tied."""

    def build(self, linear: nn.Linear, ctx: Context) -> nn.Module:
        shared = None
        emb = ctx.converted.get("embedding")
        if getattr(ctx.config, "tie_word_embeddings", False) and emb is not None:
            shared = emb.weight
        return ParallelLMHead.from_linear(linear, ctx.tp, shared_weight=shared)


def _input_to_tp_region(tp: Group):
    """A forward pre-hook putting f on a module's first input (a closure: deepcopy shares it, group included)."""

    def hook(module, args, kwargs):
        return (copy_to_tp(args[0], tp), *args[1:]), kwargs

    return hook


def _swiglu_forward(gate: str, up: str, down: str):
    """A gated MLP's forward, ``down(silu(gate(x)) * up(x))``, with the activation on ``kernels.swiglu_pair``.

    Bound to the module as its own ``forward`` (a closure over names only: a deepcopy rebinds it to the copy).
    """

    def forward(self, x):
        return getattr(self, down)(kernels.swiglu_pair(getattr(self, gate)(x), getattr(self, up)(x)))

    return forward


def _swiglu_halves(gate: str, up: str, down: str):
    """The two halves of :func:`_swiglu_forward`: ``silu(gate(x)) * up(x)``, then ``down(h)`` (the MoE block runs
    a shared expert's halves while its dispatch, then its combine, are in flight)."""

    def forward_first(self, x):
        return kernels.swiglu_pair(getattr(self, gate)(x), getattr(self, up)(x))

    def forward_second(self, h):
        return getattr(self, down)(h)

    return forward_first, forward_second


@dataclass
class MLP(Style):
    """Gated MLP: f once on the input, gate/up column-parallel, down row-parallel."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    reduce_output: bool = True
    owns_subtree = True

    def applies(self, module):
        return all(isinstance(getattr(module, n, None), nn.Linear) for n in (self.gate, self.up, self.down))

    def apply(self, module, ctx, path):
        for name in (self.gate, self.up):
            setattr(module, name, Colwise(input_grad_reduce=False).apply(getattr(module, name), ctx, f"{path}.{name}"))
        setattr(
            module, self.down, Rowwise(self.reduce_output).apply(getattr(module, self.down), ctx, f"{path}.{self.down}")
        )
        for attr in ("intermediate_size",):
            if hasattr(module, attr):
                setattr(module, attr, getattr(module, attr) // ctx.tp.size)
        if self.reduce_output:  # a partial MLP (shared experts) sits behind its block's own f
            module.register_forward_pre_hook(_input_to_tp_region(ctx.tp), with_kwargs=True)
        if is_silu(getattr(module, "act_fn", None)):  # npu_swiglu on an NPU
            module.forward = types.MethodType(_swiglu_forward(self.gate, self.up, self.down), module)
            first, second = _swiglu_halves(self.gate, self.up, self.down)
            module.forward_first, module.forward_second = (
                types.MethodType(first, module),
                types.MethodType(second, module),
            )
        return module


@dataclass
class MoE(Style):
    """Routed experts split E/ep per rank (ep rank), router replicated, shared experts sharded as a partial MLP."""

    router: str = "gate"
    experts: str = "experts"
    shared: str | None = "shared_experts"
    shared_gate: str | None = None
    shared_mlp: MLP = field(default_factory=lambda: MLP(reduce_output=False))
    owns_subtree = True

    def applies(self, module):
        return hasattr(module, self.experts) and hasattr(module, self.router)

    def apply(self, module, ctx, path):
        gate = getattr(module, self.router)
        ep = ctx.ep or ctx.tp
        experts = LocalExperts.from_module(getattr(module, self.experts), ep)
        shared = getattr(module, self.shared, None) if self.shared else None
        if shared is not None:
            shared = self.shared_mlp.apply(shared, ctx, f"{path}.{self.shared}")
        balance = None
        if ctx.balance is not None:
            balance = ctx.balance.resolve(ctx.config, gate, experts.num_experts, ctx.options.aux_loss_coef)
        new = MoEBlock(
            router=gate,
            experts=experts,
            dispatcher=ctx.dispatcher,
            tp=ctx.tp,
            ep=ep,
            shared_experts=shared,
            shared_name=self.shared or "shared_experts",
            shared_down=self.shared_mlp.down,
            shared_expert_gate=getattr(module, self.shared_gate, None) if self.shared_gate else None,
            balance=balance,
        )
        new.router_rule = ctx.router_rule  # the family's routing math, for the routing hooks
        _set_gate_options(new, module, ctx.options.gate_options or GateOptions(), path)
        if hasattr(module, "config"):
            new.config = module.config
        return new


def _set_gate_options(block: MoEBlock, source: nn.Module, options: GateOptions, path: str) -> None:
    """Router noise and z-loss onto a converted block; a source block's own jitter (transformers' Mixtral
    ``router_jitter_noise``) is kept unless the options name a noise of their own."""
    from npu_parallel.moe.load import layer_index

    own = getattr(source, "jitter_noise", None)
    kind, eps = options.noise, options.noise_eps
    if kind is None and isinstance(own, float) and own > 0:
        kind, eps = "mixtral", own
    elif kind is not None and isinstance(own, float) and own > 0 and (kind, eps) != ("mixtral", own):
        logger.warning(
            "%s: router noise %s (eps %g) replaces the config's router_jitter_noise %g", path, kind, eps, own
        )
    if kind is not None:
        block.gate_noise = GateNoise(kind, eps, options.seed, layer_index(path) or 0)
    block.z_loss_coef = options.z_loss_coef


def kv_heads_kept(num_heads: int, num_kv: int, tp_size: int, tp_rank: int) -> tuple[int, int, bool]:
    """(first, count, split) of the key/value heads this rank keeps for GQA at this tp size."""
    if num_kv % tp_size == 0:
        per = num_kv // tp_size
        return tp_rank * per, per, True
    group = num_heads // num_kv  # query heads per key/value head
    first_q = tp_rank * (num_heads // tp_size)
    return first_q // group, 1, False


@dataclass
class GQAttention(Style):
    """Standard multi-head / grouped-query attention: query heads split; key/value heads split when tp
    divides them, else kept whole and each rank selects the head its query heads use; o row-parallel.
    Per-head norms (``q_norm``/``k_norm``) stay whole with their gradient summed over the group."""

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    norms: tuple[str, ...] = ("q_norm", "k_norm")
    owns_subtree = True

    def applies(self, module):
        return all(isinstance(getattr(module, n, None), nn.Linear) for n in (self.q, self.k, self.v, self.o))

    def apply(self, module, ctx, path):
        cfg = ctx.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(module, "head_dim", None) or cfg.hidden_size // heads
        setattr(module, self.q, Colwise().apply(getattr(module, self.q), ctx, f"{path}.{self.q}"))
        first, count, split = kv_heads_kept(heads, kv, ctx.tp.size, ctx.tp.rank)
        for name in (self.k, self.v):
            lin = getattr(module, name)
            if split:
                new = Colwise().apply(lin, ctx, f"{path}.{name}")
            else:
                new = HeadSelectLinear(lin, first * head_dim, (first + count) * head_dim, ctx.tp)
            setattr(module, name, new)
        setattr(module, self.o, Rowwise().apply(getattr(module, self.o), ctx, f"{path}.{self.o}"))
        for name in self.norms:
            norm = getattr(module, name, None)
            if norm is not None and ctx.tp.size > 1:
                setattr(module, name, GradSummedRMSNorm(norm, ctx.tp))
        local_q = heads // ctx.tp.size
        module.num_key_value_groups = local_q // count
        values = {"num_heads": local_q, "num_key_value_heads": count}
        if getattr(module, "hidden_size", None) == heads * head_dim:  # the output width (older Llama-style code)
            values["hidden_size"] = local_q * head_dim
        check_heads_patched(module, path, divide_heads(module, values), ctx.tp.size, type(self).__name__)
        return module
