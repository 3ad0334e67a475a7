#!/usr/bin/env python
"""Pipeline parallelism: step time and the measured bubble fraction at pp 2 against (p-1)/(m+p-1), for several
micro-batch counts m, and the pp 1 step on the same global batch, in one run.

    python benchmarks/bench_pipeline.py [--model tiny|slice|PATH] [--micro 2 4 8] [--schedule 1f1b] [--batch 1]
        [--seq 256] [--steps 3] [--warmup 1]

A step is the forward and backward of m micro-batches of ``--batch`` x ``--seq`` random tokens (no optimizer
step): ``pipeline_step`` at tp 1, pp ``--pp`` (default 2, one stage per rank, or ``--virtual`` per rank for the
interleaved schedules), and ``train_step`` on one rank (pp 1) over the same micro-batches, fp32, CPU gloo, in
fresh torchrun ranks, the two alternating over ``--repeats`` launches (each one's best launch kept). Each pp rank
counts as busy the seconds spent inside its stages' compute calls of the schedule (``PipelineStage``'s
``forward_one_chunk``, ``backward_one_chunk`` and ``backward_weight_one_chunk``); everything else in the step is
idle: waiting on P2P receives (the bubble), gloo's sends, the loss count and broadcast. Per rank the measured
bubble is 1 - busy / step time; the pipeline's is their mean. Writes benchmarks/results/bench_pipeline.md.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

# the stage's compute calls in every torch.distributed.pipelining schedule (receives and sends happen outside them)
COMPUTE = {"forward_one_chunk": "fwd", "backward_one_chunk": "bwd", "backward_weight_one_chunk": "bwd"}
TARGET_POINTS = 0.10  # measured bubble within 10 points of the theory


class _Busy:
    """Seconds this rank spends inside its pipeline stages' compute calls, forward and backward."""

    def __init__(self) -> None:
        from torch.distributed.pipelining import PipelineStage

        self.reset()
        for name, kind in COMPUTE.items():
            setattr(PipelineStage, name, self._timed(getattr(PipelineStage, name), kind))

    def reset(self) -> None:
        self.seconds = {"fwd": 0.0, "bwd": 0.0}

    def _timed(self, call, kind: str):
        @functools.wraps(call)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[kind] += time.perf_counter() - t0

        return timed


def theory(pp: int, micro: int, per_rank: int) -> float:
    """The idle fraction of a pipeline of equal stages: (p-1) / (v m + p - 1), v stages per rank."""
    return (pp - 1) / (per_rank * micro + pp - 1)


