"""One declarative plan per architecture: module path pattern -> parallel style, plus the sizes tp must divide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .styles import LMHead, MLP, MoE, Colwise, ReplicatedSumGradFrom, Rowwise, ShardHeads, Style, VocabParallel


@dataclass(frozen=True)
class Plan:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[tuple[str, Style], ...]
    # (what, size from the config): tp must divide each
    divides: tuple[tuple[str, Callable[[object], int | None]], ...]

    def styles_for(self, path: str):
        """Styles whose pattern matches ``path`` ('*' matches one dotted component), in rule order."""
        parts = path.split(".")
        for pattern, style in self.rules:
            pat = pattern.split(".")
            if len(pat) == len(parts) and all(p == "*" or p == q for p, q in zip(pat, parts)):
                yield style


# DeepSeek-V2, V2-Lite, V3 (transformers' classes and the original trust_remote_code modules).
DEEPSEEK = Plan(
    name="DeepSeek-V2/V2-Lite/V3",
    model_types=("deepseek_v2", "deepseek_v3"),
    rules=(
        ("model.embed_tokens", VocabParallel()),
        # MLA: query and key/value up-projections split by heads; the latent down-projections and their
        # norms stay whole. The rope columns of kv_a_proj_with_mqa bypass the sharded kv_b_proj and feed
        # every rank's heads, so their gradient is summed over the group.
        ("model.layers.*.self_attn", ShardHeads(("num_heads",))),
        ("model.layers.*.self_attn.q_proj", Colwise()),
        ("model.layers.*.self_attn.q_b_proj", Colwise()),
        ("model.layers.*.self_attn.kv_b_proj", Colwise()),
        ("model.layers.*.self_attn.kv_a_proj_with_mqa", ReplicatedSumGradFrom("kv_lora_rank")),
        ("model.layers.*.self_attn.o_proj", Rowwise()),
        # MoE layers: first match wins, so a dense layer (first_k_dense_replace) falls through to MLP.
        ("model.layers.*.mlp", MoE(router="gate", experts="experts", shared="shared_experts")),
        ("model.layers.*.mlp", MLP()),
        ("lm_head", LMHead()),
    ),
    divides=(
        ("attention heads (num_attention_heads)", lambda c: c.num_attention_heads),
        ("routed experts (n_routed_experts)", lambda c: getattr(c, "n_routed_experts", None)),
    ),
)

PLANS: tuple[Plan, ...] = (DEEPSEEK,)


def supported_model_types() -> list[str]:
    return sorted(t for p in PLANS for t in p.model_types)


def plan_for(config) -> Plan:
    model_type = getattr(config, "model_type", None)
    for plan in PLANS:
        if model_type in plan.model_types:
            return plan
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    raise ValueError(
        f"no parallel plan for model_type={model_type!r} ({', '.join(archs)}); supported: "
        f"{', '.join(supported_model_types())}. See README section 'Adding an architecture'."
    )
