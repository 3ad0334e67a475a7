"""Attention kernels for converted models.

MLA's value heads are narrower than its query/key heads (DeepSeek-V2/V3: 128 vs 192), which sends
scaled-dot-product attention to its unfused math path (a materialised [L, L] softmax). Zero-padding
the values to the query width and slicing the output is exact and lets the fused kernels run: 31 %
faster forward+backward at DeepSeek-V2-Lite's head sizes on CPU. On an NPU, torch_npu's
``npu_fusion_attention`` takes ``Dk >= Dv`` as it is (``kernels.fusion_attention``, behind its probe):
no padding there, the padded P.V would cost about +50 %.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from npu_parallel.hf_compat import set_attn_implementation, unsupported_transformers

if why := unsupported_transformers():  # AttentionInterface (below) first appears in 4.51
    raise ImportError(f"npu_parallel: {why}")

from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from npu_parallel.parallel import kernels

PADDED_SDPA = "npu_parallel_sdpa"
# a packed micro-batch's document ends over its flattened tokens, handed to the attention by the model's forward
# (convert/documents.py) so that torch_npu's fused kernel runs the TND layout
SEQ_LENS_KWARG = "npu_seq_lens"


def padded_value_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
):
    """transformers' SDPA attention with value heads zero-padded to the query head dim (a no-op when equal);
    torch_npu's fused attention, unpadded, where it runs."""
    if not (kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        scaling = kwargs.get("scaling")
        out = kernels.fusion_attention(
            query,
            key,
            value,
            attention_mask,
            scale=query.shape[-1] ** -0.5 if scaling is None else scaling,
            dropout=kwargs.get("dropout", 0.0),
            is_causal=bool(is_causal),
            seq_lens=kwargs.get(SEQ_LENS_KWARG),
        )  # [B, N, S, Dv] or None
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    kwargs.pop(SEQ_LENS_KWARG, None)
    dq, dv = query.shape[-1], value.shape[-1]
    if dv >= dq:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = sdpa_attention_forward(module, query, key, F.pad(value, (0, dq - dv)), attention_mask, **kwargs)
    return out[..., :dv], weights


AttentionInterface.register(PADDED_SDPA, padded_value_sdpa)


def use_fused_attention(model: PreTrainedModel) -> None:
    """Switch a model on transformers' SDPA to the padded-value SDPA; other choices are the user's and stay.

    Remote code (DeepSeek-MoE 16B's base class has no ``set_attn_implementation``) keeps its own attention.
    """
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        set_attn_implementation(model, PADDED_SDPA)
