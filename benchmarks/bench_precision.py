#!/usr/bin/env python
"""Step time, peak memory and bytes per parameter of bf16 mixed precision vs pure bf16 vs fp32 under data_parallel.

    python benchmarks/bench_precision.py [--steps 6] [--batch 2] [--seq 128] [--repeats 2]

Each precision trains the same tiny DeepSeek-V2-Lite-shaped checkpoint (``npu_parallel.tools.tiny``) at tp 2 x
dp 1 and at tp 1 x dp 2 on CPU (gloo), in fresh ranks started by ``npu_parallel.tools.launch``: the model loaded
in the master dtype, ``npu_parallel.data_parallel`` (FSDP2), AdamW, clipping by the global norm, the same random
batches. Launches alternate between precisions and the best repeat is kept. Printed per layout: mean step time,
peak RSS above the loaded baseline, the ratios to pure bf16, and the bytes per parameter each rank holds between
steps (weights, gradients, fp32 master, AdamW moments), measured from the live tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRECISIONS = ("bf16", "bf16-pure", "fp32")
LAYOUTS = ((2, 1), (1, 2))  # (tp, dp)


def _nbytes(tensors) -> int:
    from npu_parallel.parallel.data_parallel import local_tensor

    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: mean step time, peak RSS above the loaded model, bytes per parameter held."""
    sys.path.insert(0, str(HERE))
    import torch
    import torch.distributed as dist
    from memory import peak_bytes, reset_peak

    import npu_parallel
    from npu_parallel.parallel.data_parallel import local_tensor, resolve_precision
    from npu_parallel.training.optim import build_optimizer, clip_grad_norm_

    torch.set_num_threads(1)
    state = npu_parallel.init_distributed(args.tp)
    mode = resolve_precision(args.precision, state.device.type)
    model = npu_parallel.load_pretrained(args.model, state, dtype=mode.master, progress=False).train()
    npu_parallel.data_parallel(model, state, precision=mode)
    opt = build_optimizer(model, 1e-5)
    g = torch.Generator().manual_seed(state.dp_rank)
    batches = [
        torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
        for _ in range(args.warmup + args.steps)
    ]
    base = reset_peak()
    times = []
    for i, ids in enumerate(batches):
        dist.barrier()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        clip_grad_norm_(model, 1.0, state)
        opt.step()
        if i == len(batches) - 1:  # what a rank holds between steps, gradients included
            params = list({id(p): p for p in model.parameters()}.values())
            numel = sum(local_tensor(p).numel() for p in params)
            moments = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
            held = {
                "weights": _nbytes(params) / numel,
                "grads": _nbytes([p.grad for p in params if p.grad is not None]) / numel,
                "moments": _nbytes(moments) / numel,
            }
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {
        "precision": mode.name,
        "tp": state.tp_size,
        "dp": state.dp_size,
        "rank": state.rank,
        "repeat": args.repeat,
        "step_s": sum(times) / len(times),
        "peak_mb": (peak_bytes() - base) / 2**20,
        "bytes_per_param": held,
        "master": mode.mixed,
        "last_loss": loss_value,
    }


def launch(args, model: Path, tp: int, dp: int, precision: str) -> list[dict]:
    from npu_parallel.tools.launch import launch as launch_ranks

    worker_args = argparse.Namespace(
        model=str(model),
        tp=tp,
        precision=precision,
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        seq=args.seq,
        repeat=args.repeat,
    )
    return launch_ranks("bench_precision:worker", tp * dp, worker_args, env={"OMP_NUM_THREADS": "1"})


def report(records: list[dict]) -> str:
    lines = []
    for tp, dp in LAYOUTS:
        best = {}
        for p in PRECISIONS:
            mine = [r for r in records if (r["tp"], r["dp"], r["precision"]) == (tp, dp, p)]
            repeats = {r["repeat"] for r in mine}
            # a launch's step time is its slowest rank's; the best launch is kept; memory: the largest rank
            step = min(max(r["step_s"] for r in mine if r["repeat"] == k) for k in repeats)
            peak = max(r["peak_mb"] for r in mine)
            best[p] = (step, peak, mine[0]["bytes_per_param"], mine[0]["master"])
        lines.append(f"tp={tp} dp={dp}")
        lines.append(
            "precision   step s   x pure   peak MB   x pure   bytes/param: weights  grads  master  moments  held"
        )
        pure_step, pure_peak = best["bf16-pure"][0], max(best["bf16-pure"][1], 1e-9)
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="alternating launches per precision; best kept")
    p.add_argument("--workdir", default=None, help="where the tiny checkpoint is built (default: a temp dir)")
    args = p.parse_args()

    from npu_parallel.tools.tiny import build_tiny_deepseek_v2_lite

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_precision_"))
    model = build_tiny_deepseek_v2_lite(work / "tiny-deepseek-v2-lite")
    records: list[dict] = []
    for repeat in range(args.repeats):  # alternate, so background load hits every precision alike
        args.repeat = repeat
        for tp, dp in LAYOUTS:
            for precision in PRECISIONS:
                records += launch(args, model, tp, dp, precision)
    (work / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"tiny DeepSeek-V2-Lite shape, batch {args.batch}x{args.seq} per dp rank, {args.steps} timed steps, CPU gloo")
    print(report(records))


if __name__ == "__main__":
    main()
