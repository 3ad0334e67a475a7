"""Causal-LM loss of a converted model: transformers' own (full logits) or vocab-parallel (no full logits).

:func:`batch_loss` is what training and eval use: the *sum* of cross-entropy over a :class:`Batch`'s supervised
targets and their count, so a step can divide by the global batch's count (:mod:`npu_parallel.training.step`).
:func:`causal_lm_loss` (the mean of one forward) stays for tools and tests that compare with ``out.loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from npu_parallel.convert.documents import document_inputs
from npu_parallel.convert.mtp import mtp_states
from npu_parallel.moe.load import balance_loss, token_layout
from npu_parallel.moe.token_layout import TokenLayout
from npu_parallel.parallel.vocab import ParallelLMHead, vocab_parallel_cross_entropy
from npu_parallel.training.batch import IGNORE_INDEX, Batch

IGNORE = IGNORE_INDEX


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


def token_loss(logits: torch.Tensor, target: torch.Tensor, head: nn.Module, vocab_parallel: bool) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [B, L, V or V/tp] against ``target`` [B, L] over non-ignored tokens."""
    if vocab_parallel:
        assert isinstance(head, ParallelLMHead)
        per_token = vocab_parallel_cross_entropy(logits, target, head.vocab_start, head.vocab_stop, head.tp, IGNORE)
        return per_token.sum() / (target != IGNORE).sum().clamp(min=1)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE)


def mtp_loss(
    model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, *, vocab_parallel: bool
) -> torch.Tensor:
    """DeepSeek-V3's L_MTP / lambda: the mean over depths k of the cross-entropy of predicting token i+k+1.

    ``hidden``: the main model's final normed hidden states [B, T, H]; embedding and head are the main model's.
    """
    head: Any = getattr(model, "get_output_embeddings")()  # noqa: B009 (nn.Module types it as a Tensor)
    losses = []
    for k, states in enumerate(mtp_states(model, hidden, input_ids), start=1):
        logits = head(states)[:, :-1]  # [B, T-k-1, V or V/tp]: position i predicts token i+k+1
        losses.append(token_loss(logits, labels[:, k + 1 :], head, vocab_parallel))
    return torch.stack(losses).mean()


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_parallel: bool,
    group=None,
    mtp_weight: float = 0.0,
    parts: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, aux_loss) for one batch; the same value either way, vocab-parallel never gathers the logits.

    ``mtp_weight`` > 0 adds DeepSeek-V3's MTP loss times it (the model must have MTP layers); its value goes
    into ``parts["mtp_loss"]`` when ``parts`` is given. In train mode ``loss`` holds the weighted load-balancing
    loss once (the converted model adds it to its own loss; here it is added to the vocab-parallel one) and
    ``aux_loss`` is that term (None when the model has none).
    """
    captured: list[torch.Tensor] = []
    hook = None
    if mtp_weight:  # the main model's final normed hidden states h^0, as its forward computes them
        base: Any = model.model
        final_norm: nn.Module = base.norm
        hook = final_norm.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        if not vocab_parallel:
            out = model(input_ids=input_ids, labels=labels, use_cache=False)
            loss = out.loss
        else:
            out = model(input_ids=input_ids, use_cache=False)
            loss = token_loss(out.logits[:, :-1], labels[:, 1:], lm_head_of(model), True)
    finally:
        if hook is not None:
            hook.remove()
    aux = balance_loss(model) if model.training else None
    if vocab_parallel and aux is not None:  # the weighted term, which the model adds to its own loss given labels
        loss = loss + aux.to(loss.dtype)
    if mtp_weight:
        mtp = mtp_loss(model, captured[-1], input_ids, labels, vocab_parallel=vocab_parallel)
        loss = loss + mtp_weight * mtp
        if parts is not None:
            parts["mtp_loss"] = mtp.detach()
    return loss, aux


def token_loss_sum(logits: torch.Tensor, target: torch.Tensor, head: nn.Module, vocab_parallel: bool) -> torch.Tensor:
    """Summed cross-entropy (fp32) of ``logits`` [B, L, V or V/tp] against ``target`` [B, L], ignored tokens 0."""
    if vocab_parallel:
        assert isinstance(head, ParallelLMHead)
        per_token = vocab_parallel_cross_entropy(logits, target, head.vocab_start, head.vocab_stop, head.tp, IGNORE)
        return per_token.float().sum()
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")


@dataclass
class BatchLoss:
    """One micro-batch's loss terms, unnormalized: the step divides them by the global batch's counts."""

    ce_sum: torch.Tensor  # fp32 scalar with its graph: cross-entropy summed over the supervised targets
    targets: int  # how many (host-side, from the batch)
    aux: torch.Tensor | None = None  # the weighted load-balancing term of this forward (train mode), with its graph
    mtp_sums: list[torch.Tensor] | None = None  # MTP: per depth k = 1..D, cross-entropy summed over its targets


def batch_loss(model: nn.Module, batch: Batch, *, vocab_parallel: bool, mtp_weight: float = 0.0) -> BatchLoss:
    """Forward one :class:`Batch` and return its summed losses (see :class:`BatchLoss`).

    The model is called without labels (so it adds nothing to a loss of its own); the cross-entropy is taken
    from its logits, full or vocab-parallel, shifted here: position ``i`` predicts ``labels[i + 1]``. A packed
    batch's documents stay apart (block-diagonal attention, positions restarting at 0: convert/documents.py),
    and its padding counts in neither the load-balancing loss nor the routed load (moe/token_layout.py).
    """
    captured: list[torch.Tensor] = []
    hook = None
    if mtp_weight:  # the main model's final normed hidden states h^0, as its forward computes them
        base: Any = model.model
        hook = base.norm.register_forward_hook(lambda m, i, o: captured.append(o))
    docs = batch.document_ids
    inputs = document_inputs(model, docs, batch.position_ids, batch.lengths)
    layout = None if docs is None else TokenLayout.from_documents(docs, batch.lengths)
    try:
        with token_layout(model, layout):
            # no KV cache: a step never decodes, and a recomputed attention (--recompute) would append to it twice
            out = model(input_ids=batch.input_ids, use_cache=False, **inputs)
            head: Any = getattr(model, "get_output_embeddings")()  # noqa: B009 (nn.Module types it as a Tensor)
            ce = token_loss_sum(out.logits[:, :-1], batch.targets(0), head, vocab_parallel)
            result = BatchLoss(ce, batch.num_targets, balance_loss(model) if model.training else None)
            if mtp_weight:
                packed = "attention_mask" in inputs  # rows of one document each need no mask (as above)
                states = mtp_states(
                    model,
                    captured[-1],
                    batch.input_ids,
                    docs if packed else None,
                    batch.position_ids if packed else None,
                )
                result.mtp_sums = [
                    token_loss_sum(head(s)[:, :-1], batch.targets(k), head, vocab_parallel)
                    for k, s in enumerate(states, start=1)
                ]
    finally:
        if hook is not None:
            hook.remove()
    return result
