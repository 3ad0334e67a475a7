"""Rank worker: train-mode logits with router noise at tp = world equal those of one process (tp 1) on rank 0."""

from __future__ import annotations

import torch

import npu_parallel
from npu_parallel.moe.gate_options import GateOptions

from .common import seeded_ids


def run(path: str, kinds: list[str]) -> dict[str, float]:
    """Kind -> max |logits(tp=world) - logits(tp=1)| of one train-mode forward, the same seed and step."""
    state = npu_parallel.init_distributed()
    out = {}
    for kind in kinds:
        options = GateOptions(noise=kind, noise_eps=0.3, seed=1)
        model = npu_parallel.load_pretrained(path, state, dtype=torch.float32, gate_options=options, progress=False)
        ids = seeded_ids(model.config.vocab_size, 2, 16, 9)
        with torch.no_grad():
            got = model.train()(input_ids=ids).logits
        ref = _single(path, options, ids)
        out[kind] = float((got - ref).abs().max())
    return out


def _single(path: str, options: GateOptions, ids: torch.Tensor) -> torch.Tensor:
    """The same forward at tp 1 in this process: the plain model converted with no process group."""
    from transformers import AutoModelForCausalLM

    from npu_parallel.parallel.state import single_rank_state

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    npu_parallel.convert_model(model, single_rank_state(), gate_options=options)
    with torch.no_grad():
        return model.train()(input_ids=ids).logits
