"""Rank workers for the fine-tuning tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.training.loop import TrainConfig, train
from npu_parallel.training.losses import causal_lm_loss, set_vocab_parallel_logits
from npu_parallel.training.optim import global_grad_norm


def run_train(kwargs: dict) -> dict:
    result = train(TrainConfig(**kwargs))
    return {k: result[k] for k in ("losses", "steps", "checkpoint", "metrics", "plot", "state", "records")}


def run_many(jobs: list[dict]) -> list[dict]:
    return [run_train(j) for j in jobs]


def norms_and_losses(path: str, tp: int) -> dict:
    """Global grad norm vs the unconverted model's; vocab-parallel loss and grads vs the gathered loss."""
    state = npu_parallel.init_distributed(tp)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    ref(input_ids=ids, labels=ids).loss.backward()
    ref_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters() if p.grad is not None)).item()

    model = load_pretrained(path, state, progress=False).train()
    gathered, _ = causal_lm_loss(model, ids, ids, vocab_parallel=False)
    gathered.backward()
    norm = global_grad_norm(model, state).item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    set_vocab_parallel_logits(model, True)
    local_logits = model(input_ids=ids).logits
    vp, _ = causal_lm_loss(model, ids, ids, vocab_parallel=True)
    vp.backward()
    grad_diff = max((p.grad - grads[n]).abs().max().item() for n, p in model.named_parameters())
    return {
        "ref_norm": ref_norm,
        "norm": norm,
        "naive_sum_norm": None,
        "loss_gathered": gathered.item(),
        "loss_vp": vp.item(),
        "grad_diff": grad_diff,
        "local_logits_vocab": local_logits.shape[-1],
    }
