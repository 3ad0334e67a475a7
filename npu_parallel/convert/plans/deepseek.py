"""DeepSeek-V2, V2-Lite, V3: MLA attention split by heads, routed experts split E/tp, shared experts sharded."""

from npu_parallel.convert.plan import EMBEDDING, LM_HEAD, Plan, config_value
from npu_parallel.convert.styles import MLP, Colwise, MoE, ReplicatedSumGradFrom, Rowwise, ShardHeads
from npu_parallel.moe.balance import BalanceRule


def _scoring(config: object) -> str:
    """V2 scores by softmax, V3 by sigmoid (transformers' classes hard-code it; remote-code configs say it)."""
    given = config_value(config, "scoring_func")
    return given or ("sigmoid" if config_value(config, "model_type") == "deepseek_v3" else "softmax")


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
    # DeepSeek's MoEGate loss (published configs: aux_loss_alpha 0.001, seq_aux true; transformers' classes compute
    # none); remote-code MoEGate computes it itself with `alpha`; V3's routing bias for the loss-free balancing
    balance=BalanceRule(
        "deepseek",
        coef_key="aux_loss_alpha",
        seq_key="seq_aux",
        scoring=_scoring,
        router_coef_attr="alpha",
        bias_attr="e_score_correction_bias",
    ),
    # q_proj without q LoRA (V2-Lite), q_b_proj with it
    optional=("model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.q_b_proj"),
)
