"""One declarative plan per architecture: module path pattern -> parallel style, plus the sizes tp must divide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .styles import GQAttention, LMHead, MLP, MoE, Colwise, ReplicatedSumGradFrom, Rowwise, ShardHeads, Style, VocabParallel


@dataclass(frozen=True)
class Plan:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[tuple[str, Style], ...]
    # (what, size from the config): tp must divide each
    divides: tuple[tuple[str, Callable[[object], int | None]], ...]
    # further rules: fn(config, tp) -> why tp does not work, or None
    checks: tuple[Callable[[object, int], str | None], ...] = ()
    # (name in memory, name in checkpoints) fragments, where transformers renames modules on load
    checkpoint_aliases: tuple[tuple[str, str], ...] = ()
    # per-expert (gate, up, down) key names transformers writes for this family
    expert_key_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

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

def kv_heads_rule(config, tp: int) -> str | None:
    """GQA: key/value heads are split when tp divides them, shared when tp is a multiple of them."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if kv % tp == 0 or tp % kv == 0:
        return None
    return f"the {kv} key/value heads (num_key_value_heads): tp must divide them or be a multiple of them"


def _heads(c):
    return c.num_attention_heads


# Standard attention (MHA/GQA), per-head q_norm/k_norm when present (Qwen3).
_ATTENTION = (("model.layers.*.self_attn", GQAttention()),)
_EDGES = (("model.embed_tokens", VocabParallel()), ("lm_head", LMHead()))

# Mixtral: no shared experts; `block_sparse_moe` in transformers 4.x, `mlp` in 5.x.
MIXTRAL = Plan(
    name="Mixtral",
    model_types=("mixtral",),
    rules=_EDGES[:1] + _ATTENTION + (
        ("model.layers.*.block_sparse_moe", MoE(router="gate", experts="experts", shared=None)),
        ("model.layers.*.mlp", MoE(router="gate", experts="experts", shared=None)),
    ) + _EDGES[1:],
    divides=(("attention heads (num_attention_heads)", _heads),
             ("routed experts (num_local_experts)", lambda c: c.num_local_experts)),
    checks=(kv_heads_rule,),
    checkpoint_aliases=((".mlp.", ".block_sparse_moe."),),  # experts.N.w1/w3/w2 under block_sparse_moe
    expert_key_names=("w1", "w3", "w2"),
)

# Qwen2-MoE and Qwen3-MoE: `shared_expert` scaled by the per-token sigmoid `shared_expert_gate` (Qwen2);
# dense layers from `mlp_only_layers` / `decoder_sparse_step` fall through to MLP.
QWEN_MOE = Plan(
    name="Qwen2-MoE/Qwen3-MoE",
    model_types=("qwen2_moe", "qwen3_moe"),
    rules=_EDGES[:1] + _ATTENTION + (
        ("model.layers.*.mlp", MoE(router="gate", experts="experts", shared="shared_expert", shared_gate="shared_expert_gate")),
        ("model.layers.*.mlp", MLP()),
    ) + _EDGES[1:],
    divides=(("attention heads (num_attention_heads)", _heads),
             ("routed experts (num_experts)", lambda c: c.num_experts)),
    checks=(kv_heads_rule,),
)

# DeepSeek-MoE 16B (v1, trust_remote_code): DeepseekMoE with MoEGate, ModuleList experts, shared_experts.
DEEPSEEK_MOE = Plan(
    name="DeepSeek-MoE",
    model_types=("deepseek",),
    rules=_EDGES[:1] + _ATTENTION + (
        ("model.layers.*.mlp", MoE(router="gate", experts="experts", shared="shared_experts")),
        ("model.layers.*.mlp", MLP()),
    ) + _EDGES[1:],
    divides=(("attention heads (num_attention_heads)", _heads),
             ("routed experts (n_routed_experts)", lambda c: c.n_routed_experts)),
    checks=(kv_heads_rule,),
)

# Dense Llama and Qwen2 (GQA).
DENSE = Plan(
    name="Llama/Qwen2 (dense)",
    model_types=("llama", "qwen2"),
    rules=_EDGES[:1] + _ATTENTION + (("model.layers.*.mlp", MLP()),) + _EDGES[1:],
    divides=(("attention heads (num_attention_heads)", _heads),),
    checks=(kv_heads_rule,),
)

PLANS: tuple[Plan, ...] = (DEEPSEEK, MIXTRAL, QWEN_MOE, DEEPSEEK_MOE, DENSE)


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
