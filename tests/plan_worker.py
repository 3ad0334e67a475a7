"""Rank worker: memory of a real training step at world 4, per (tp, ep) layout, for the planner's test."""

from __future__ import annotations

from pathlib import Path

import torch

import npu_parallel
from npu_parallel.training.recompute import saved_bytes

from .common import seeded_ids
from .ep_worker import ROWS, SEQ, _load, average_grads


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def measure(ckpt_root: str, names: list[str], layouts: list[tuple[int, int]]) -> dict:
    """{"name tp ep": bytes of parameters, gradients, AdamW states and saved activations on rank 0}."""
    out = {}
    for tp, ep in layouts:
        state = npu_parallel.init_distributed(tp, ep_size=ep)
        rows = ROWS // state.dp_size
        for name in names:
            model = npu_parallel.convert_model(_load(Path(ckpt_root) / name, name), state)
            model.train()
            ids = seeded_ids(model.config.vocab_size, rows, SEQ, 3)
            loss, activations = saved_bytes(model, input_ids=ids, labels=ids)
            loss.backward()
            average_grads(model, state)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            opt.step()
            params = list(model.parameters())
            states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]  # step: one scalar each
            out[f"{name} {tp} {ep}"] = {
                "weights": _bytes(params),
                "grads": _bytes([p.grad for p in params if p.grad is not None]),
                "optimizer": _bytes(states),
                "activations": activations,
                "micro_batch": rows,
            }
            del model, opt
    return out
