"""Rank worker: upcycled checkpoints loaded by load_pretrained against their dense sources' logits."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import npu_parallel


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))


def compare(pairs: list[tuple[str, str]], layouts: list[tuple[int, int]]) -> dict:
    """{"moe dir tp ep": max |logits - dense logits|} for each (dense dir, moe dir) and (tp, ep) layout, the MoE
    one via load_pretrained."""
    out = {}
    for dense, moe in pairs:
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
        ids = _ids(ref.config.vocab_size)
        with torch.no_grad():
            want = ref(input_ids=ids).logits
        del ref
        for tp, ep in layouts:
            state = npu_parallel.init_distributed(tp, ep_size=ep)
            model = npu_parallel.load_pretrained(moe, state, dtype=torch.float32, progress=False).eval()
            with torch.no_grad():
                got = model(input_ids=ids).logits
            out[f"{moe} tp{tp} ep{ep}"] = (got - want).abs().max().item()
            del model
    return out
