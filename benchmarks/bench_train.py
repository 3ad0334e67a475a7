#!/usr/bin/env python
"""Fine-tuning step throughput and peak RSS per rank: npu_parallel vs transformers' tp_plan="auto".

    python benchmarks/bench_train.py [--model tiny|slice|PATH] [--tp 2] [--steps 10] [--batch 4] [--seq 256]

Both train the same checkpoint at the same tp on CPU (gloo) with the same AdamW, batch and data, each in fresh
torchrun ranks, alternating; each implementation's best launch is kept. Writes benchmarks/results/bench_train.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

MODES = ("ours", "transformers")
HEADER = ["impl", "rank", "tokens/s", "step s", "peak RSS MB", "load s", "loss first -> last"]


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: load time, mean step time, tokens/s, peak RSS, first and last loss."""
    import torch
    from transformers import AutoModelForCausalLM

    import npu_parallel

    torch.set_num_threads(1)
    state = npu_parallel.init_distributed(args.tp)
    peak = common.Peak(state.device)
    t_load = time.perf_counter()
    if args.mode == "ours":
        model = npu_parallel.load_pretrained(args.path, state, dtype=torch.float32, progress=False)
    else:
        from transformers import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(
            args.path, distributed_config=DistributedConfig(tp_size=args.tp, tp_plan="auto"), dtype=torch.float32
        )
    t_load = time.perf_counter() - t_load
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    batches = common.random_batches(model.config.vocab_size, args.batch, args.seq, args.warmup + args.steps)
    times, losses = common.timed_steps(step, batches, args.warmup)
    step_s = sum(times) / len(times)
    return {
        "rank": state.rank,
        "load_s": t_load,
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "peak_mb": peak.bytes() / 2**20,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--tp", type=int, default=2)
    args = p.parse_args()
    desc, records = common.launch_modes("bench_train:worker", args, MODES)
    bests = common.best(records)
    rows = [
        [r["mode"], r["rank"], f"{r['tokens_per_s']:.0f}", f"{r['step_s']:.3f}", f"{r['peak_mb']:.0f}",
         f"{r['load_s']:.2f}", f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"]
        for m in MODES for r in sorted(bests[m], key=lambda r: r["rank"])
    ]  # fmt: skip
    ours, theirs = bests["ours"], bests["transformers"]
    speed = max(r["step_s"] for r in theirs) / max(r["step_s"] for r in ours)
    mem = max(r["peak_mb"] for r in ours) / max(r["peak_mb"] for r in theirs)
    intro = [
        f"{desc}, tp={args.tp}, batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after {args.warmup} "
        f"warmup, AdamW, fp32, CPU gloo; best of {args.repeats} alternating launches (slowest-rank step s per "
        f"launch: ours {common.spread(records, 'ours')}, transformers {common.spread(records, 'transformers')})",
    ]  # fmt: skip
    ratios = [
        f"ratio tokens/s ours / transformers = {speed:.2f}x (target >= 1.2x: {'PASS' if speed >= 1.2 else 'MISS'})",
        f"ratio peak RSS ours / transformers = {mem:.2f}x (target <= 1.0x: {'PASS' if mem <= 1.0 else 'MISS'})",
    ]  # fmt: skip
    common.write_report("bench_train", args, desc, intro, HEADER, rows, ratios)


if __name__ == "__main__":
    main()
