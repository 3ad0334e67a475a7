"""Multi-token prediction (MTP) layers of DeepSeek-V3 (technical report, section 2.2), kept and trainable.

DeepSeek-V3 publishes ``num_nextn_predict_layers`` MTP modules after the last decoder layer, under
``model.layers.{N + k - 1}.*`` (N = num_hidden_layers, depth k = 1..D): ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` and a full decoder layer (``self_attn``, ``mlp``, ``input_layernorm``,
``post_attention_layernorm``); its ``embed_tokens`` and ``shared_head.head`` are copies of the main model's
embedding and output head, which the module shares. transformers drops these keys.

Here each MTP module is the family's own decoder layer (built for layer index N + k - 1, so it is an MoE
layer converted by the same plan rules as every ``model.layers.*``) with the extra modules attached, and
appended to ``model.model.layers``: memory names are the published keys, and the main forward, which runs
the first ``num_hidden_layers`` layers only, never calls it. Depth k at position i (the published
implementations' order of the concatenation, which fixes the meaning of ``eh_proj``'s columns)::

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i^{k-1})])     h_i^0: the main model's final (normed) state
    h_i^k = TRM_k(h'_i)                                           causal over positions 0..T-k-1
    logits_i^k = lm_head(shared_head.norm(h_i^k))                 predicts t_{i+k+1}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from npu_parallel.moe.block import MoEBlock
from npu_parallel.moe.load import take_terms

MTP_ATTR = "num_nextn_predict_layers"
# the published copies of the shared modules: (MTP key leaf, the main model's tensor it copies)
SHARED_COPIES = (("embed_tokens.weight", "model.embed_tokens.weight"), ("shared_head.head.weight", "lm_head.weight"))


def num_mtp_layers(config: object) -> int:
    """D: the MTP depth the config declares (0 when it declares none)."""
    n = getattr(config, MTP_ATTR, 0)
    return n if isinstance(n, int) and n > 0 else 0


def mtp_indices(config: object, count: int | None = None) -> list[int]:
    """The layer indices (in ``model.layers``) of the MTP modules: N .. N + D - 1."""
    n = int(config.num_hidden_layers)  # type: ignore[attr-defined]
    return list(range(n, n + (num_mtp_layers(config) if count is None else count)))


def mtp_prefixes(config: object, count: int | None = None) -> tuple[str, ...]:
    return tuple(f"model.layers.{i}." for i in mtp_indices(config, count))


def add_mtp_layers(model: nn.Module, count: int, dtype: torch.dtype) -> None:
    """Append ``count`` MTP modules to ``model.model.layers`` (on whatever device the context creates them)."""
    base: Any = model.model
    config: Any = model.config
    layer_cls, norm_cls = type(base.layers[-1]), type(base.norm)
    h, eps = config.hidden_size, config.rms_norm_eps
    for i in mtp_indices(config, count):
        layer: Any = layer_cls(config, layer_idx=i)
        layer.enorm = norm_cls(h, eps=eps)
        layer.hnorm = norm_cls(h, eps=eps)
        layer.eh_proj = nn.Linear(2 * h, h, bias=False)
        layer.shared_head = nn.Module()
        layer.shared_head.norm = norm_cls(h, eps=eps)
        base.layers.append(layer.to(dtype))


def mtp_layers(model: nn.Module) -> list[nn.Module]:
    """The model's MTP modules, depth 1 first (empty when it has none)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return []
    return list(layers)[int(getattr(model.config, "num_hidden_layers", 0)) :]


def causal_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """Additive causal mask [1, 1, L, L] in ``like``'s dtype (every attention implementation takes one)."""
    low = torch.finfo(like.dtype).min
    return torch.full((length, length), low, dtype=like.dtype, device=like.device).triu(1)[None, None]


def mtp_states(
    model: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    document_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per depth k = 1..D, ``shared_head.norm(h^k)`` [B, T-k, H]; position i of it predicts token i+k+1.

    ``hidden``: the main model's final normed hidden states [B, T, H]; ``input_ids`` [B, T]. A packed micro-batch
    also gives its ``document_ids`` and ``position_ids`` [B, T]: at depth k position i attends only to its own
    document and keeps its position id, so each document's states are those it has alone (positions whose token
    i+k lies in the next document hold states no target reads: ``Batch.targets``).
    """
    # here, not at the top: checkpoint/mtp_keys imports this module under any transformers, and documents needs
    # the attention kernels (transformers >= 4.51)
    from npu_parallel.convert.documents import document_mask, mask_style

    base: Any = model.model
    out = []
    h = hidden
    layer: Any
    for k, layer in enumerate(mtp_layers(model), start=1):
        emb = base.embed_tokens(input_ids[:, k:])  # [B, T-k, H]: Emb(t_{i+k})
        h = h[:, :-1]  # [B, T-k, H]: h_i^{k-1}
        x = layer.eh_proj(torch.cat([layer.enorm(emb), layer.hnorm(h)], dim=-1))  # [B, T-k, H]
        length = x.shape[1]
        if document_ids is None:
            pos = torch.arange(length, device=x.device).unsqueeze(0)  # [1, T-k]
            mask = causal_mask(length, x)
        else:
            assert position_ids is not None
            pos = position_ids[:, :length]
            style = "additive" if mask_style(model) == "inverted" else mask_style(model)  # the layer takes it as is
            mask = document_mask(document_ids[:, :length], style, x.dtype)
        h = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=base.rotary_emb(x, pos))
        h = h[0] if isinstance(h, tuple) else h  # transformers 4.x layers return a tuple
        out.append(layer.shared_head.norm(h))
        _drop_balance_terms(layer)
    return out


def _drop_balance_terms(layer: nn.Module) -> None:
    """An MTP layer's MoE block adds nothing to the load-balancing loss (DeepSeek-V3's balance terms are the main
    model's layers'); its routed load is counted now, and its terms, set after the model's forward hook ran, are
    cleared so that they never reach the next forward's."""
    take_terms(layer)
    for module in layer.modules():
        if isinstance(module, MoEBlock):
            module.z_term = None
