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
