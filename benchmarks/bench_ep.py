#!/usr/bin/env python
"""Expert parallelism at world 4: the all-to-all layout (ep > tp) against today's EP-over-TP (ep = tp) and against
transformers' ``DistributedConfig(tp_size, ep_size, fsdp_size)``, in one run.

    python benchmarks/bench_ep.py [--steps 5] [--batch 2] [--seq 128]

Every layout trains the same tiny DeepSeek-V2-Lite-shaped checkpoint (fp32, CPU, gloo) for warmup + steps
forward/backward/AdamW steps, each dp rank on its own batch, in fresh torchrun ranks. Per layout: step time,
bytes one rank sends per MoE layer in a forward (the all-to-all and the MoE block's all-reduce, counted at the
collective calls), host syncs per step (the op audit, forward and backward), peak RSS per rank.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (label, tp, ep, implementation): today's EP-over-TP at tp 4 and at tp 2 (dp 2); the all-to-all at ep 4
LAYOUTS = [
    ("ep=tp=4 (today)", 4, 4, "ours"),
    ("tp=2 ep=2 dp=2 (today)", 2, 2, "ours"),
    ("tp=2 ep=4 dp=2 alltoall", 2, 4, "ours"),
    ("tp=1 ep=4 dp=4 alltoall", 1, 4, "ours"),
    ("transformers tp=2 ep=4", 2, 4, "hf"),
]


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


def worker(path: str, tp: int, ep: int, impl: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    sys.path.insert(0, str(HERE))
    import torch
    import torch.distributed as dist
    from memory import peak_bytes, reset_peak

    import npu_parallel
    from npu_parallel.tools.audit import OpAudit

    torch.set_num_threads(1)
    state = npu_parallel.init_distributed(tp, ep_size=ep)
    base = reset_peak()
    try:
        if impl == "hf":
            model = _load_hf(path, tp, ep, state.world_size)
        else:
            model = npu_parallel.load_pretrained(path, state, dtype=torch.float32, progress=False)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(state.dp_rank)
    batches = [torch.randint(0, model.config.vocab_size, (batch, seq), generator=g) for _ in range(warmup + steps)]
    moe_layers = sum(1 for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate"))
    times = []
    for i, ids in enumerate(batches):
        dist.barrier()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
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
        "peak_rss": peak_bytes() - base,
        "moe_layers": moe_layers,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per dp rank (default 2)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    from npu_parallel.tools.launch import launch
    from npu_parallel.tools.tiny import build_tiny_deepseek_v2_lite

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny_deepseek_v2_lite(Path(tmp) / "model"))
        for label, tp, ep, impl in LAYOUTS:
            print(f"running {label} ...", flush=True)
            ranks = launch("bench_ep:worker", 4, path, tp, ep, impl, args.steps, args.warmup, args.batch, args.seq,
                           env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}, timeout=1800)  # fmt: skip
            rows[label] = ranks
    base = rows[LAYOUTS[0][0]][0]
    print(f"\nworld 4, batch {args.batch}x{args.seq} per dp rank, {args.steps} timed steps (median), fp32 CPU gloo")
    print(f"{'layout':26} {'step s':>7} {'vs today':>8} {'a2a B/MoE layer':>15} {'all-reduce B fwd':>16} "
          f"{'syncs/step':>10} {'peak RSS MB (max rank)':>22}")  # fmt: skip
    for label, ranks in rows.items():
        r = ranks[0]
        if "error" in r:
            print(f"{label:26} does not run: {r['error']}")
            continue
        peak = max(x["peak_rss"] for x in ranks) / 1e6
        ratio = r["step_s"] / base["step_s"]
        print(f"{label:26} {r['step_s']:7.3f} {ratio:7.2f}x {r['a2a_bytes_per_moe_layer']:15.0f} "
              f"{r['allreduce_bytes_forward']:16.0f} {r['host_syncs_per_step']:10d} {peak:22.1f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
