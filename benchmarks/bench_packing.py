#!/usr/bin/env python
"""Packed against padded SFT micro-batches: real tokens/s, padding fraction, rows and peak memory, same examples.

    python benchmarks/bench_packing.py [--model tiny|slice|PATH] [--steps 2] [--batch 2] [--seq 1024] [--precision fp32]

The data is chat-like and seeded: example lengths drawn from a lognormal (median ``--median_tokens``, spread
``--sigma``, clipped to ``--seq``), random token ids, the first 10-60 % of each example a prompt (labels -100) and
the rest a supervised response, built as ``training.labels.Encoded``. The examples are as many as best-fit packs
into ``steps x batch x grad_accum`` rows of ``--seq`` tokens, and both modes train exactly those, served as
training serves them: a ``training.dataset.Prepared`` read by a ``DataStream`` with ``packing`` on (best-fit
rows, ``--steps`` steps) or off (one example per row, each micro-batch padded to its longest row, as many steps as
the examples need; a last step's free rows take the stream's next rows, as in training), ``--batch`` rows per
micro-batch, ``--grad_accum`` micro-batches per step. Each step is the trainer's: the micro-batches made,
``train_step`` (forward and backward, the loss over the step's supervised targets), clipping, AdamW (or plain SGD,
``--optimizer sgd``, which holds no state), on a model
loaded by ``load_pretrained`` and wrapped by ``data_parallel`` at ``--precision``. Tokens/s count real tokens
(prompt and response, never padding). Both modes run in fresh ranks, alternating; each mode's best launch is kept.
Peak memory is above the loaded model (RSS on CPU, the device's peak allocation on one). Writes
benchmarks/results/bench_packing.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

MODES = ("packed", "padded")
HEADER = [
    "mode", "steps", "micro-batches", "rows", "examples", "real tokens", "padded tokens", "padding", "real tokens/s",
    "step s", "fwd+bwd s", "peak MB", "loss first -> last",
]  # fmt: skip


def chat_lengths(args: argparse.Namespace, n: int) -> list[int]:
    """The first ``n`` example lengths of the seeded stream: lognormal, clipped to 8..--seq tokens."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.empty(n).log_normal_(math.log(args.median_tokens), args.sigma, generator=g)
    return lengths.round().clamp(8, args.seq).long().tolist()


