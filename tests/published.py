"""Tiny checkpoints in the layout DeepSeek-V3/R1 are published in: FP8 block-scaled weights and one MTP layer.

The key layout is DeepSeek-V3's ``model.safetensors.index.json``: quantized linear weights ``W`` in
``float8_e4m3fn`` with ``W_scale_inv`` (float32, one per block, edge blocks partial, ``W = fp8 * scale``),
norms, embeddings, router and lm_head unquantized, and the MTP layer as ``model.layers.{N}.*`` (N =
num_hidden_layers): ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, ``shared_head.head``,
``embed_tokens`` (copies of the main ones) and a full MoE decoder layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from .models import VARIANTS

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
NOT_QUANTIZED = ("norm", "mlp.gate.", "embed_tokens", "lm_head", "shared_head", "eh_proj")


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale per block) of a 2-D weight, as DeepSeek's act/weight quantization does it."""
    r, c = w.shape
    br, bc = -(-r // block[0]), -(-c // block[1])
    padded = torch.zeros(br * block[0], bc * block[1])
    padded[:r, :c] = w.float()
    blocks = padded.reshape(br, block[0], bc, block[1])
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # [br, bc]
    q = (blocks / scale[:, None, :, None]).reshape(br * block[0], bc * block[1])[:r, :c].to(FP8)
    return q.contiguous(), scale.float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference dequantization: every element times its block's scale, in float32."""
    s = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: q.shape[0], : q.shape[1]]
    return q.float() * s


def quantized(key: str, t: torch.Tensor) -> bool:
    return (
        key.startswith("model.layers.")
        and key.endswith(".weight")
        and t.dim() == 2
        and not any(p in key for p in NOT_QUANTIZED)
    )


def mtp_keys(n: int) -> list[str]:
    """The MTP layer's own (non-decoder) keys as DeepSeek-V3 publishes them."""
    extra = ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens")
    return [f"model.layers.{n}.{e}.weight" for e in extra]


# blocks of 24 x 24: tp 2 and 4 cut blocks (row splits at 64, 128 ...), the hidden size 64 ends in a partial one
def build_published(root: Path, block: tuple[int, int] = (24, 24), seed: int = 5) -> dict[str, Path]:
    """``fp8``: the tiny V3 quantized, with an MTP layer; ``plain``: the same weights dequantized (float32),
    MTP included, without quantization_config. Returns both folders."""
    _, _, extra = VARIANTS["deepseek_v3"]
    n = extra["num_hidden_layers"]
    torch.manual_seed(seed)
    big = DeepseekV3ForCausalLM(DeepseekV3Config(**{**extra, "num_hidden_layers": n + 1}))
    with torch.no_grad():
        for name, p in big.named_parameters():
            if "e_score_correction_bias" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    tmp = root / "_full"
    big.save_pretrained(tmp)
    sd = load_file(str(tmp / "model.safetensors"))  # per-expert keys, as published
    h = extra["hidden_size"]
    gen = torch.Generator().manual_seed(seed + 1)
    sd[f"model.layers.{n}.enorm.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
    sd[f"model.layers.{n}.hnorm.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
    sd[f"model.layers.{n}.shared_head.norm.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
    sd[f"model.layers.{n}.eh_proj.weight"] = 0.05 * torch.randn(h, 2 * h, generator=gen)
    sd[f"model.layers.{n}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    sd[f"model.layers.{n}.shared_head.head.weight"] = sd["lm_head.weight"].clone()

    config = json.loads((tmp / "config.json").read_text())
    config.update(num_hidden_layers=n, num_nextn_predict_layers=1)
    fp8, plain = {}, {}
    for key, t in sd.items():
        if quantized(key, t):
            q, s = quantize(t, block)
            fp8[key], fp8[key + "_scale_inv"] = q, s
            plain[key] = dequantize(q, s, block)
        else:
            fp8[key] = plain[key] = t.contiguous()
    out = {"fp8": root / "v3_fp8", "plain": root / "v3_dequantized"}
    for kind, tensors in (("fp8", fp8), ("plain", plain)):
        folder = out[kind]
        folder.mkdir(parents=True, exist_ok=True)
        cfg = dict(config)
        if kind == "fp8":
            cfg["quantization_config"] = {
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "weight_block_size": list(block),
            }
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return out


def write_single(folder: Path, key: str, weight: torch.Tensor, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A folder holding one quantized tensor ``key`` (and its scale) with the tiny V3 config and ``block``."""
    _, _, extra = VARIANTS["deepseek_v3"]
    folder.mkdir(parents=True, exist_ok=True)
    cfg = DeepseekV3Config(**extra).to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (folder / "config.json").write_text(json.dumps(cfg))
    q, s = quantize(weight, block)
    save_file({key: q, key + "_scale_inv": s}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return {"q": q, "scale": s, "dequantized": dequantize(q, s, block)}
