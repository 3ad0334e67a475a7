#!/usr/bin/env python
"""Peak memory and step time of selective recomputation: --recompute none, experts, attention and full.

    python benchmarks/bench_recompute.py [--model tiny|slice|PATH] [--steps 3] [--batch 1] [--seq 1024]

Each mode trains the same checkpoint in one fresh process (tp 1, fp32, AdamW, the same batches), launches
alternating, the best kept. Printed per mode: mean step time, the activations the backward keeps (bytes saved by
autograd outside the recomputed regions, one forward), peak RSS above the loaded model (at the slice width mostly
the weights' gradients and AdamW moments), each as a ratio to no recomputation. The gradients are the same in
every mode (tests/test_recompute.py). Writes benchmarks/results/bench_recompute.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

MODES = ("none", "experts", "attention", "full")


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: mean step time and peak RSS above the loaded model, for ``args.mode``."""
    import torch

    import npu_parallel
    from npu_parallel.training.recompute import apply_recompute, saved_bytes

    torch.set_num_threads(1)
    state = npu_parallel.init_distributed(1)
    model = npu_parallel.load_pretrained(args.path, state, dtype=torch.float32, progress=False).train()
    apply_recompute(model, args.mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = common.random_batches(model.config.vocab_size, args.batch, args.seq, args.warmup + args.steps)
    peak = common.Peak(state.device)

    def step(ids):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    ids = batches[0]  # what the backward keeps, outside the recomputed regions; gradients dropped after
    loss, saved = saved_bytes(model, input_ids=ids, labels=ids, use_cache=False)
    loss.backward()
    model.zero_grad(set_to_none=True)
    times, losses = common.timed_steps(step, batches, args.warmup)
    return {
        "rank": 0,
        "step_s": sum(times) / len(times),
        "peak_mb": peak.bytes() / 2**20,
        "saved_mb": saved / 2**20,
        "last_loss": losses[-1],
    }


def main() -> None:
    p = common.parser(__doc__, steps=3, warmup=1, batch=1, seq=1024, repeats=1)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="recompute modes to compare")
    args = p.parse_args()
    path, desc = common.resolve_model(args)
    records = common.alternate(
        "bench_recompute:worker",
        args.modes,
        args.repeats,
        lambda m: 1,
        lambda m: argparse.Namespace(**vars(args), mode=m, path=str(path)),
    )
    bests = common.best(records)
    base = bests[args.modes[0]][0]
    rows = [
        [m, f"{r['step_s']:.2f}", f"{r['step_s'] / base['step_s']:.2f}x", f"{r['saved_mb']:.0f}",
         f"{r['saved_mb'] / base['saved_mb']:.2f}x", f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / base['peak_mb']:.2f}x",
         f"{r['last_loss']:.4f}"]
        for m in args.modes for r in bests[m]
    ]  # fmt: skip
    body = "\n".join([
        f"{desc}, tp 1, batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after {args.warmup} warmup, "
        f"AdamW, fp32, CPU; best of {args.repeats} alternating launches; ratios to --recompute {args.modes[0]}",
        "",
        common.table(["recompute", "step s", "x", "saved for backward MB", "x", "peak RSS MB", "x", "last loss"], rows),
    ])  # fmt: skip
    common.write_results("bench_recompute", args, desc, body)


if __name__ == "__main__":
    main()
