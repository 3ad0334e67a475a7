"""A Plan: every fact about one model family that conversion, loading, saving and the tools need.

Module rules (path pattern -> parallel style), the sizes tp must divide, where the routed experts'
count lives in the config, how the family's checkpoints name their tensors. Plans are declared one per
file in :mod:`npu_parallel.convert.plans`, the registry, which finds them by ``model_type`` (``plan_for``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from npu_parallel.convert.styles import GQAttention, LMHead, MoE, Style, VocabParallel
from npu_parallel.moe.balance import BalanceRule
from npu_parallel.moe.routing_rule import RouterRule
from npu_parallel.parallel.state import divisors

SizeOf = Callable[[object], "int | None"]
Check = Callable[[object, int], "str | None"]


def config_value(config: object, name: str) -> Any:
    """A config attribute, None when absent (transformers configs raise AttributeError for unknown names)."""
    try:
        return getattr(config, name)
    except AttributeError:
        return None


def num_attention_heads(config: object) -> int | None:
    return config_value(config, "num_attention_heads")


@dataclass(frozen=True)
class Plan:
    """One architecture family's parallel plan and checkpoint layout."""

    name: str
    model_types: tuple[str, ...]
    # (module path pattern, style): '*' matches one dotted component; the first style that applies wins
    rules: tuple[tuple[str, Style], ...]
    # config attribute holding the number of routed experts (None for dense families)
    experts_attr: str | None = None
    # (what, size from the config) tp must divide, besides the attention heads and the routed experts
    divides: tuple[tuple[str, SizeOf], ...] = ()
    # further rules: fn(config, tp) -> why tp does not work, or None
    checks: tuple[Check, ...] = ()
    # (name in memory, name in checkpoints) fragments, where transformers renames modules on load
    checkpoint_aliases: tuple[tuple[str, str], ...] = ()
    # per-expert (gate, up, down) key names this family's checkpoints use
    expert_key_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # patterns that match only some variants of the family (no warning when they match nothing)
    optional: tuple[str, ...] = ()
    # the family's load-balancing loss and its config keys (None: dense, or no such loss)
    balance: BalanceRule | None = None
    # the family's routing math (scores its top-k ranks, weights at chosen ids): the routing hooks' adapter
    router: RouterRule = field(default_factory=RouterRule)

    def styles_for(self, path: str) -> Iterator[Style]:
        """Styles whose pattern matches ``path``, in rule order."""
        for pattern, style in self.rules:
            if matches(pattern, path):
                yield style

    def moe_rules(self) -> list[tuple[str, MoE]]:
        """The (pattern, MoE style) rules: where this family's MoE blocks are and how they are named."""
        return [(p, s) for p, s in self.rules if isinstance(s, MoE)]

    def num_experts(self, config: object) -> int | None:
        n = config_value(config, self.experts_attr) if self.experts_attr else None
        return n if isinstance(n, int) and n > 0 else None

    def sizes(self) -> tuple[tuple[str, SizeOf], ...]:
        """Every (what, size) tp must divide: attention heads, routed experts, then the plan's own."""
        out: list[tuple[str, SizeOf]] = [("attention heads (num_attention_heads)", num_attention_heads)]
        if self.experts_attr:
            out.append((f"routed experts ({self.experts_attr})", self.num_experts))
        return tuple(out) + self.divides

    def tp_problem(self, config: object, tp_size: int) -> str | None:
        """Why ``tp_size`` cannot split this model (a phrase following "tp_size=N"), or None."""
        for what, size in self.sizes():
            n = size(config)
            if n and n % tp_size:
                return f"must divide the {what} = {n}"
        for check in self.checks:
            why = check(config, tp_size)
            if why:
                return f"does not fit {why}"
        return None

    def check_ep(self, config: object, ep_size: int, tp_size: int, world_size: int | None = None) -> None:
        """Raise ValueError (before any collective) when ep_size cannot split the routed experts."""
        n = self.num_experts(config)
        if ep_size == tp_size or not n or n % ep_size == 0:
            return
        ok = [d for d in divisors(world_size or n) if d % tp_size == 0 and n % d == 0]
        raise ValueError(
            f"ep_size={ep_size} must divide the routed experts ({self.experts_attr}) = {n} of this "
            f"{config_value(config, 'model_type')} model; ep sizes that work with tp_size={tp_size}: {ok}"
        )

    def valid_tp_sizes(self, config: object, candidates: list[int]) -> list[int]:
        return [d for d in candidates if self.tp_problem(config, d) is None]

    def check_tp(self, config: object, tp_size: int, world_size: int | None = None) -> None:
        """Raise ValueError (same on every rank, before any collective) when tp cannot split the model."""
        why = self.tp_problem(config, tp_size)
        if why is None:
            return
        sizes = [n for _, f in self.sizes() if (n := f(config))]
        candidates = divisors(world_size) if world_size else sorted({d for n in sizes for d in divisors(n)})
        within = f" with world size {world_size}" if world_size else ""
        raise ValueError(
            f"tp_size={tp_size} {why} of this {config_value(config, 'model_type')} model; "
            f"tp sizes that work{within}: {self.valid_tp_sizes(config, candidates)}"
        )


def matches(pattern: str, path: str) -> bool:
    """``'model.layers.*.mlp'`` matches ``'model.layers.3.mlp'``: '*' is one dotted component."""
    pat, parts = pattern.split("."), path.split(".")
    return len(pat) == len(parts) and all(p in ("*", q) for p, q in zip(pat, parts, strict=True))


# -- building blocks the family files share ----------------------------------------------------------


def kv_heads_rule(config: object, tp: int) -> str | None:
    """GQA: key/value heads are split when tp divides them, shared when tp is a multiple of them."""
    kv = config_value(config, "num_key_value_heads") or num_attention_heads(config)
    if not isinstance(kv, int) or kv % tp == 0 or tp % kv == 0:
        return None
    return f"the {kv} key/value heads (num_key_value_heads): tp must divide them or be a multiple of them"


EMBEDDING = ("model.embed_tokens", VocabParallel())
LM_HEAD = ("lm_head", LMHead())
# standard attention (MHA/GQA), per-head q_norm/k_norm when present (Qwen3)
ATTENTION = ("model.layers.*.self_attn", GQAttention())
# transformers' load_balancing_loss_func (Mixtral, Qwen-MoE): router_aux_loss_coef, which transformers itself
# adds only with output_router_logits; the converted model adds it in train mode either way
SWITCH_BALANCE = BalanceRule("switch", coef_key="router_aux_loss_coef", model_coef_attr="router_aux_loss_coef")
