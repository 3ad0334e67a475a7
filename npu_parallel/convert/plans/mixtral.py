"""Mixtral: GQA attention, routed experts without shared ones (`block_sparse_moe` in 4.x, `mlp` in 5.x)."""

from npu_parallel.convert.plan import ATTENTION, EMBEDDING, LM_HEAD, SWITCH_BALANCE, Plan, kv_heads_rule
from npu_parallel.convert.styles import MoE
from npu_parallel.moe.routing_rule import RouterRule

PLAN = Plan(
    name="Mixtral",
    model_types=("mixtral",),
    rules=(
        EMBEDDING,
        ATTENTION,
        ("model.layers.*.block_sparse_moe", MoE(router="gate", experts="experts", shared=None)),
        ("model.layers.*.mlp", MoE(router="gate", experts="experts", shared=None)),
        LM_HEAD,
    ),
    experts_attr="num_local_experts",
    checks=(kv_heads_rule,),
    balance=SWITCH_BALANCE,
    router=RouterRule(normalize=True, normalize_attr=None),  # softmax top-k, always renormalised
    checkpoint_aliases=((".mlp.", ".block_sparse_moe."),),  # experts.N.w1/w3/w2 under block_sparse_moe
    expert_key_names=("w1", "w3", "w2"),
    optional=("model.layers.*.block_sparse_moe", "model.layers.*.mlp"),
)