def chat_examples(args: argparse.Namespace, vocab: int) -> list:
    """The run's examples (``training.labels.Encoded``): as many of the stream's first examples as best-fit packs
    into the packed run's ``steps x batch x grad_accum`` rows, each a prompt (labels -100) then a response."""
    import torch

    from npu_parallel.training.batch import IGNORE_INDEX
    from npu_parallel.training.labels import Encoded
    from npu_parallel.training.packing import best_fit

    capacity = args.steps * args.batch * args.grad_accum  # rows of the packed run
    lengths = chat_lengths(args, capacity * args.seq // 8 + 1)  # more than fit: 8 tokens at least each
    n = capacity
    while n < len(lengths) and len(best_fit(lengths[: n + 1], args.seq)) <= capacity:
        n += 1
    g = torch.Generator().manual_seed(args.seed + 1)
    docs = []
    for length in lengths[:n]:
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()  # 0 is the pad id
        share = float(torch.rand((), generator=g)) * 0.5 + 0.1  # the prompt's share of the example
        cut = min(max(1, round(share * length)), length - 2)  # at least one prompt token and two response tokens
        docs.append(Encoded(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return docs


def stream(args: argparse.Namespace, docs: list, packing: bool):
    """(the training ``DataStream`` over ``docs`` at dp 1, the steps that train each of them once)."""
    from npu_parallel.training.dataset import DataStats, DataStream, Prepared

    n = len(docs)
    prepared = Prepared(docs, [0] * n, [1.0], list(range(n)), [], DataStats(examples=n), pad_id=0)
    data = DataStream(
        prepared,
        packing=packing,
        max_length=args.seq,
        batch_size=args.batch,
        grad_accum=args.grad_accum,
        dp_size=1,
        dp_rank=0,
        seed=args.seed,
    )
    return data, args.steps if packing else math.ceil(n / data.global_rows)


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: the timed steps' seconds (whole step, forward+backward), what their micro-batches held,
    peak memory, first and last loss."""
    import time

    import torch

    from npu_parallel.training.optim import clip_grad_norm_
    from npu_parallel.training.packing import padding_fraction
    from npu_parallel.training.step import train_step

    state, model, opt, _ = common.training_model(args)
    if args.optimizer == "sgd":  # no optimizer state: what a machine short of memory can hold (--model slice on CPU)
        opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    docs = chat_examples(args, model.config.vocab_size)
    data, steps = stream(args, docs, args.mode == "packed")

    def step(s: int) -> dict:
        data.position = s * args.grad_accum  # the warmup steps are the first steps, trained again when timed
        batches = [b.to(state.device) for b in data.next_step()]
        t0 = time.perf_counter()
        loss = train_step(model, batches, state).reduce(state)[0]  # the host read waits for the device
        fwd_bwd = time.perf_counter() - t0
        clip_grad_norm_(model, 1.0, state)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows = [[sum(r) for r in b.lengths] for b in batches]  # real tokens of each row (padding excluded)
        return {
            "loss": loss,
            "fwd_bwd": fwd_bwd,
            "rows": rows,
            "examples": sum(len(r) for b in batches for r in b.lengths),
            "padded": sum(b.tokens for b in batches),
        }

    peak = common.Peak(state.device)  # above the loaded model: gradients, AdamW moments and activations
    times, values = common.timed_steps(step, [*range(args.warmup), *range(steps)], args.warmup)
    micro = [rows for v in values for rows in v["rows"]]
    real = sum(sum(rows) for rows in micro)
    return {
        "rank": state.rank,
        "seconds": sum(times),
        "steps": steps,
        "micro_batches": len(micro),
        "rows": sum(len(rows) for rows in micro),
        "examples": sum(v["examples"] for v in values),
        "real_tokens": real,
        "padded_tokens": sum(v["padded"] for v in values),
        "padding_fraction": padding_fraction(micro),
        "tokens_per_s": real / sum(times),
        "fwd_bwd_tokens_per_s": real / sum(v["fwd_bwd"] for v in values),
        "step_s": sum(times) / len(times),
        "fwd_bwd_s": sum(v["fwd_bwd"] for v in values) / len(values),
        "peak_mb": peak.bytes() / 2**20,
        "memory": peak.kind,
        "data": lengths_line(docs, args.seq),
        "first_loss": values[0]["loss"],
        "last_loss": values[-1]["loss"],
    }


def lengths_line(docs: list, seq: int) -> str:
    """The length distribution in one line: median, mean, p90, p99, max, how many were clipped."""
    lengths = sorted(len(d.ids) for d in docs)
    n = len(lengths)
    at = lambda q: lengths[min(n - 1, int(q * n))]
    clipped = sum(1 for x in lengths if x == seq)
    return (
        f"{n} examples, tokens median {at(0.5)}, mean {sum(lengths) / n:.0f}, p90 {at(0.9)}, p99 {at(0.99)}, "
        f"max {lengths[-1]} ({clipped} clipped to {seq})"
    )


def main() -> None:
    p = common.parser(__doc__, steps=2, warmup=1, batch=2, seq=1024, repeats=2)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (the world; default 1)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="fp32 or bf16 mixed (FSDP2)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="adamw (the trainer's) or sgd")
    p.add_argument("--median_tokens", type=int, default=180, help="median example length (default 180)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal spread of the lengths (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and the stream's shuffle")
    args = p.parse_args()
    desc, records = common.launch_modes("bench_packing:worker", args, MODES)
    bests = common.best(records, key="seconds")
    rows = [
        [m, r["steps"], r["micro_batches"], r["rows"], r["examples"], r["real_tokens"], r["padded_tokens"],
         f"{100 * r['padding_fraction']:.1f}%", f"{r['tokens_per_s']:.1f}", f"{r['step_s']:.2f}",
         f"{r['fwd_bwd_s']:.2f}", f"{r['peak_mb']:.0f}", f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"]
        for m in MODES for r in bests[m] if r["rank"] == 0
    ]  # fmt: skip

    def seconds(mode: str) -> str:
        return " ".join(f"{x:.1f}" for x in common.spread(records, mode, "seconds"))

    speed = common.ratio(bests, "tokens_per_s", "packed", "padded", min)  # a launch runs at its slowest rank's rate
    fwd_bwd = common.ratio(bests, "fwd_bwd_tokens_per_s", "packed", "padded", min)
    mem = common.ratio(bests, "peak_mb", "packed", "padded")
    intro = [
        f"{desc}, tp={args.tp}, {args.precision}, rows of --seq {args.seq} tokens, {args.batch} rows per micro-batch, "
        f"grad_accum {args.grad_accum}, {args.warmup} warmup step(s) untimed, {args.optimizer}; best of {args.repeats} "
        f"alternating launches (timed seconds per launch: packed {seconds('packed')}, padded {seconds('padded')}); "
        f"peak memory: {bests['packed'][0]['memory']} above the loaded model",
        f"data: lognormal lengths (median {args.median_tokens}, sigma {args.sigma}, seed {args.seed}): "
        f"{bests['packed'][0]['data']}",
    ]  # fmt: skip
    ratios = [
        common.ratio_line("real tokens/s packed / padded", speed, (">=", 1.0)),
        common.ratio_line("real tokens/s packed / padded, forward+backward only", fwd_bwd),
        common.ratio_line("peak memory packed / padded", mem),
    ]
    common.write_report("bench_packing", args, desc, intro, HEADER, rows, ratios)


if __name__ == "__main__":
    main()
