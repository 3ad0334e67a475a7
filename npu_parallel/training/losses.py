"""Causal-LM loss of a converted model: transformers' own (full logits) or vocab-parallel (no full logits)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from npu_parallel.moe.load import balance_loss
from npu_parallel.parallel.vocab import ParallelLMHead, vocab_parallel_cross_entropy

IGNORE = -100


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def lm_head_of(model: nn.Module) -> ParallelLMHead:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, ParallelLMHead):
        raise ValueError(
            "the vocab-parallel loss needs a model converted by npu_parallel (its lm_head is ParallelLMHead)"
        )
    return head


def set_vocab_parallel_logits(model: nn.Module, enabled: bool) -> None:
    """Make ``model(...).logits`` this rank's vocab slice (True) or the gathered full vocab (False)."""
    lm_head_of(model).gather_output = not enabled


def causal_lm_loss(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, vocab_parallel: bool, group=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, aux_loss) for one batch; the same value either way, vocab-parallel never gathers the logits.

    In train mode ``loss`` holds the weighted load-balancing loss once (the converted model adds it to its own
    loss; here it is added to the vocab-parallel one) and ``aux_loss`` is that term (None when the model has none).
    """
    module = unwrap(model)
    if not vocab_parallel:
        out = model(input_ids=input_ids, labels=labels)
        return out.loss, balance_loss(module) if module.training else None
    head = lm_head_of(module)
    out = model(input_ids=input_ids)
    local = out.logits[:, :-1]
    target = labels[:, 1:]
    per_token = vocab_parallel_cross_entropy(local, target, head.vocab_start, head.vocab_stop, head.tp, IGNORE)
    loss = per_token.sum() / (target != IGNORE).sum().clamp(min=1)
    aux = balance_loss(module) if module.training else None
    if aux is not None:  # the weighted term, which the model adds to its own loss when given labels
        loss = loss + aux.to(loss.dtype)
    return loss, aux
