"""Rank worker: pipeline stages (and TP, DP) against the unsplit model, seed 000's method (tests/test_pipeline.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

import npu_parallel
from npu_parallel.parallel.state import single_rank_state
from npu_parallel.training.batch import IGNORE_INDEX, Batch
from npu_parallel.training.labels import Encoded
from npu_parallel.training.packing import make_batch
from npu_parallel.training.pipeline import build_pipeline, pipeline_step
from npu_parallel.training.step import train_step

from .models import load_reference

SGD_LR = 1.0
AUX = 0.05  # a load-balancing coefficient large enough that a mistake in its cross-stage sum shows


def _batches(vocab: int, count: int, seed: int = 11, packed: bool = False) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    if not packed:
        return [Batch.from_windows(torch.randint(0, vocab, (2, 12), generator=g)) for _ in range(count)]
    # packed chat-like rows, every micro-batch padded to one width (the stages send one shape): row 0 two
    # documents, row 1 one and padding; a document's own labels (a prompt of 2 tokens not trained)
    out = []
    for _ in range(count):
        rows = []
        for lengths in ((5, 7), (8,)):
            docs = []
            for n in lengths:
                ids = torch.randint(3, vocab, (n,), generator=g).tolist()
                docs.append(Encoded(ids, [IGNORE_INDEX] * 2 + ids[2:]))
            rows.append(docs)
        out.append(make_batch(rows, pad_id=0, width=12))
    return out


def _load(path: str, state, mtp: bool):
    if mtp:  # the published layout keeps the MTP layer (transformers drops it); its MoE block adds no balance term
        return npu_parallel.load_pretrained(path, state, dtype=torch.float32, progress=False, aux_loss_coef=AUX)
    return npu_parallel.convert_model(load_reference(Path(path).name, Path(path)), state, aux_loss_coef=AUX)


def _sgd(params) -> None:
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= SGD_LR * p.grad
                p.grad = None


def _run(model, state, batches, pp: int, mtp_weight: float, schedule: str = "1f1b", virtual: int = 1):
    """(loss, aux, loss after one SGD step on every parameter) of this layout, global values."""
    model.train()
    if pp == 1:

        def step():
            return train_step(model, batches, state, mtp_weight=mtp_weight)

        params = list(model.parameters())
    else:
        pipe = build_pipeline(model, state, schedule=schedule, virtual=virtual, mtp_weight=mtp_weight)

        def step():
            return pipeline_step(pipe, batches, state)

        params = pipe.parameters()
    out = step()
    before = _dp_sum([out.loss, out.aux if out.aux is not None else out.loss * 0], state)
    if state.dp_size > 1 and pp == 1:  # no FSDP2 here: the mean over dp by hand, as pipeline_step does
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=state.dp_group)
                p.grad.div_(state.dp_size)
    _sgd(params)
    after = _dp_sum([step().loss], state)
    model.zero_grad(set_to_none=True)
    return before[0], before[1], after[0]


def _dp_sum(values, state) -> list[float]:
    t = torch.stack([v.detach().float() for v in values])
    if state.dp_size > 1:
        dist.all_reduce(t, group=state.dp_group)
    return t.tolist()


def compare(paths: dict[str, str], layouts: list[tuple[int, int]], micro: int = 4) -> dict:
    """variant -> layout "tpX_ppY_dpZ" -> (loss, aux, after), "ref_<layout>" -> the unsplit model's on that
    layout's global batch (dp x micro micro-batches), "ref" -> the last of those."""
    results: dict = {}
    npu_parallel.init_distributed(1)  # the world group, before the reference runs alone on each rank
    ref_state = single_rank_state()
    for name, path in paths.items():
        packed = name.endswith("_packed")
        mtp = name.removesuffix("_packed").endswith("_mtp")
        weight = 0.3 if mtp else 0.0
        probe = _load(path, ref_state, mtp)
        vocab = probe.config.vocab_size
        world = dist.get_world_size()
        row: dict = {}
        for tp, pp in layouts:
            dp = world // (tp * pp)
            everything = _batches(vocab, micro * dp, packed=packed)
            if "ref" not in row or len(row["ref_batches"]) != len(everything):
                ref = probe if "ref" not in row else _load(path, ref_state, mtp)
                row["ref"] = _run(ref, ref_state, everything, 1, weight)
                row["ref_batches"] = everything
                del ref
            state = npu_parallel.init_distributed(tp, pp_size=pp)
            mine = everything[state.dp_rank * micro : (state.dp_rank + 1) * micro]
            model = _load(path, state, mtp)
            row[f"tp{tp}_pp{pp}_dp{dp}"] = _run(model, state, mine, pp, weight)
            row[f"ref_tp{tp}_pp{pp}_dp{dp}"] = row["ref"]  # the unsplit model on this layout's global batch
            del model
        del row["ref_batches"]
        results[name] = row
    return results


def _deeper(layers: int = 4):
    """A 4-layer tiny Qwen3-MoE (interleaved 1F1B at pp 2 runs 4 stages), the same on every rank."""
    from .models import VARIANTS

    cfg_cls, model_cls, extra = VARIANTS["qwen3_moe"]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**{**extra, "num_hidden_layers": layers})).float()


def schedules(names: list[str]) -> dict:
    """Per schedule: loss and this rank's stage gradients after one step at tp 1, pp = world (all equal)."""
    state = npu_parallel.init_distributed(1, pp_size=int(os.environ["WORLD_SIZE"]))
    out: dict = {}
    for schedule in names:
        model = npu_parallel.convert_model(_deeper(), state, aux_loss_coef=AUX).train()
        virtual = 2 if schedule in ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble") else 1
        pipe = build_pipeline(model, state, schedule=schedule, virtual=virtual)
        loss = pipeline_step(pipe, _batches(model.config.vocab_size, 4), state)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[schedule] = {"loss": loss.loss.item(), "aux": loss.aux.item() if loss.aux is not None else None}
        out[schedule]["grads"] = grads
    # every rank's gradients (a parameter trains on the rank of its stage, which differs between schedules)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {s: v.pop("grads") for s, v in out.items()})
    union = {s: {k: g for rank in gathered for k, g in rank[s].items()} for s in names}
    base = union[names[0]]
    for s in names:
        assert set(union[s]) == set(base), (s, sorted(set(union[s]) ^ set(base)))
        out[s]["max_grad_diff"] = max((union[s][k] - base[k]).abs().max().item() for k in base)
        out[s]["params_with_grad"] = len(union[s])
    out["params"] = len(list(model.parameters()))
    return out


def world(paths: dict[str, str], layouts: list[tuple[int, int]], schedule_names: list[str]) -> dict:
    """The test module's one launch: every variant at every layout, then the schedules (when named)."""
    out = {"layouts": compare(paths, layouts)}
    if schedule_names:
        out["schedules"] = schedules(schedule_names)
    return out
