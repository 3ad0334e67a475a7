"""A tiny model that exists only as its checkpoint's own code (``auto_map``), written at test time.

Our own three files, as DeepSeek-MoE 16B is published (``model_type: deepseek``, which transformers has no
class for): ``configuration_tinyds.py`` (a LlamaConfig subclass), ``modeling_tinyds.py`` (LlamaForCausalLM
with DeepSeek-MoE's blocks) and ``moe_blocks.py``, the local module it imports (tests/remote_deepseek.py's
text). No upstream code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FILES = ("configuration_tinyds.py", "modeling_tinyds.py", "moe_blocks.py")

CONFIGURATION = """
from transformers import LlamaConfig


class TinyDeepseekConfig(LlamaConfig):
    model_type = "deepseek"
"""

MODELING = """
from transformers import LlamaForCausalLM

from .configuration_tinyds import TinyDeepseekConfig
from .moe_blocks import DeepseekMLP, DeepseekMoE


class TinyDeepseekForCausalLM(LlamaForCausalLM):
    config_class = TinyDeepseekConfig

    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            dense = i < config.first_k_dense_replace
            inter = 4 * config.moe_intermediate_size
            layer.mlp = DeepseekMLP(config, intermediate_size=inter) if dense else DeepseekMoE(config)
"""

CONFIG = dict(
    model_type="deepseek",
    architectures=["TinyDeepseekForCausalLM"],
    auto_map={
        "AutoConfig": "configuration_tinyds.TinyDeepseekConfig",
        "AutoModelForCausalLM": "modeling_tinyds.TinyDeepseekForCausalLM",
    },
    vocab_size=128,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    use_cache=False,
    n_routed_experts=4,
    n_shared_experts=1,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    scoring_func="softmax",
    aux_loss_alpha=0.1,
    seq_aux=True,
    norm_topk_prob=False,
    topk_method="greedy",
    routed_scaling_factor=1.0,
    n_group=None,
    topk_group=None,
)


def write_code(path: Path) -> Path:
    """config.json and the three code files; no weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_tinyds.py").write_text(CONFIGURATION)
    (path / "modeling_tinyds.py").write_text(MODELING)
    (path / "moe_blocks.py").write_text((Path(__file__).parent / "remote_deepseek.py").read_text())
    (path / "config.json").write_text(json.dumps(CONFIG, indent=2))
    return path


def build(path: Path, seed: int = 0) -> Path:
    """The tiny checkpoint: built from its own code, random weights, saved by save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    write_code(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)
    model.save_pretrained(str(path))
    write_code(path)  # ours, whatever save_pretrained copied
    return path


def sharded_round_trip(src: str, out: str, tp: int) -> dict:
    """Rank worker: load_pretrained (trusted) at tp, one AdamW step, save_sharded with the optimizer; then
    load_sharded without the flag (the refusal), with it (weights and logits against the trained model) and
    the training state, as ``--resume`` does."""
    import npu_parallel
    from npu_parallel.checkpoint.load import load_pretrained, load_sharded
    from npu_parallel.checkpoint.remote_code import RemoteCodeError
    from npu_parallel.checkpoint.save import load_training_state, save_sharded

    state = npu_parallel.init_distributed(tp)
    model = load_pretrained(src, state, dtype=torch.float32, progress=False, trust_remote_code=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.arange(32).view(2, 16) % CONFIG["vocab_size"]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    save_sharded(model, out, state, optimizer=opt, extra={"step": 1, "data_position": 32})
    try:
        load_sharded(out, state)
        refused = None
    except RemoteCodeError as exc:
        refused = str(exc)
    loaded = load_sharded(out, state, trust_remote_code=True)
    trained = dict(model.named_parameters())
    differ = [n for n, p in loaded.named_parameters() if not torch.equal(p, trained[n])]
    model.eval(), loaded.eval()
    with torch.no_grad():
        same_logits = torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    extra = load_training_state(out, state, optimizer=torch.optim.AdamW(loaded.parameters(), lr=1e-3))
    return {"refused": refused, "differ": differ, "same_logits": same_logits, "extra": extra}
