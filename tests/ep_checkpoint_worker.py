"""Rank worker: checkpoints across (tp, ep) layouts at world 4 -- save at one layout, load at others, offline
convert at ep > tp, and an exact resume at ep > tp (optimizer state included)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.checkpoint.offline import convert_checkpoint, merge_checkpoint
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.checkpoint.save import load_training_state, save_sharded

from .common import seeded_ids
from .ep_worker import ROWS, SEQ, average_grads


def _ids(vocab: int) -> torch.Tensor:
    return seeded_ids(vocab, ROWS, SEQ, 99)


def _max_diff(model, ids, ref) -> float:
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def _step(model, opt, state, ids) -> float:
    """One AdamW step on this dp rank's rows of ``ids``; the loss before it, averaged over dp."""
    rows = ROWS // state.dp_size
    mine = ids[state.dp_rank * rows : (state.dp_rank + 1) * rows]
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()
    average_grads(model, state)
    opt.step()
    opt.zero_grad(set_to_none=True)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return (mean / state.world_size).item()


def layouts(src: str, out_root: str) -> dict:
    out, root = {}, Path(out_root)
    ref_model = AutoModelForCausalLM.from_pretrained(src)
    ids = _ids(ref_model.config.vocab_size)
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    del ref_model

    # saved at (tp 2, ep 4): 4 rank files, experts in each, tp shards in the first two
    state = npu_parallel.init_distributed(2, ep_size=4)
    model = load_pretrained(src, state, progress=False)
    out["load_pretrained 2/4"] = _max_diff(model, ids, ref)
    saved = save_sharded(model, root / "saved_2_4", state)
    del model
    if state.rank == 0:
        convert_checkpoint(src, 1, root / "offline_1_4", ep=4, progress=False)
    dist.barrier()
    for tp, ep in [(1, 4), (2, 2), (1, 2), (4, 4), (2, 4)]:
        state = npu_parallel.init_distributed(tp, ep_size=ep)
        for name in ("saved_2_4", "offline_1_4"):
            model = load_sharded(root / name, state)
            out[f"{name} -> {tp}/{ep}"] = _max_diff(model, ids, ref)
            del model

    # exact resume at ep > tp: step, save with the optimizer, step; reload, restore, step: the same loss
    state = npu_parallel.init_distributed(2, ep_size=4)
    model = load_sharded(saved, state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt, state, ids)
    save_sharded(model, root / "resume", state, optimizer=opt, extra={"step": 1})
    _step(model, opt, state, ids)
    expected = _step(model, opt, state, ids)
    del model, opt
    model = load_sharded(root / "resume", state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out["resume extra"] = load_training_state(root / "resume", state, optimizer=opt)
    _step(model, opt, state, ids)
    out["resume loss"], out["resume expected"] = _step(model, opt, state, ids), expected
    try:
        load_training_state(root / "resume", npu_parallel.init_distributed(2), optimizer=opt)
        out["resume at another ep"] = "loaded"
    except CheckpointError as exc:
        out["resume at another ep"] = str(exc)

    if state.rank == 0:  # merged back to Hugging Face: transformers loads it and computes the same logits
        merged = merge_checkpoint(root / "saved_2_4", root / "merged", progress=False)
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
        out["merged"] = (logits - ref).abs().max().item()
        out["files"] = sorted(p.name for p in (root / "saved_2_4").glob("rank-*"))
    return out
