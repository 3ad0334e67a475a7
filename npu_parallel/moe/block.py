"""The tensor/expert-parallel MoE block: route -> dispatch -> compute -> combine, shared experts, one all-reduce.

Shapes: B batch, S sequence, T = B*S tokens, k top-k, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from npu_parallel.moe.balance import Balance, LayerTerm
from npu_parallel.moe.dispatchers import Dispatcher
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.moe.gate_options import GateNoise, z_loss
from npu_parallel.moe.router import router_logits, router_outputs
from npu_parallel.moe.routing_rule import RouterMath, RouterRule
from npu_parallel.moe.token_layout import TokenLayout
from npu_parallel.parallel.collectives import copy_to_tp, reduce_from_tp, reduce_grad
from npu_parallel.parallel.shard_spec import ShardedModule
from npu_parallel.parallel.state import Group


def _global_module_hooks() -> bool:
    """Whether forward hooks for every module are registered (calling a module's halves would skip them)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


class MoEBlock(ShardedModule):
    """A MoE block converted for TP: every rank routes all tokens with the replicated router, runs its
    ``E/ep`` experts and its shard of the shared experts, and one all-reduce sums both partial outputs.
    With ep > tp the dispatcher brings the tokens of the ep group's other tp groups (all-to-all).

    Gradients: f on the expert input makes the hidden-state gradient whole; the routing weights pass
    through an all-reduce-in-backward so the router, which each rank holds whole, gets the full
    gradient (each rank alone only sees its own experts' share of it).

    In train mode the block keeps its layer's load-balancing term and routed load (``balance_term``, see
    :mod:`npu_parallel.moe.balance`); the model's forward hook (:mod:`npu_parallel.moe.load`) adds the layers'
    terms to the loss once and accumulates the load.
    """

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: LocalExperts,
        dispatcher: Dispatcher,
        tp: Group,
        ep: Group | None = None,
        shared_experts: nn.Module | None = None,
        shared_name: str = "shared_experts",
        shared_down: str = "down_proj",
        shared_expert_gate: nn.Module | None = None,
        balance: Balance | None = None,
    ):
        super().__init__()
        self.gate, self.experts = router, experts  # "gate": the source models' name, kept for parameter names
        # the source model's attribute name (shared_experts, shared_expert), so parameter names do not change
        self.shared_name = shared_name
        if shared_experts is not None:
            setattr(self, shared_name, shared_experts)
        self.shared_expert_gate = shared_expert_gate  # Qwen2-MoE: sigmoid(gate(x)) scales the shared expert
        self.shared_down = shared_down  # its bias is added once, after the all-reduce
        self.tp = tp
        # a copy per block: a dispatcher may keep per-forward statistics (the static one's drop count)
        self.dispatcher = dispatcher.copy()
        self.balance = balance
        self.balance_term: LayerTerm | None = None  # this forward's (train mode); taken by the model's hook
        self.expert_load: torch.Tensor | None = None  # [E] int64 token-slots routed since the last read
        self.dropped: torch.Tensor | None = None  # int64 slots the static dispatcher dropped since the last read
        self.ep = ep or tp  # the ranks splitting the routed experts: the tp group or several whole ones
        self.dispatcher.bind(tp, self.ep)
        # routing hooks (npu_parallel.moe.routing_hooks): the family's routing math, and the hook when one is
        # installed (record_routing / override_routing); None costs one check per forward
        self.router_rule: RouterRule | None = None
        self.router_math: RouterMath | None = None  # resolved from router_rule when first needed
        self.routing_hook: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        # gate options (npu_parallel.moe.gate_options), train mode only: router noise, the router z-loss
        self.gate_noise: GateNoise | None = None
        self.z_loss_coef = 0.0
        self.z_term: torch.Tensor | None = None  # this forward's weighted z-loss; taken by the model's hook
        self.layout: TokenLayout | None = None  # this forward's padding and documents (moe/load.token_layout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape  # [B, S, H]
        if self.training and self.gate_noise is not None and self.gate_noise.kind == "mixtral":
            hidden_states = self.gate_noise.jitter(hidden_states)  # router and experts see it (transformers' Mixtral)
        tokens = hidden_states.reshape(-1, shape[-1])  # [T, H]
        # route: the replicated router on every rank; the routing weights' gradient is summed over the group
        indices, weights = self.route(hidden_states)  # [T, k] each
        weights = reduce_grad(weights, self.tp)
        x = copy_to_tp(tokens, self.tp)  # f: the expert input's gradient is summed over the group
        self.dispatcher.training = self.training
        # dispatch -> compute -> combine: this rank's experts on their rows, weighted back into [T, H]; the shared
        # experts' two halves run while the tokens travel, and while the outputs travel back (all-to-all dispatchers)
        shared_experts = self.shared_module()
        first, second = self._shared_work(shared_experts, x, tokens)
        routed, h = self.dispatcher.dispatch_overlapped(x, indices, weights, self.experts, first)
        out = self.experts(routed.rows, routed.matmul)
        y, shared = self.dispatcher.combine_overlapped(out, routed, lambda: second(h))  # [T, H] each, partial
        if shared is not None:
            y = y + shared
        y = reduce_from_tp(y, self.tp)  # the one all-reduce: experts and shared experts together
        bias = getattr(shared_experts, self.shared_down).bias if shared_experts is not None else None
        if bias is not None:
            y = y + bias
        return y.view(shape)

    def _shared_work(
        self, shared_experts: nn.Module | None, x: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[Callable[[], torch.Tensor | None], Callable[[torch.Tensor | None], torch.Tensor | None]]:
        """The shared experts ``[T, H]`` (partial: this rank's intermediate columns) as two pieces of work, the
        first overlapping the dispatch, the second (given the first's result) the combine: the gated MLP's
        ``forward_first`` (gate, up, activation) and ``forward_second`` (down) where it has them and no module hook
        would be skipped, else the whole module first."""
        if shared_experts is None:
            return (lambda: None), (lambda h: None)
        first = getattr(shared_experts, "forward_first", None)
        second = getattr(shared_experts, "forward_second", None)
        hooked = shared_experts._forward_hooks or shared_experts._forward_pre_hooks
        if first is None or second is None or hooked or _global_module_hooks():
            first, second = shared_experts, (lambda h: h)

        def finish(h: torch.Tensor | None) -> torch.Tensor:
            shared = second(h)
            if self.shared_expert_gate is not None:
                # per-token scale [T, 1], replicated; its gradient is partial per rank like the routing weights
                shared = reduce_grad(torch.sigmoid(self.shared_expert_gate(tokens)), self.tp) * shared
            return shared

        return (lambda: first(x)), finish

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [T, k], weights [T, k])`` from the router; in train mode also this layer's balance term."""
        noise = self.gate_noise if self.training else None
        router_in = hidden_states
        if noise is not None and noise.kind == "jitter":  # DeepSpeed's Jitter: the router's input only
            router_in = noise.jitter(hidden_states)
        output = self.gate(router_in)
        indices, weights, aux_loss = router_outputs(output)
        if indices is None or weights is None:
            raise TypeError(
                f"{type(self.gate).__name__} returned no top-k indices and weights (logits only?); the "
                f"MoE block needs a router that does the top-k (transformers >= 5, remote-code MoEGate)"
            )
        t = hidden_states.numel() // hidden_states.shape[-1]
        indices, weights = indices.reshape(t, -1), weights.reshape(t, -1)
        own = weights  # the router's own: with k == E its logits have their shape too (router_logits tells them apart)
        if noise is not None and noise.kind == "rsample":
            indices, weights = self._rsample(noise, router_in, output, indices, weights)
        if self.routing_hook is not None:  # record_routing / override_routing: sees, or replaces, the top-k
            indices, weights = self.routing_hook(self, router_in, output, indices, weights)
        if self.training and self.z_loss_coef > 0:
            raw = self.raw_logits(router_in, output, own)
            if raw is None:
                raise TypeError(f"router z-loss: {type(self.gate).__name__} gives no logits and has no [E, H] weight")
            self.z_term = z_loss(raw) * self.z_loss_coef
        if self.training and self.balance is not None:
            logits = router_logits(output, self.experts.num_experts, own)
            if logits is None and self.balance.active and self.balance.loss != "router":
                # transformers 4.x routers return (indices, weights) only
                logits = self._recomputed_logits(router_in)
            layout = self.layout if self.layout is not None and self.layout.keep.numel() == t else None
            self.balance_term = self.balance.layer(logits, indices, tuple(hidden_states.shape[:-1]), aux_loss, layout)
        return indices, weights

    def raw_logits(self, router_in: torch.Tensor, output: object, weights: torch.Tensor) -> torch.Tensor | None:
        """The router's raw logits ``[T, E]``: from its output, else its fp32 linear (None: neither)."""
        raw = router_logits(output, self.experts.num_experts, weights)
        if raw is None:
            raw = self._recomputed_logits(router_in)
        return None if raw is None else raw.reshape(-1, self.experts.num_experts)

    def _rsample(
        self, noise: GateNoise, router_in: torch.Tensor, output: object, own_ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RSample: the top-k drawn by Gumbel noise on the family's scores, the family's weights at them."""
        math = self.routing_math()
        if math.scoring != "softmax":
            raise ValueError(
                f"router noise 'rsample' samples from a softmax routing distribution; {type(self.gate).__name__}"
                f" scores by {math.scoring}: use router noise 'jitter' or 'mixtral'"
            )
        raw = self.raw_logits(router_in, output, weights)
        if raw is None:
            raise TypeError(f"router noise 'rsample': {type(self.gate).__name__} gives no logits")
        scores = math.scores(raw, self.gate)  # [T, E]
        with torch.no_grad():  # once: the rule reproduces the router's own choice and weights (else an error)
            math.check(raw, scores, own_ids, weights)
        ids = noise.sample(scores, weights.shape[-1])  # [T, k]
        return ids, math.weights(raw, ids).to(weights.dtype)

    def routing_math(self) -> RouterMath:
        """The family's routing math read from this block's router (its plan's rule), resolved once."""
        if self.router_math is None:
            rule = self.router_rule or RouterRule()
            top_k = int(getattr(self.gate, "top_k", 0) or getattr(self.gate, "num_experts_per_tok", 0) or 0)
            self.router_math = rule.resolve(self.gate, self.experts.num_experts, top_k)
        return self.router_math

    def _recomputed_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The router's logits ``[T, E]`` as its own forward computes them (fp32 linear of its ``weight [E, H]``),
        for routers that do not return them; None when it has no such weight."""
        weight = getattr(self.gate, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (
            self.experts.num_experts,
            hidden_states.shape[-1],
        ):
            return None
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        return nn.functional.linear(rows.float(), weight.float())  # [T, E]

    def shared_module(self) -> nn.Module | None:
        return getattr(self, self.shared_name, None)

    def extra_repr(self) -> str:
        return f"dispatcher={self.dispatcher!r}"
