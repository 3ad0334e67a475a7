"""DeepSeek-V2, V2-Lite, V3: MLA attention split by heads, routed experts split E/tp, shared experts sharded."""

from npu_parallel.convert.plan import EMBEDDING, LM_HEAD, Plan
from npu_parallel.convert.styles import MLP, Colwise, MoE, ReplicatedSumGradFrom, Rowwise, ShardHeads
from npu_parallel.moe.balance import BalanceRule
from npu_parallel.moe.routing_rule import RouterRule

PLAN = Plan(
    name="DeepSeek-V2/V2-Lite/V3",
    model_types=("deepseek_v2", "deepseek_v3"),
    rules=(
        EMBEDDING,
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
        LM_HEAD,
    ),
    experts_attr="n_routed_experts",
    balance=BalanceRule(  # DeepSeek's MoEGate loss; transformers' classes compute none
        "deepseek",
        coef_key="aux_loss_alpha",  # published configs: 0.001, with seq_aux true
        seq_key="seq_aux",
        scoring_key="scoring_func",  # remote-code configs name it; transformers' V3 scores by sigmoid
        sigmoid_types=("deepseek_v3",),
        router_coef_attr="alpha",  # remote-code MoEGate computes its own loss with this coefficient
        bias_attr="e_score_correction_bias",  # V3's routing bias: --bias_update_rate moves it
    ),
    # routing: softmax (V2) or sigmoid + e_score_correction_bias (V3), group-limited by the router's topk_method /
    # n_group; weights scaled by routed_scaling_factor, normalised where the router's norm_topk_prob says so
    router=RouterRule(bias_attr="e_score_correction_bias", grouped=True),
    # q_proj without q LoRA (V2-Lite), q_b_proj with it
    optional=("model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.q_b_proj"),
)
