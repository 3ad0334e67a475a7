"""Rank workers for the layout-invariance tests: the same global batches split over dp ranks and micro-batches."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.parallel.data_parallel import data_parallel
from npu_parallel.training.batch import IGNORE_INDEX, Batch
from npu_parallel.training.optim import build_optimizer, clip_grad_norm_
from npu_parallel.training.step import train_step

ROWS, LENGTH = 4, 16
# supervised targets per row of each step: unequal, so a mean per micro-batch weighs the rows differently
SUPERVISED = [(14, 2, 9, 1), (3, 12, 1, 7)]


def global_batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two steps' global batches ``[ROWS, LENGTH]`` (ids, labels): row r supervises its last SUPERVISED[s][r]
    targets, -100 before them (a prompt), so every micro-batch split has its own supervised-token count."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for counts in SUPERVISED:
        ids = torch.randint(0, vocab, (ROWS, LENGTH), generator=gen)
        labels = ids.clone()
        for r, n in enumerate(counts):  # targets are labels[:, 1:]: keep the last n of them
            labels[r, : LENGTH - n] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def micro_batches(ids: torch.Tensor, labels: torch.Tensor, dp_rank: int, dp: int, ga: int) -> list[Batch]:
    """This dp rank's contiguous share of the global rows, cut into ``ga`` micro-batches."""
    per_rank = ROWS // dp
    rows = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    size = per_rank // ga
    out = []
    for i in range(ga):
        sel = list(rows[i * size : (i + 1) * size])
        part = ids[sel]
        positions = torch.arange(LENGTH).expand_as(part).contiguous()
        out.append(Batch(part, labels[sel].clone(), positions))
    return out


def count_reduce_scatters(counter: list[int]):
    """Wrap ``dist.reduce_scatter_single`` (FSDP2's gradient reduction) to count its calls into ``counter``."""
    original = dist.reduce_scatter_single

    def counted(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counted
    return original


def run_layout(path: str, tp: int, ga: int, lora: bool, aux: bool = False, steps: int = 2) -> dict:
    """Two optimizer steps at (tp, dp = world / tp, ga) on :func:`global_batches`: the global step losses and
    grad norms, and (ga > 1, dp > 1) how many FSDP2 reduce-scatters each micro-batch's backward issued."""
    state = npu_parallel.init_distributed(tp)
    torch.manual_seed(0)  # LoRA's initialisation: the same adapters at every layout
    model = load_pretrained(path, state, progress=False, aux_loss_coef=0.01 if aux else 0.0)
    if lora:
        npu_parallel.apply_lora(model, state, LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "o_proj"]))
    model.train()
    data_parallel(model, state)
    opt = build_optimizer(model, 1e-2)
    losses, norms, aux_losses, reduces = [], [], [], []
    counter = [0]
    original = count_reduce_scatters(counter)
    try:
        for ids, labels in global_batches(model.config.vocab_size)[:steps]:
            batches = micro_batches(ids, labels, state.dp_rank, state.dp_size, ga)
            marks: list[int] = []  # the reduce-scatter count as each micro-batch's forward starts
            hook = model.register_forward_pre_hook(lambda m, a, marks=marks: marks.append(counter[0]))
            step = train_step(model, batches, state)
            hook.remove()
            marks.append(counter[0])
            reduces.append([b - a for a, b in itertools.pairwise(marks)])
            counter[0] = 0
            total, _, aux_total, _ = step.reduce(state)
            norms.append(clip_grad_norm_(model, 0.0, state).item())
            losses.append(total)
            aux_losses.append(aux_total)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        dist.reduce_scatter_single = original
    return {
        "layout": {"tp": state.tp_size, "dp": state.dp_size, "ga": ga, "lora": lora, "aux": aux},
        "losses": losses,
        "norms": norms,
        "aux": aux_losses,
        "reduce_scatters": reduces,
    }


def reference(path: str) -> dict:
    """One process, the unconverted model: step 1's global loss (summed CE / global count) and the naive mean of
    per-micro-batch means for the ga4 split (one row each), which the global loss must not be."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, labels = global_batches(model.config.vocab_size)[0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
        ce = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        rows = [F.cross_entropy(logits[r], labels[r, 1:], ignore_index=IGNORE_INDEX).item() for r in range(ROWS)]
    return {"loss": ce.item(), "per_micro_batch_mean": sum(rows) / ROWS}


def run_layouts(path: str, cases: list[dict]) -> dict:
    """Each case through :func:`run_layout` in this launch; on a one-rank launch the unconverted reference too."""
    out: dict = {"cases": [run_layout(path, **case) for case in cases]}
    if dist.get_world_size() == 1:
        out["reference"] = reference(path)
    return out
