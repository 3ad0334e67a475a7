"""Rank workers for the data-parallel and mixed-precision tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.parallel.state import ParallelState
from npu_parallel.tools.verify import _full_grads

SEQ = 16


def _batch(vocab: int, rows: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, SEQ), generator=torch.Generator().manual_seed(11))


def _grad_diffs(path: str, state: ParallelState, ids: torch.Tensor) -> dict:
    """Max abs diff of every gradient of the data_parallel model (each dp rank on its rows of ``ids``) against the
    unconverted fp32 model's gradient of the mean loss over all of ``ids``, and the largest reference gradient."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    ref(input_ids=ids, labels=ids).loss.backward()
    model = load_pretrained(path, state, dtype=torch.float32, progress=False).train()
    model = npu_parallel.data_parallel(model, state, precision="fp32")
    rows = ids.shape[0] // state.dp_size
    mine = ids[state.dp_rank * rows : (state.dp_rank + 1) * rows]
    model(input_ids=mine, labels=mine).loss.backward()
    got = _full_grads(model, state)
    diffs = {n: (got[n] - p.grad).abs().max().item() for n, p in ref.named_parameters() if p.grad is not None}
    return {
        "max_diff": max(diffs.values()),
        "worst": max(diffs, key=lambda n: diffs[n]),
        "max_grad": max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None),
        "compared": len(diffs),
        "params": len(dict(ref.named_parameters())),
        "dp": state.dp_size,
        "tp": state.tp_size,
        "dtensor": all(type(p).__name__ == "DTensor" for p in model.parameters()),
    }


def dp_grads(path: str) -> list[dict]:
    """On a world of 4: tp 2 x dp 2, then tp 1 x dp 4 (new groups on the same world), each against the
    unconverted model's mean-loss gradient over the same global batch of 4 sequences."""
    out = []
    for tp in (2, 1):
        state = npu_parallel.init_distributed(tp)
        out.append(_grad_diffs(path, state, _batch(250, 4)))
    return out
