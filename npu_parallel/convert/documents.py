"""Attention that never crosses a document: what a packed micro-batch hands the model besides its token ids.

A row of a packed micro-batch holds several documents (and padding at its end). Each document must be computed
as if it were alone: its position ids restart at 0 (the batch carries them) and its tokens attend only to the
earlier tokens of the same document, a block-diagonal causal mask ``[B, 1, L, L]``. Rows of one document each
(padded at the end) need no mask at all: causality already keeps a real token from the padding after it.

The mask's form is the one the model's attention takes: bool (True = attend) for SDPA and our padded SDPA (which
torch_npu's fused kernel takes as it is), additive float (0 / dtype min) for eager attention, and 1/0 float for
remote code that builds its masks with transformers' ``_prepare_4d_causal_attention_mask`` (it inverts a 4D
mask it is given). On an NPU the documents' lengths also travel as ``npu_seq_lens`` so that the fused kernel can
run the TND (varlen) layout, no ``[L, L]`` mask (``parallel/kernels.fusion_attention``).

Shapes: B rows, L tokens per row.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from npu_parallel.convert.attention import PADDED_SDPA, SEQ_LENS_KWARG
from npu_parallel.parallel import kernels

__all__ = ["SEQ_LENS_KWARG", "document_inputs", "document_mask", "mask_style", "packs_documents"]

_BOOL_IMPLS = ("sdpa", PADDED_SDPA)


def packs_documents(lengths: Sequence[Sequence[int]]) -> bool:
    """Whether any row holds more than one document (then the attention needs the block-diagonal mask)."""
    return any(len(row) > 1 for row in lengths)


def _builds_inverted_masks(model: nn.Module) -> bool:
    """Remote code whose forward builds its 4D masks with ``_prepare_4d_causal_attention_mask`` (DeepSeek's
    published ``modeling_deepseek.py``): a 4D mask given to it must be 1/0 (it inverts it)."""
    module = sys.modules.get(type(model).__module__)
    if module is None or type(model).__module__.startswith("transformers."):
        return False
    try:
        return "_prepare_4d_causal_attention_mask" in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def mask_style(model: nn.Module) -> str:
    """``"bool"``, ``"additive"`` or ``"inverted"`` (1/0 float): the 4D mask form ``model``'s attention takes."""
    if _builds_inverted_masks(model):
        return "inverted"
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return "bool" if impl in _BOOL_IMPLS else "additive"


def document_mask(document_ids: torch.Tensor, style: str, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, L, L]``: query ``i`` may attend key ``j`` iff ``j <= i`` and both lie in the same document.

    ``document_ids [B, L]`` (padding -1: padding attends to earlier padding only, so no softmax row is empty).
    """
    length = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]  # [B, L, L]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    allowed = (same & causal)[:, None]  # [B, 1, L, L]
    if style == "bool":
        return allowed
    if style == "inverted":
        return allowed.to(dtype)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _seq_lens(lengths: Sequence[Sequence[int]], width: int) -> list[int]:
    """Cumulative ends over the flattened ``[B * L]`` tokens: each document, then each row's padding as one more."""
    ends, at = [], 0
    for row in lengths:
        for n in row:
            at += n
            ends.append(at)
        pad = width - sum(row)
        if pad:
            at += pad
            ends.append(at)
    return ends


def document_inputs(
    model: nn.Module,
    document_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    lengths: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """The keyword arguments besides ``input_ids`` that keep a micro-batch's documents apart in ``model``'s forward
    (empty when every row holds one document: the model's own causal attention and positions are exact)."""
    if document_ids is None or not packs_documents(lengths):
        return {}
    embed: Any = getattr(model, "get_input_embeddings")()  # noqa: B009 (nn.Module types it as a Tensor)
    dtype = embed.weight.dtype
    style = mask_style(model)
    out: dict[str, Any] = {
        "attention_mask": document_mask(document_ids, style, dtype),
        "position_ids": position_ids,
    }
    if getattr(model.config, "output_router_logits", False):
        # transformers' own Switch loss reads a 2D padding mask; the converted blocks keep the loss (moe/load.py)
        out["output_router_logits"] = False
    native = type(model).__module__.startswith("transformers.")  # its forward hands **kwargs to the attention
    if native and kernels.fused("npu_fusion_attention", document_ids.device.type, "TND") is not None:
        out[SEQ_LENS_KWARG] = _seq_lens(lengths, int(document_ids.shape[1]))
    return out
