"""Dense Llama and Qwen2 (GQA): attention split by heads, gated MLP column/row-parallel."""

from npu_parallel.convert.plan import ATTENTION, EMBEDDING, LM_HEAD, Plan, kv_heads_rule
from npu_parallel.convert.styles import MLP

PLAN = Plan(
    name="Llama/Qwen2 (dense)",
    model_types=("llama", "qwen2"),
    rules=(EMBEDDING, ATTENTION, ("model.layers.*.mlp", MLP()), LM_HEAD),
    checks=(kv_heads_rule,),
)