def _drop_other_stages(model, params: list) -> None:
    """Free the weights no stage of this rank runs: every pp rank loads the whole model (memory, not time)."""
    import torch

    mine = {id(p) for p in params}
    for p in model.parameters():
        if id(p) not in mine:
            p.data = torch.empty(0, dtype=p.dtype)


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: per micro-batch count, mean step time, busy seconds (forward, backward), first loss."""
    import torch

    import npu_parallel
    from npu_parallel.training.batch import Batch
    from npu_parallel.training.pipeline import build_pipeline, pipeline_step
    from npu_parallel.training.step import train_step

    torch.set_num_threads(1)
    pp = 1 if args.mode == "pp1" else args.pp
    state = npu_parallel.init_distributed(1, pp_size=pp)
    model = npu_parallel.load_pretrained(args.path, state, dtype=torch.float32, progress=False).train()
    busy = _Busy()
    if pp > 1:
        pipe = build_pipeline(model, state, schedule=args.schedule, virtual=args.virtual, pp_layers=args.pp_layers)
        _drop_other_stages(model, pipe.parameters())

        def run(batches):
            return pipeline_step(pipe, batches, state)

    else:

        def run(batches):
            return train_step(model, batches, state)

    def step(batches):
        busy.reset()
        loss = run(batches)
        model.zero_grad(set_to_none=True)
        return dict(busy.seconds), loss.loss.item()

    runs = {}
    for m in args.micro:
        ids = common.random_batches(model.config.vocab_size, args.batch, args.seq, m * (args.warmup + args.steps), m)
        steps = [[Batch.from_windows(x) for x in ids[i * m : (i + 1) * m]] for i in range(args.warmup + args.steps)]
        times, values = common.timed_steps(step, steps, args.warmup)
        runs[m] = {
            "step_s": sum(times) / len(times),
            "wall_s": sum(times),
            "fwd_s": sum(v[0]["fwd"] for v in values),
            "bwd_s": sum(v[0]["bwd"] for v in values),
            "loss": values[0][1],
        }
    return {"rank": state.rank, "step_s": sum(r["step_s"] for r in runs.values()), "runs": runs}


def _rows(args: argparse.Namespace, pp1: list[dict], pp2: list[dict], per_rank: int) -> tuple[list[list], list[bool]]:
    rows, passed = [], []
    for m in args.micro:
        base = pp1[0]["runs"][m]
        ranks = [r["runs"][m] for r in sorted(pp2, key=lambda r: r["rank"])]
        step = max(r["step_s"] for r in ranks)
        # per rank: busy over its own wall time; per micro-batch: its stages' forward + backward
        bubbles = [1 - (r["fwd_s"] + r["bwd_s"]) / r["wall_s"] for r in ranks]
        per_micro = [(r["fwd_s"] + r["bwd_s"]) / (args.steps * m) for r in ranks]
        measured = sum(bubbles) / len(bubbles)
        ideal = theory(args.pp, m, per_rank)
        passed.append(abs(measured - ideal) <= TARGET_POINTS)
        rows.append([
            m, f"{base['step_s']:.3f}", f"{step:.3f}", f"{step / base['step_s']:.2f}x",
            f"{(per_rank * m + args.pp - 1) / (per_rank * m * args.pp):.2f}x",
            " / ".join(f"{t:.3f}" for t in per_micro), " / ".join(f"{b:.3f}" for b in bubbles),
            f"{measured:.3f}", f"{ideal:.3f}", f"{measured / ideal:.2f}x",
            f"{base['loss']:.4f} / {ranks[0]['loss']:.4f}",
            "PASS" if passed[-1] else "MISS",
        ])  # fmt: skip
    return rows, passed


def main(argv=None) -> int:
    from npu_parallel.training.errors import ConfigError
    from npu_parallel.training.pipeline import SCHEDULES, available_schedules, check_schedule, stages_per_rank

    p = common.parser(__doc__, steps=3, warmup=1, batch=1, seq=256, repeats=1)
    p.set_defaults(slice_layers=4)  # two decoder layers per stage at pp 2
    p.add_argument("--micro", type=int, nargs="+", default=[2, 4, 8], help="micro-batches per step (default 2 4 8)")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages = ranks (default 2; tp 1)")
    p.add_argument("--schedule", default="1f1b", choices=available_schedules(), help="pipeline schedule")
    p.add_argument("--virtual", type=int, default=None, help="stages per rank of interleaved schedules (default 2)")
    p.add_argument("--pp_layers", default=None, help="decoder layers per stage, e.g. 2,2 (default: cost-balanced)")
    args = p.parse_args(argv)
    if args.virtual is None:
        args.virtual = 2 if SCHEDULES[args.schedule][1] is None else 1
    for m in args.micro:
        try:
            check_schedule(args.schedule, args.pp, m, args.virtual)
        except ConfigError as exc:  # the trainer's flags: --grad_accum is --micro here, --pp_schedule --schedule
            p.error(
                f"--micro {m} --schedule {args.schedule}: {exc} (here --grad_accum is --micro, --pp_schedule "
                "is --schedule, --pp_virtual is --virtual)"
            )
    per_rank = stages_per_rank(args.schedule, args.virtual)
    path, desc = common.resolve_model(args)
    records = common.alternate(
        "bench_pipeline:worker",
        ("pp1", "pp2"),
        args.repeats,
        lambda mode: 1 if mode == "pp1" else args.pp,
        lambda mode: argparse.Namespace(**vars(args), mode=mode, path=str(path)),
    )
    bests = common.best(records)
    rows, passed = _rows(args, bests["pp1"], bests["pp2"], per_rank)
    header = [
        "m", "pp1 step s", f"pp{args.pp} step s", f"pp{args.pp}/pp1", "ideal", "busy s/micro-batch per rank",
        "bubble per rank", "bubble measured", "theory", "measured/theory", "loss pp1 / pp2", "within 10 pts",
    ]  # fmt: skip
    stages = f"{per_rank} stages per rank, " if per_rank > 1 else ""
    body = "\n".join([
        f"{desc}, pp {args.pp} (tp 1, {stages}schedule {args.schedule}) against pp 1, micro-batches of "
        f"{args.batch} x {args.seq} tokens, forward + backward only, {args.steps} timed steps (mean) after "
        f"{args.warmup} warmup, fp32, CPU gloo; best of {args.repeats} alternating launches (slowest-rank sum of "
        f"step s per launch: pp1 {common.spread(records, 'pp1')}, pp{args.pp} {common.spread(records, 'pp2')})",
        "",
        common.table(header, rows),
        "",
        f"ideal = (v m + p - 1) / (v m p): pp{args.pp}/pp1 with equal stages and free P2P; theory = "
        f"(p - 1) / (v m + p - 1), v = {per_rank}; bubble measured = mean over ranks of 1 - busy / step time",
        f"bubble measured within {TARGET_POINTS * 100:.0f} points of theory for every m: "
        f"{'PASS' if all(passed) else 'MISS'}",
    ])  # fmt: skip
    common.write_results("bench_pipeline", args, desc, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
