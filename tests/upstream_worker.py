"""Rank worker: models built by DeepSeek's published code, converted and loaded, against that code unconverted."""

from __future__ import annotations

from pathlib import Path

import torch

import npu_parallel
from npu_parallel.checkpoint.remote_code import load_hf_model
from npu_parallel.hf_compat import is_remote_code

from .equivalence import _batch, _step
from .upstream import EVAL_ONLY


def _eval(model, ids):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.loss, out.logits, None


def _diffs(ref, got) -> dict:
    loss, logits, after = got
    out = {"loss": (loss - ref[0]).abs().item(), "logits": (logits - ref[1]).abs().max().item()}
    if after is not None:
        out["loss_after_step"] = (after - ref[2]).abs().item()
    return out


def compare(root: str, names: list[str], tp: int) -> dict:
    """Per model: differences of convert_model(remote model) and of load_pretrained against the remote model.

    A name ``model:eager`` loads the reference with eager attention. Train mode (loss, logits, then the loss
    after one SGD step, which carries the auxiliary loss's gradient) unless the model runs in eval only.
    """
    state = npu_parallel.init_distributed(tp)
    results = {}
    for name in names:
        model_name, _, attn = name.partition(":")
        run = _eval if model_name in EVAL_ONLY else _step
        path = Path(root) / model_name
        kwargs = {"attn_implementation": attn} if attn else {}
        ref_model = load_hf_model(path, torch.float32, True, **kwargs)
        assert is_remote_code(ref_model), type(ref_model)
        ids = _batch(ref_model.config.vocab_size)
        # the remote-code reference puts its MoEGates' auxiliary loss in the gradient only; the converted model
        # also adds it to out.loss: the reference's loss gets its gates' losses added (tests/equivalence.py)
        ref = _eval(ref_model, ids) if model_name in EVAL_ONLY else _step(ref_model, ids, reference=True)
        del ref_model
        converted = npu_parallel.convert_model(load_hf_model(path, torch.float32, True, **kwargs), state)
        results[name] = {"convert_model": _diffs(ref, run(converted, ids))}
        del converted
        if not attn:
            loaded = npu_parallel.load_pretrained(path, state, dtype=torch.float32, trust_remote_code=True)
            results[name]["load_pretrained"] = _diffs(ref, run(loaded, ids))
            results[name]["class"] = type(loaded).__module__.split(".")[0]
    return results
