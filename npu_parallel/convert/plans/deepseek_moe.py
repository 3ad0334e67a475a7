"""DeepSeek-MoE 16B (v1, trust_remote_code): DeepseekMoE with MoEGate, ModuleList experts, shared_experts."""

from npu_parallel.convert.plan import ATTENTION, EMBEDDING, LM_HEAD, Plan, kv_heads_rule
from npu_parallel.convert.styles import MLP, MoE
from npu_parallel.moe.balance import BalanceRule
from npu_parallel.moe.routing_rule import RouterRule

PLAN = Plan(
    name="DeepSeek-MoE",
    model_types=("deepseek",),
    rules=(
        EMBEDDING,
        ATTENTION,
        ("model.layers.*.mlp", MoE(router="gate", experts="experts", shared="shared_experts")),
        ("model.layers.*.mlp", MLP()),
        LM_HEAD,
    ),
    experts_attr="n_routed_experts",
    checks=(kv_heads_rule,),
    # MoEGate computes its own loss (aux_loss_alpha, seq_aux) and keeps the coefficient as `alpha`
    balance=BalanceRule("deepseek", coef_key="aux_loss_alpha", seq_key="seq_aux", router_coef_attr="alpha"),
    router=RouterRule(),  # MoEGate: greedy softmax top-k, normalised when norm_topk_prob (16B: not)
)
