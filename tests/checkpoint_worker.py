"""Rank workers for the checkpoint tests: load_pretrained, save/load_sharded (resharding), training state."""

from __future__ import annotations

import hashlib
import re
import resource
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.checkpoint.save import load_training_state, save_sharded
from npu_parallel.convert.conversion import conversion_info

from .common import seeded_ids


def _diff_states(a, b) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return sorted(set(sa) ^ set(sb))
    return [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]


def _ids(vocab):
    return seeded_ids(vocab, 2, 12, 7)


def load_matches_convert(paths: list[str], tp: int, dtype: str | None = None) -> dict:
    """Per checkpoint: tensors that differ between load_pretrained and convert_model(from_pretrained), and the
    expert keys each rank read."""
    state = npu_parallel.init_distributed(tp)
    out = {}
    torch_dtype = getattr(torch, dtype) if dtype else None
    for path in paths:
        ref = npu_parallel.convert_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or "auto"), state)
        model = load_pretrained(path, state, dtype=torch_dtype, progress=False)
        ids = _ids(model.config.vocab_size)
        with torch.no_grad():
            same_logits = torch.equal(ref(input_ids=ids).logits, model(input_ids=ids).logits)
        experts = sorted(
            {
                int(m.group(1))
                for k in conversion_info(model).load_stats["keys_read"]
                if (m := re.search(r"\.experts\.(\d+)\.", k))
            }
        )
        mine = getattr(model.model.layers[-1].mlp, "experts", None)
        own = [mine.expert_start, mine.expert_start + mine.num_local] if mine is not None else None
        everyone = [None] * state.world_size
        torch.distributed.all_gather_object(
            everyone, {"experts_read": experts, "own": own, "bytes": conversion_info(model).load_stats["bytes_read"]}
        )
        out[Path(path).name] = {
            "diff": _diff_states(ref, model),
            "same_logits": same_logits,
            "ranks": everyone,
            "dtype": str(next(model.parameters()).dtype),
        }
    return out


def _adamw(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def _step(model, opt, sched, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def save(path: str, out: str, tp: int, with_training: bool, failures: bool = False) -> dict:
    """load_pretrained at tp, optionally one AdamW step, save_sharded; then the losses of 2 more steps.

    With ``failures``, then saves that fail (:func:`failing_saves`) over the checkpoint just written.
    """
    state = npu_parallel.init_distributed(tp)
    torch.manual_seed(100 + state.rank)
    model = load_pretrained(path, state, progress=False).train()
    if not with_training:
        save_sharded(model, out, state)
        return {}
    opt, sched = _adamw(model)
    ids = _ids(model.config.vocab_size)
    _step(model, opt, sched, ids)
    save_sharded(model, out, state, optimizer=opt, scheduler=sched, extra={"step": 1})
    result: dict = {"losses_after_save": [_step(model, opt, sched, ids) for _ in range(2)]}
    if failures:
        result["failures"] = failing_saves(model, opt, sched, state, Path(out))
    return result


def _digest(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _everyone(obj, state) -> list:
    out = [None] * state.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def failing_saves(model, opt, sched, state, out: Path) -> dict:
    """save_sharded over ``out`` while one rank's disk is full, and into a folder nobody can create.

    Disk full for real: the rank lowers its RLIMIT_FSIZE (Python ignores SIGXFSZ, so write() fails with EFBIG,
    as the kernel does with ENOSPC when the disk is full). Per case: every rank's error message, whether ``out``
    is unchanged and whether a ``.partial`` folder is left; then a save that works, into a new folder.
    """
    before = _digest(out)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    results = {}
    cases = {"rank1_full": (out, 1), "rank0_full": (out, 0), "unwritable": (Path("/proc/npu-parallel-test/ckpt"), -1)}
    for case, (target, full_rank) in cases.items():
        if state.rank == full_rank:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            save_sharded(model, target, state, optimizer=opt, scheduler=sched, extra={"step": 3})
            message = None
        except CheckpointError as exc:
            message = str(exc)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        results[case] = {
            "messages": _everyone(message, state),
            "unchanged": _digest(out) == before,
            "partial_left": out.with_name(out.name + ".partial").exists(),
        }
    later = out.with_name(out.name + "-later")
    save_sharded(model, later, state, optimizer=opt, scheduler=sched, extra={"step": 3})
    results["later"] = sorted(p.name for p in later.iterdir())
    return results


def load_and_compare(path: str, saved: str, tp: int) -> dict:
    """load_sharded (resharding when tp differs) against load_pretrained at this tp."""
    state = npu_parallel.init_distributed(tp)
    ref = load_pretrained(path, state, progress=False)
    built = load_sharded(saved, state)
    into = load_pretrained(path, state, progress=False)
    with torch.no_grad():
        for p in into.parameters():
            p.zero_()
    load_sharded(saved, state, model=into)
    return {"diff_built": _diff_states(ref, built), "diff_into": _diff_states(ref, into)}


def resume(path: str, saved: str, tp: int) -> dict:
    """Weights, optimizer, scheduler and RNG from a training checkpoint; the losses of the next 2 steps."""
    state = npu_parallel.init_distributed(tp)
    model = load_sharded(saved, state).train()
    opt, sched = _adamw(model)
    extra = load_training_state(saved, state, optimizer=opt, scheduler=sched)
    ids = _ids(model.config.vocab_size)
    return {"extra": extra, "losses": [_step(model, opt, sched, ids) for _ in range(2)]}
