"""Rank workers for the fine-tuning tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.training.loop import TrainConfig, train
from npu_parallel.training.losses import causal_lm_loss, set_vocab_parallel_logits
from npu_parallel.training.optim import global_grad_norm

from .common import seeded_ids


def run_train(kwargs: dict) -> dict:
    result = train(TrainConfig(**kwargs))
    keys = ("losses", "steps", "checkpoint", "metrics", "plot", "load_plot", "plotted_steps", "state", "records")
    keys += ("param_dtypes",)
    return {k: result[k] for k in keys}


def run_many(jobs: list[dict]) -> list[dict]:
    return [run_train(j) for j in jobs]


def norms_and_losses(path: str, tp: int) -> dict:
    """Global grad norm vs the unconverted model's; vocab-parallel loss and grads vs the gathered loss."""
    state = npu_parallel.init_distributed(tp)
    ids = seeded_ids(250, 2, 16, 3)
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


def guards(path: str) -> dict:
    """Every rank's view of the cross-rank guards: the tp batch check, the world-reduced finiteness flag, and a
    run that goes non-finite (lr 1e9) on tp=2."""
    from npu_parallel.training.errors import NonFiniteError
    from npu_parallel.training.guards import check_same_batch, step_is_finite, weights_are_finite

    state = npu_parallel.init_distributed(2)
    out: dict = {"rank": state.rank}
    ids = torch.arange(12).view(2, 6)
    check_same_batch(ids, state, 1)  # the same ids on both ranks: passes
    out["same_ok"] = True
    try:
        check_same_batch(ids + state.rank, state, 1)  # rank 1's batch differs
        out["differ_error"] = None
    except RuntimeError as exc:
        out["differ_error"] = str(exc)
    # a NaN loss on rank 1 only: every rank must skip
    out["finite_when_one_rank_nan"] = step_is_finite(float("nan") if state.rank == 1 else 1.0, torch.tensor(1.0), state)
    out["finite_when_all_finite"] = step_is_finite(1.0, torch.tensor(1.0), state)
    layer = torch.nn.Linear(2, 2)
    out["weights_finite"] = weights_are_finite(layer, state)
    if state.rank == 1:
        with torch.no_grad():
            layer.weight[0, 0] = float("inf")
    out["weights_finite_when_one_rank_inf"] = weights_are_finite(layer, state)  # the save-time check, world-wide
    try:
        train(
            TrainConfig(
                model_path=path,
                tp_size=2,
                batch_size=1,
                max_length=32,
                steps=6,
                lr=1e9,
                warmup_steps=1,
                jit_warmup_steps=0,
                max_nonfinite_steps=2,
            )
        )
        out["nonfinite_error"] = None
    except NonFiniteError as exc:
        out["nonfinite_error"] = str(exc)
    return out


def cli_cases(cases: list[dict]) -> list[dict]:
    """Each case's argv through ``main()`` of its script, in this process (one interpreter for many runs): the
    exit code and the captured stderr and stdout. A case is {"script": path, "argv": [...]}."""
    import contextlib
    import importlib.util
    import io
    import logging

    results = []
    for case in cases:
        spec = importlib.util.spec_from_file_location("example", case["script"])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        err, out = io.StringIO(), io.StringIO()
        logging.basicConfig(level=logging.INFO, stream=err, force=True)  # log lines (model loading) land in err
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = module.main(case["argv"])
        results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
    return results


if __name__ == "__main__":  # python -m tests.train_worker CASES.json OUT.json
    import json
    import sys

    cases_file, out_file = sys.argv[1:3]
    with open(cases_file) as f:
        results = cli_cases(json.load(f))
    with open(out_file, "w") as f:
        json.dump(results, f)
