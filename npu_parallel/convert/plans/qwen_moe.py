"""Qwen2-MoE and Qwen3-MoE: `shared_expert` scaled by the per-token sigmoid `shared_expert_gate` (Qwen2);
dense layers from `mlp_only_layers` / `decoder_sparse_step` fall through to MLP."""

from npu_parallel.convert.plan import ATTENTION, EMBEDDING, LM_HEAD, SWITCH_BALANCE, Plan, kv_heads_rule
from npu_parallel.convert.styles import MLP, MoE
from npu_parallel.moe.routing_rule import RouterRule

PLAN = Plan(
    name="Qwen2-MoE/Qwen3-MoE",
    model_types=("qwen2_moe", "qwen3_moe"),
    rules=(
        EMBEDDING,
        ATTENTION,
        (
            "model.layers.*.mlp",
            MoE(router="gate", experts="experts", shared="shared_expert", shared_gate="shared_expert_gate"),
        ),
        ("model.layers.*.mlp", MLP()),
        LM_HEAD,
    ),
    experts_attr="num_experts",
    checks=(kv_heads_rule,),
    balance=SWITCH_BALANCE,
    router=RouterRule(normalize_attr="norm_topk_prob"),  # softmax top-k, renormalised when norm_topk_prob
)
