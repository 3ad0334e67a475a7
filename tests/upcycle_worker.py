"""Rank worker: upcycled checkpoints loaded by load_pretrained (tp, ep, pp) against their dense sources."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import npu_parallel
from npu_parallel.training.batch import Batch
from npu_parallel.training.pipeline import build_pipeline, pipeline_step


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))


def _dense_ce(ref, batches: list[Batch]) -> float:
    """The dense model's mean next-token cross-entropy over the batches' targets (a step's global loss)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = ref(input_ids=b.input_ids).logits[:, :-1]
            target = b.targets(0)
            total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            count += int(target.numel())
    return total / count


def compare(pairs: list[tuple[str, str]], layouts: list[tuple[int, int, int]]) -> dict:
    """{"moe dir tp ep pp": max |logits - dense logits|} for each (dense dir, moe dir) and (tp, ep, pp) layout,
    the MoE one via load_pretrained; at pp > 1 the pipeline's step loss (cross-entropy) against the dense one's."""
    out = {}
    for dense, moe in pairs:
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
        ids = _ids(ref.config.vocab_size)
        batches = [Batch.from_windows(ids[i : i + 1]) for i in range(2)]
        with torch.no_grad():
            want = ref(input_ids=ids).logits
        ce = _dense_ce(ref, batches)
        del ref
        for tp, ep, pp in layouts:
            state = npu_parallel.init_distributed(tp, ep_size=ep, pp_size=pp)
            model = npu_parallel.load_pretrained(moe, state, dtype=torch.float32, progress=False)
            key = f"{moe} tp{tp} ep{ep} pp{pp}"
            if pp == 1:
                with torch.no_grad():
                    got = model.eval()(input_ids=ids).logits
                out[key] = (got - want).abs().max().item()
            else:  # the stages hold the upcycled layers; their pipelined loss is the dense model's
                step = pipeline_step(build_pipeline(model.train(), state), batches, state)
                out[key] = abs(float(step.ce) - ce)
            del model
    return out
