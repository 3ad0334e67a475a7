#!/usr/bin/env python
"""LoRA (r 16) against full fine-tuning: step time and peak memory per rank, the same converted model and tp.

    python benchmarks/bench_lora.py [--model tiny|slice|PATH] [--tp 2] [--steps 10] [--batch 4] [--seq 256] [--r 16]

Both load the checkpoint with ``load_pretrained`` at the same tp, in fresh torchrun ranks, and train with AdamW on
the same batches: full fine-tuning on every parameter, LoRA on the adapters of the attention projections and the
routed experts (``apply_lora``). Peak memory is the process' RSS above its start (CPU) or the device's peak
allocation. Writes benchmarks/results/bench_lora.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MODES = ("lora", "full")
HEADER = ["mode", "rank", "trainable", "tokens/s", "step s", "peak MB", "states MB", "loss first -> last"]


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: mean step time, tokens/s, peak memory, trainable parameters, first and last loss."""
    import torch

    import npu_parallel

    torch.set_num_threads(1)
    state = npu_parallel.init_distributed(args.tp)
    peak = common.Peak(state.device)
    model = npu_parallel.load_pretrained(args.path, state, dtype=torch.float32, progress=False)
    if args.mode == "lora":
        from peft import LoraConfig

        torch.manual_seed(0)
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, target_parameters=EXPERTS)
        npu_parallel.apply_lora(model, state, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(ids):
        ids = ids.to(state.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    batches = common.random_batches(model.config.vocab_size, args.batch, args.seq, args.warmup + args.steps)
    times, losses = common.timed_steps(step, batches, args.warmup)
    # model state held between steps, counted from the live tensors: weights, gradients (kept until zero_grad:
    # counted as at the step), AdamW's two moments
    tensors = {id(p): p for p in model.parameters()}
    tensors.update({id(t): t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()})
    states = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(p.numel() * 4 for p in params)
    step_s = sum(times) / len(times)
    return {
        "rank": state.rank,
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "peak_mb": peak.bytes() / 2**20,
        "memory": peak.kind,
        "states_mb": states / 2**20,
        "trainable": sum(p.numel() for p in params),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    args = p.parse_args()
    desc, records = common.launch_modes("bench_lora:worker", args, MODES)
    bests = common.best(records)
    lora, full = bests["lora"], bests["full"]
    rows = [
        [r["mode"], r["rank"], r["trainable"], f"{r['tokens_per_s']:.0f}", f"{r['step_s']:.3f}", f"{r['peak_mb']:.0f}",
         f"{r['states_mb']:.1f}", f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"]
        for m in MODES for r in sorted(bests[m], key=lambda r: r["rank"])
    ]  # fmt: skip
    intro = [
        f"{desc}, tp={args.tp}, batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after {args.warmup} "
        f"warmup, AdamW, fp32; LoRA r={args.r} on {'/'.join(TARGETS)} and the routed experts; best of "
        f"{args.repeats} alternating launches; peak memory: {lora[0]['memory']} above the process start",
    ]  # fmt: skip
    trainable = lora[0]["trainable"] / full[0]["trainable"]
    ratios = [
        common.ratio_line("step time LoRA / full", common.ratio(bests, "step_s", "lora", "full")),
        common.ratio_line("peak memory LoRA / full", common.ratio(bests, "peak_mb", "lora", "full")),
        common.ratio_line(
            "model states (weights, gradients, AdamW moments) LoRA / full",
            common.ratio(bests, "states_mb", "lora", "full"),
        ),
        common.ratio_line("trainable parameters LoRA / full", trainable, digits=3, unit=""),
    ]
    common.write_report("bench_lora", args, desc, intro, HEADER, rows, ratios)


if __name__ == "__main__":
    main()
