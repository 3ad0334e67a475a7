"""Activation recomputation (``--recompute``): keep fewer activations for the backward and compute them again.

``full`` is transformers' gradient checkpointing of every decoder layer (``--gradient_checkpointing``); the
selective modes apply torch's composable ``checkpoint`` (hooks, no change to the module tree or to parameter
names) to one part of each layer only:

- ``experts``: the routed experts' MLPs (``LocalExperts``): their ``[rows, 2I]`` intermediate activations, the
  largest saved tensors of an MoE layer (top-k rows per token), are recomputed; the dispatch and combine (with
  their collectives) and the router are not.
- ``attention``: every decoder layer's ``self_attn`` (projections, rotary, attention scores).

Recomputation runs the same operations on the same inputs, so the gradients equal those without it
(``tests/test_recompute.py``). Apply it before :func:`~npu_parallel.parallel.data_parallel.data_parallel`, as
FSDP2 expects.
"""

from __future__ import annotations

import torch
from torch import nn

from npu_parallel.moe.experts import LocalExperts
from npu_parallel.parallel.data_parallel import decoder_layers, local_tensor

__all__ = ["RECOMPUTE", "apply_recompute", "recomputed_modules", "saved_bytes"]

RECOMPUTE = ("none", "experts", "attention", "full")


def recomputed_modules(model: nn.Module, mode: str) -> list[nn.Module]:
    """The modules ``mode`` checkpoints (``full``: the decoder layers)."""
    if mode not in RECOMPUTE:
        raise ValueError(f"recompute={mode!r}: use one of {', '.join(RECOMPUTE)}")
    if mode == "experts":
        return [m for m in model.modules() if isinstance(m, LocalExperts)]
    if mode == "attention":
        return [layer.self_attn for layer in decoder_layers(model) if isinstance(layer.self_attn, nn.Module)]
    if mode == "full":
        return list(decoder_layers(model))
    return []


def apply_recompute(model: nn.Module, mode: str) -> int:
    """Recompute ``mode``'s activations in the backward; returns how many modules it applies to."""
    if mode == "full":
        enable = getattr(model, "gradient_checkpointing_enable")  # noqa: B009 (transformers' method; nn.Module types it as a Tensor)
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return len(recomputed_modules(model, mode))
    from torch.distributed._composable import checkpoint

    targets = recomputed_modules(model, mode)
    for module in targets:
        checkpoint(module)
    return len(targets)


def saved_bytes(model: nn.Module, weights: set[int] | None = None, **inputs) -> tuple[torch.Tensor, int]:
    """(loss of ``model(**inputs)``, bytes of the tensors autograd saves for the backward in that forward): each
    storage once, the storages in ``weights`` (data pointers; default: this rank's parameters) left out, and what
    a recomputed region keeps for itself not seen. A measuring aid (tests, benchmarks); training never calls it."""
    if weights is None:
        weights = {local_tensor(p).untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    return loss, sum(saved.values())
