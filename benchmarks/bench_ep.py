#!/usr/bin/env python
"""Expert parallelism at world 4: the all-to-all layout (ep > tp) against today's EP-over-TP (ep = tp) and against
transformers' ``DistributedConfig(tp_size, ep_size, fsdp_size)``, in one run.

    python benchmarks/bench_ep.py [--model tiny|slice|PATH] [--steps 5] [--batch 2] [--seq 128]
        [--overlap on|off|both] [--only TP:EP ...] [--optimizer adamw|sgd]

``--overlap``: the all-to-all layouts with the shared experts overlapped with the token traffic (on, the
default), without (off), or both, alternating launches, with a "vs overlap off" ratio. ``--only 1:4`` keeps the
layouts of that tp and ep. ``--optimizer sgd``: plain SGD, no optimizer state (memory-tight runs of the slice).

Every layout trains the same checkpoint (fp32, CPU, gloo) for warmup + steps
forward/backward/AdamW steps, each dp rank on its own batch, in fresh torchrun ranks. Per layout: step time,
bytes one rank sends per MoE layer in a forward (the all-to-all and the MoE block's all-reduce, counted at the
collective calls), host syncs per step (the op audit, forward and backward), peak RSS per rank. Writes
benchmarks/results/bench_ep.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

# (label, tp, ep, implementation): today's EP-over-TP at tp 4 and at tp 2 (dp 2); the all-to-all at ep 4
LAYOUTS = [
    ("ep=tp=4 (today)", 4, 4, "ours"),
    ("tp=2 ep=2 dp=2 (today)", 2, 2, "ours"),
    ("tp=2 ep=4 dp=2 alltoall", 2, 4, "ours"),
    ("tp=1 ep=4 dp=4 alltoall", 1, 4, "ours"),
    ("transformers tp=2 ep=4", 2, 4, "hf"),
]


def _pairs() -> list[str]:
    return sorted({f"{tp}:{ep}" for _, tp, ep, _ in LAYOUTS})


class _Bytes:
    """Counts the bytes this rank sends through all_to_all_single and all_reduce (ring: 2 (n-1)/n of the buffer)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.sent = dist, {"all_to_all": 0, "all_reduce": 0}
        self._a2a, self._ar = dist.all_to_all_single, dist.all_reduce
        dist.all_to_all_single, dist.all_reduce = self.all_to_all_single, self.all_reduce

    def all_to_all_single(self, out, x, out_splits=None, in_splits=None, group=None, **kw):
        n, me = self.dist.get_world_size(group), self.dist.get_rank(group)
        row = x[0].numel() * x.element_size() if x.dim() and x.shape[0] else 0
        splits = in_splits or [x.shape[0] // n] * n
        self.sent["all_to_all"] += row * (sum(splits) - splits[me])
        return self._a2a(out, x, out_splits, in_splits, group=group, **kw)

    def all_reduce(self, x, *args, group=None, **kw):
        n = self.dist.get_world_size(group)
        self.sent["all_reduce"] += int(x.numel() * x.element_size() * 2 * (n - 1) / n)
        return self._ar(x, *args, group=group, **kw)


def _load_hf(path: str, tp: int, ep: int, world: int):
    import torch
    from transformers import AutoModelForCausalLM, DistributedConfig

    config = DistributedConfig(tp_size=tp, enable_expert_parallel=True, ep_size=ep, fsdp_size=world // tp)
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.float32)


def _layouts(overlap: str, only: list[str] | None) -> dict[str, tuple[int, int, str, bool | None]]:
    """label -> (tp, ep, implementation, overlap_shared: None where nothing travels), as the flags select."""
    modes = {"on": [True], "off": [False], "both": [True, False]}[overlap]
    keep = {tuple(int(n) for n in spec.split(":")) for spec in only} if only else None
    out: dict[str, tuple[int, int, str, bool | None]] = {}
    for label, tp, ep, impl in LAYOUTS:
        if keep is not None and (tp, ep) not in keep:
            continue
        if impl != "ours" or ep == tp:
            out[label] = (tp, ep, impl, None)
            continue
        for on in modes:
            out[label if overlap != "both" else f"{label} overlap {'on' if on else 'off'}"] = (tp, ep, impl, on)
    return out


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: median step time, bytes sent per MoE layer, host syncs per step, peak RSS."""
    import torch

    import npu_parallel
    from npu_parallel.tools.audit import OpAudit

    torch.set_num_threads(1)
    from npu_parallel.moe.dispatchers.alltoall import AllToAllDispatcher

    tp, ep, impl, overlap = args.layout
    state = npu_parallel.init_distributed(tp, ep_size=ep)
    peak = common.Peak(state.device)
    moe_impl = "auto" if overlap is None else AllToAllDispatcher(overlap_shared=overlap)
    try:
        if impl == "hf":
            model = _load_hf(args.path, tp, ep, state.world_size)
        else:
            model = npu_parallel.load_pretrained(
                args.path, state, dtype=torch.float32, progress=False, moe_impl=moe_impl
            )
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "step_s": 0.0}
    model.train()
    if args.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = common.random_batches(
        model.config.vocab_size, args.batch, args.seq, args.warmup + args.steps, seed=state.dp_rank
    )
    moe_layers = sum(1 for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate"))

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, _ = common.timed_steps(step, batches, args.warmup)
    counter = _Bytes()
    with OpAudit(model=model) as audit, torch.no_grad():
        model(input_ids=batches[0], labels=batches[0])
    sent = dict(counter.sent)
    with OpAudit(model=model) as audit:
        model(input_ids=batches[0], labels=batches[0]).loss.backward()
    return {
        "step_s": sorted(times)[len(times) // 2],
        "a2a_bytes_per_moe_layer": sent["all_to_all"] / max(moe_layers, 1),
        "allreduce_bytes_forward": sent["all_reduce"],
        "host_syncs_per_step": audit.host_syncs(),
        "peak_rss": peak.bytes(),
        "moe_layers": moe_layers,
    }


def main(argv=None) -> int:
    p = common.parser(__doc__, steps=5, batch=2, seq=128, repeats=1)
    p.add_argument("--overlap", choices=["on", "off", "both"], default="on", help="shared experts overlapped")
    p.add_argument("--only", nargs="+", metavar="TP:EP", help="only the layouts of these tp and ep (e.g. 1:4)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd: no optimizer state")
    args = p.parse_args(argv)
    path, desc = common.resolve_model(args)
    layouts = _layouts(args.overlap, args.only)
    if not layouts:
        raise SystemExit(f"--only {' '.join(args.only)}: no layout has that tp:ep; they are {_pairs()}")

    def make(label: str) -> argparse.Namespace:
        return argparse.Namespace(**vars(args), path=str(path), layout=layouts[label])

    records = common.alternate("bench_ep:worker", list(layouts), args.repeats, lambda m: 4, make)
    rows = common.best(records)
    base = rows[next(iter(rows))]  # the first layout: the ratios are against it
    out = []
    for label, ranks in rows.items():
        r = ranks[0]
        if "error" in r:
            out.append([label, f"does not run: {r['error']}", "", "", "", "", "", ""])
            continue
        peak = max(x["peak_rss"] for x in ranks) / 1e6
        step = max(x["step_s"] for x in ranks)  # the slowest rank's median step
        off = rows.get(label.replace("overlap on", "overlap off")) if label.endswith("overlap on") else None
        vs_off = f"{step / max(x['step_s'] for x in off):.3f}x" if off and "error" not in off[0] else ""
        out.append([
            label, f"{step:.3f}", f"{step / max(x['step_s'] for x in base):.2f}x", vs_off,
            f"{r['a2a_bytes_per_moe_layer']:.0f}", f"{r['allreduce_bytes_forward']:.0f}", r["host_syncs_per_step"],
            f"{peak:.1f}",
        ])  # fmt: skip
    spreads = "; ".join(f"{label}: {', '.join(f'{t:.3f}' for t in common.spread(records, label))}" for label in rows)
    header = [
        "layout",
        "step s",
        f"vs {next(iter(rows))}",
        "vs overlap off",
        "a2a B/MoE layer",
        "all-reduce B fwd",
        "syncs/step",
        "peak RSS MB (max rank)",
    ]
    body = (
        f"{desc}, world 4, batch {args.batch}x{args.seq} per dp rank, {args.steps} timed steps (median, slowest "
        f"rank), {args.optimizer}, fp32 CPU gloo, {args.repeats} alternating launches per layout (best kept)\n\n"
        f"{common.table(header, out)}\n\nslowest rank's median step per launch, s: {spreads}"
    )
    common.write_results("bench_ep", args, desc, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
