"""Rank functions for the FP8 and MTP tests (launched by tests/dist.py run_ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

import npu_parallel
from npu_parallel.tools.verify import _full_grads
from npu_parallel.training.losses import causal_lm_loss, set_vocab_parallel_logits

from .common import seeded_ids


def _ids(vocab: int) -> torch.Tensor:
    return seeded_ids(vocab, 2, 12, 7)


def fp8_logits(fp8: str, plain: str, tps: list[int]) -> dict:
    """Max |logits - reference| of load_pretrained(fp8) at each tp; reference: transformers on the dequantized."""
    out = {}
    ref = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    ids = _ids(ref.config.vocab_size)
    want = ref(input_ids=ids).logits
    for tp in tps:
        state = npu_parallel.init_distributed(tp)
        model = npu_parallel.load_pretrained(fp8, state, dtype=torch.float32, progress=False)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        out[tp] = (got - want).abs().max().item()
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_grads(plain: str, weight: float) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(main loss, MTP loss, gradients) of main + weight * L_MTP, from the report's equations (section 2.2).

    h'_i = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)] with h_i the main model's output (after its final norm),
    h_i^1 = TRM(h'_i) (the decoder block, causal), P_{i+2} = softmax(OutHead(RMSNorm(h_i^1))) and
    L_MTP = CE over positions i predicting t_{i+2}; embedding and OutHead are the main model's.
    """
    ref = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).train()
    cfg = ref.config
    n, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
    sd = load_file(f"{plain}/model.safetensors")
    pre = f"model.layers.{n}."
    block = DeepseekV3DecoderLayer(cfg, layer_idx=n)
    own = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
    experts = cfg.n_routed_experts
    expert = "mlp.experts.{}.{}_proj.weight".format
    fused = {  # transformers 5.x holds the experts fused: gate rows then up rows
        "mlp.experts.gate_up_proj": torch.stack(
            [torch.cat([own[expert(e, "gate")], own[expert(e, "up")]]) for e in range(experts)]
        ),
        "mlp.experts.down_proj": torch.stack([own[expert(e, "down")] for e in range(experts)]),
    }
    block_sd = {k: v for k, v in own.items() if ".experts." not in k}
    block_sd.update(fused)
    missing = block.load_state_dict(block_sd, strict=False).missing_keys
    assert not missing, missing
    block.train()
    names = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
    extra = {k: own[k].clone().requires_grad_() for k in names}

    ids = _ids(cfg.vocab_size)
    h = ref.model(input_ids=ids).last_hidden_state  # [B, T, H], after the final norm
    logits = ref.lm_head(h)
    main = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    emb = ref.model.embed_tokens(ids[:, 1:])  # Emb(t_{i+1}), [B, T-1, H]
    x = torch.cat([_rms(emb, extra["enorm.weight"], eps), _rms(h[:, :-1], extra["hnorm.weight"], eps)], -1)
    x = x @ extra["eh_proj.weight"].T
    length = x.shape[1]
    pos = torch.arange(length).unsqueeze(0)
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    y = block(x, attention_mask=mask, position_ids=pos, position_embeddings=ref.model.rotary_emb(x, pos))
    y = y[0] if isinstance(y, tuple) else y
    mtp_logits = ref.lm_head(_rms(y, extra["shared_head.norm.weight"], eps))[:, :-1]  # predicts t_{i+2}
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1), ids[:, 2:].flatten())
    (main + weight * mtp).backward()
    grads = {k: p.grad.detach().clone() for k, p in ref.named_parameters() if p.grad is not None}
    grads.update({pre + k: p.grad.detach().clone() for k, p in block.named_parameters() if p.grad is not None})
    grads.update({pre + k: p.grad.detach().clone() for k, p in extra.items()})
    return main.item(), mtp.item(), grads


def mtp_gradients(plain: str, weight: float, tps: list[int], vocab_parallel: list[bool]) -> dict:
    """Per (tp, vocab-parallel loss): the losses, and the largest relative gradient difference against
    reference_grads (parameter name, value)."""
    ref_main, ref_mtp, ref = reference_grads(plain, weight)
    out: dict = {"reference": {"main": ref_main, "mtp": ref_mtp}}
    for tp, vp in [(tp, vp) for tp in tps for vp in vocab_parallel]:
        out[f"tp{tp}-vp{vp}"] = _mtp_run(plain, weight, tp, vp, ref)
    return out


def _mtp_run(plain: str, weight: float, tp: int, vocab_parallel: bool, ref: dict) -> dict:
    state = npu_parallel.init_distributed(tp)
    model = npu_parallel.load_pretrained(plain, state, dtype=torch.float32, progress=False).train()
    if vocab_parallel:
        set_vocab_parallel_logits(model, True)
    parts: dict = {}
    ids = _ids(model.config.vocab_size)
    loss, _ = causal_lm_loss(model, ids, ids, vocab_parallel=vocab_parallel, mtp_weight=weight, parts=parts)
    loss.backward()
    grads = _full_grads(model, state)
    mtp = f"model.layers.{model.config.num_hidden_layers}."
    diffs = {}
    for name, g in grads.items():
        want = ref.get(name, torch.zeros_like(g))
        diffs[name] = (g - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
    return {
        "loss": loss.item(),
        "mtp_loss": parts["mtp_loss"].item(),
        "worst": max(diffs.items(), key=lambda kv: kv[1]),
        "mtp_params": sorted(n for n in grads if n.startswith(mtp)),
        "mtp_grad_norm": sum(g.pow(2).sum().item() for n, g in grads.items() if n.startswith(mtp)),
    }
