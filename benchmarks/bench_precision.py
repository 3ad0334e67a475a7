#!/usr/bin/env python
"""Step time, peak memory and bytes per parameter of bf16 mixed precision vs pure bf16 vs fp32 under data_parallel.

    python benchmarks/bench_precision.py [--model tiny|slice|PATH] [--steps 6] [--batch 2] [--seq 128] [--repeats 2]

Each precision trains the same checkpoint at tp 2 x dp 1 and at tp 1 x dp 2 (``--layouts``) on CPU (gloo), in
fresh ranks started by ``npu_parallel.tools.launch``: the model loaded in the master dtype,
``npu_parallel.data_parallel`` (FSDP2), AdamW, clipping by the global norm, the same random batches. Launches
alternate between precisions and the best repeat is kept. Printed per layout: mean step time, peak RSS above the
loaded baseline, the ratios to pure bf16, and the bytes per parameter each rank holds between steps (weights,
gradients, fp32 master, AdamW moments), measured from the live tensors. Writes benchmarks/results/bench_precision.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

PRECISIONS = ("bf16", "bf16-pure", "fp32")


def _nbytes(tensors) -> int:
    from npu_parallel.parallel.data_parallel import local_tensor

    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: mean step time, peak RSS above the loaded model, bytes per parameter held."""

    from npu_parallel.parallel.data_parallel import local_tensor
    from npu_parallel.training.optim import clip_grad_norm_

    state, model, opt, mode = common.training_model(args)
    batches = common.random_batches(
        model.config.vocab_size, args.batch, args.seq, args.warmup + args.steps, seed=state.dp_rank
    )
    peak = common.Peak(state.device)
    held: dict = {}

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        clip_grad_norm_(model, 1.0, state)
        opt.step()
        # what a rank holds between steps, gradients included (the last step's reading is kept)
        params = list({id(p): p for p in model.parameters()}.values())
        numel = sum(local_tensor(p).numel() for p in params)
        moments = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
        held.update(
            weights=_nbytes(params) / numel,
            grads=_nbytes([p.grad for p in params if p.grad is not None]) / numel,
            moments=_nbytes(moments) / numel,
        )
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = common.timed_steps(step, batches, args.warmup)
    return {
        "precision": mode.name,
        "tp": state.tp_size,
        "dp": state.dp_size,
        "rank": state.rank,
        "step_s": sum(times) / len(times),
        "peak_mb": peak.bytes() / 2**20,
        "bytes_per_param": held,
        "master": mode.mixed,
        "last_loss": losses[-1],
    }


def report(records: list[dict], layouts) -> str:
    lines = []
    for tp, dp in layouts:
        best = {}
        for p in PRECISIONS:
            mine = [r for r in records if (r["tp"], r["dp"], r["precision"]) == (tp, dp, p)]
            if not mine:
                continue
            repeats = {r["repeat"] for r in mine}
            # a launch's step time is its slowest rank's; the best launch is kept; memory: the largest rank
            step = min(max(r["step_s"] for r in mine if r["repeat"] == k) for k in repeats)
            peak = max(r["peak_mb"] for r in mine)
            best[p] = (step, peak, mine[0]["bytes_per_param"], mine[0]["master"])
        lines.append(f"tp={tp} dp={dp}")
        lines.append(
            "precision   step s   x pure   peak MB   x pure   bytes/param: weights  grads  master  moments  held"
        )
        ref = best.get("bf16-pure") or next(iter(best.values()))
        pure_step, pure_peak = ref[0], max(ref[1], 1e-9)
        for p, (step, peak, held, master) in best.items():
            # held: what a rank keeps between steps (the sharded parameters, gradients, moments); under mixed
            # precision the sharded parameters are the fp32 master and the bf16 weights exist per unit, transiently
            total = held["weights"] + held["grads"] + held["moments"]
            weights = "2 (per unit)" if master else f"{held['weights']:.1f}"
            master_b = f"{held['weights']:.1f}" if master else "-"
            lines.append(
                f"{p:<10}  {step:6.3f}   {step / pure_step:5.2f}x  {peak:7.0f}   {peak / pure_peak:5.2f}x"
                f"   {weights:>20}  {held['grads']:5.1f}  {master_b:>6}  {held['moments']:7.1f}  {total:4.1f}"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = common.parser(__doc__, steps=6, batch=2, seq=128, repeats=2)
    p.add_argument("--layouts", nargs="+", default=["2x1", "1x2"], help="tp x dp layouts (default: 2x1 1x2)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    args = p.parse_args()
    path, desc = common.resolve_model(args)
    layouts = [tuple(int(x) for x in lay.split("x")) for lay in args.layouts]
    modes = [f"{tp}x{dp}:{prec}" for tp, dp in layouts for prec in args.precisions]

    def make(mode: str) -> argparse.Namespace:
        tp, prec = int(mode.split("x")[0]), mode.split(":")[1]
        return argparse.Namespace(**vars(args), path=str(path), tp=tp, precision=prec)

    def world(mode: str) -> int:
        tp, dp = mode.split(":")[0].split("x")
        return int(tp) * int(dp)

    records = common.alternate("bench_precision:worker", modes, args.repeats, world, make)
    records = [{**r, "repeat": r["repeat"]} for r in records]
    body = (
        f"{desc}, batch {args.batch}x{args.seq} per dp rank, {args.steps} timed steps after {args.warmup} warmup, "
        f"CPU gloo; best of {args.repeats} alternating launches\n\n```\n{report(records, layouts)}```"
    )
    common.write_results("bench_precision", args, desc, body)


if __name__ == "__main__":
    main()
