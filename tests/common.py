"""What many tests share: a seeded batch of token ids and a plain SGD step (the correctness method's update)."""

from __future__ import annotations

import torch
from torch import nn


def seeded_ids(vocab: int, rows: int, seq: int, seed: int) -> torch.Tensor:
    """``[rows, seq]`` token ids drawn from their own generator (the global RNG untouched)."""
    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sgd_step(model: nn.Module, lr: float) -> None:
    """``p -= lr * grad`` on every parameter that has a gradient, then the gradients cleared."""
    for p in model.parameters():
        if p.grad is not None:
            p -= lr * p.grad
    model.zero_grad(set_to_none=True)


def saved_bytes(model: nn.Module, weights: set[int], **inputs) -> tuple[torch.Tensor, int]:
    """(loss of ``model(**inputs)``, bytes of the tensors autograd saves for the backward in that forward): each
    storage once, the storages in ``weights`` (data pointers: the parameters and views of them) left out, and
    what a recomputed region keeps for itself not seen."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    return loss, sum(saved.values())
