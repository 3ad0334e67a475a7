#!/usr/bin/env python
"""LoRA (r 16) against full fine-tuning: step time and peak memory per rank, the same converted model and tp.

    python benchmarks/bench_lora.py [--tp 2] [--steps 10] [--batch 4] [--seq 256] [--r 16]

Both load the tiny DeepSeek-V2-Lite-shaped checkpoint with ``load_pretrained`` at the same tp, in fresh torchrun
ranks (``npu_parallel.tools.launch``), and train with AdamW on the same batches: full fine-tuning on every
parameter, LoRA on the adapters of the attention projections and the routed experts (``apply_lora``). Peak
memory is the process' RSS above its start (CPU) or the device's peak allocation; it prints the table and the
ratios. Warmup steps are excluded from the timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: mean step time, tokens/s, peak memory, trainable parameters, first and last loss."""
    sys.path.insert(0, str(HERE))
    import torch
    import torch.distributed as dist
    from memory import peak_bytes, reset_peak

    import npu_parallel

    torch.set_num_threads(1)
    state = npu_parallel.init_distributed(args.tp)
    on_device = state.device.type not in ("cpu", "meta")
    accel = getattr(torch, state.device.type, None) if on_device else None
    base = reset_peak()
    if accel is not None:
        accel.reset_peak_memory_stats()
    model = npu_parallel.load_pretrained(args.model, state, dtype=torch.float32, progress=False)
    if args.impl == "lora":
        from peft import LoraConfig

        torch.manual_seed(0)
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, target_parameters=EXPERTS)
        npu_parallel.apply_lora(model, state, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
        for _ in range(args.warmup + args.steps)
    ]
    times, losses = [], []
    for i, ids in enumerate(batches):
        ids = ids.to(state.device)
        dist.barrier()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss_value)
    peak = accel.max_memory_allocated() if accel is not None else peak_bytes() - base
    # model state held between steps, counted from the live tensors: weights, gradients (kept until zero_grad:
    # counted as at the step), AdamW's two moments
    tensors = {id(p): p for p in model.parameters()}
    tensors.update({id(t): t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()})
    states = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(p.numel() * 4 for p in params)
    return {
        "impl": args.impl,
        "repeat": args.repeat,
        "rank": state.rank,
        "step_s": sum(times) / len(times),
        "tokens_per_s": args.batch * args.seq / (sum(times) / len(times)),
        "peak_mb": peak / 2**20,
        "memory": "device" if accel is not None else "RSS",
        "states_mb": states / 2**20,
        "trainable": sum(p.numel() for p in params),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def launch(impl: str, args, model: Path, out: Path) -> None:
    """``worker`` on ``args.tp`` ranks; their records appended to ``out``."""
    from npu_parallel.tools.launch import launch as launch_ranks

    worker_args = argparse.Namespace(
        impl=impl,
        model=str(model),
        tp=args.tp,
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        seq=args.seq,
        r=args.r,
        repeat=args.repeat,
    )
    records = launch_ranks("bench_lora:worker", args.tp, worker_args, env={"OMP_NUM_THREADS": "1"})
    with open(out, "a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--repeats", type=int, default=3, help="alternating launches per mode; best kept")
    p.add_argument("--workdir", default=None, help="where the tiny checkpoint is built (default: a temp dir)")
    args = p.parse_args()

    from npu_parallel.tools.tiny import build_tiny_deepseek_v2_lite

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_lora_"))
    model = build_tiny_deepseek_v2_lite(work / "tiny-deepseek-v2-lite")
    out = work / "records.jsonl"
    out.unlink(missing_ok=True)
    modes = ("lora", "full")
    for repeat in range(args.repeats):  # alternate, so background load hits both alike
        args.repeat = repeat
        for impl in modes:
            launch(impl, args, model, out)
    everything = [json.loads(x) for x in out.read_text().splitlines()]
    best = {}
    for impl in modes:  # the repeat whose slowest rank was fastest
        runs: dict[int, list] = {}
        for r in everything:
            if r["impl"] == impl:
                runs.setdefault(r["repeat"], []).append(r)
        best[impl] = max(runs.values(), key=lambda rs: min(r["tokens_per_s"] for r in rs))
    memory = best["lora"][0]["memory"]
    print(
        f"tiny DeepSeek-V2-Lite-shaped model, tp={args.tp}, batch {args.batch} x {args.seq} tokens, {args.steps} "
        f"timed steps after {args.warmup} warmup, AdamW, fp32; LoRA r={args.r} on {'/'.join(TARGETS)} and the "
        f"routed experts; best of {args.repeats} alternating launches; peak memory: {memory}"
    )
    print(
        f"{'mode':<6}{'rank':>5}{'trainable':>11}{'tokens/s':>10}{'step s':>9}{'peak MB':>9}{'states MB':>10}"
        f"{'loss first->last':>20}"
    )
    for r in sorted(best["lora"] + best["full"], key=lambda r: (r["impl"], r["rank"])):
        print(
            f"{r['impl']:<6}{r['rank']:>5}{r['trainable']:>11}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.3f}"
            f"{r['peak_mb']:>9.0f}{r['states_mb']:>10.1f}{r['first_loss']:>10.4f}->{r['last_loss']:.4f}"
        )
    lora, full = best["lora"], best["full"]
    step = max(r["step_s"] for r in lora) / max(r["step_s"] for r in full)
    mem = max(r["peak_mb"] for r in lora) / max(r["peak_mb"] for r in full)
    share = lora[0]["trainable"] / full[0]["trainable"]
    states = max(r["states_mb"] for r in lora) / max(r["states_mb"] for r in full)
    print(f"ratio step time LoRA / full = {step:.2f}x")
    print(f"ratio peak memory LoRA / full = {mem:.2f}x")
    print(f"ratio model states (weights, gradients, AdamW moments) LoRA / full = {states:.2f}x")
    print(f"ratio trainable parameters LoRA / full = {share:.3f}")


if __name__ == "__main__":
    main()
