#!/usr/bin/env python
"""Collectives per decoder layer, forward and backward: npu_parallel vs transformers' tp_plan="auto".

    python benchmarks/bench_collectives.py [--tp 2] [--batch 2] [--seq 32] [--workdir DIR] [--no_results]

Builds the tiny DeepSeek-V2-Lite-shaped checkpoint (``npu_parallel.tools.tiny.build_tiny_deepseek_v2_lite``), then
runs ``worker`` of this file on TP torchrun ranks twice (``npu_parallel.tools.launch``):

* ``ours``: ``npu_parallel.load_pretrained(path, npu_parallel.init_distributed(tp))``;
* ``hf``: ``AutoModelForCausalLM.from_pretrained(path,
  distributed_config=DistributedConfig(tp_size=tp, tp_plan="auto"))``.

Each rank runs one untimed warmup step, then one training step (forward of ``input_ids -> loss``, ``loss.backward()``)
under ``CollectiveBytes``, an :class:`npu_parallel.tools.audit.OpAudit` subclass: OpAudit records every c10d /
``_c10d_functional`` collective with its phase (forward / backward) and decoder-layer scope; the subclass adds the
size of the tensors each one moves. The launcher prints the tables and writes them to
``benchmarks/results/bench_collectives.md`` (not with ``--no_results``).

Bytes: ``payload`` is the size of the whole tensor a collective produces: the reduced buffer of an all-reduce,
the gathered output of an all-gather, the input of a reduce-scatter. ``sent/rank`` is what each rank puts on the
wire under the bandwidth-optimal ring algorithms (all-reduce ``2(n-1)/n``, all-gather and reduce-scatter
``(n-1)/n`` of the payload; other ops: their payload), the usual "bus bytes" model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

IMPLS = ("ours", "hf")


# --------------------------------------------------------------------------------------------- worker side


def _make_audit_class():
    import dataclasses
    import sysconfig

    import torch
    import torch.distributed as dist
    from torch.utils._pytree import tree_leaves

    from npu_parallel.tools import audit as audit_module
    from npu_parallel.tools import launch as launch_module
    from npu_parallel.tools.audit import OpAudit

    # the launcher's frame calls the worker: not where a collective comes from
    skip_files = {os.path.abspath(f) for f in (__file__, audit_module.__file__, launch_module.__file__)}
    skip_dirs = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,)
    stdlib = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep

    def short(path: str, line: int) -> str:
        return f"{path.split('site-packages/')[-1].split(str(HERE.parent) + os.sep)[-1]}:{line}"

    def where() -> str:
        """Innermost frame outside torch, the stdlib, audit.py, launch.py and this file, then its first caller in
        another file; in backward, the autograd node that is running (engine-called code has no Python caller)."""
        frames = []
        frame = sys._getframe(1)
        while frame is not None and len(frames) < 2:
            path = os.path.abspath(frame.f_code.co_filename)
            if not (
                path in skip_files
                or path.startswith(skip_dirs)
                or frame.f_code.co_filename.startswith("<")
                or (path.startswith(stdlib) and "site-packages" not in path)
            ):
                if not frames or path != frames[0][0]:
                    frames.append((path, frame.f_lineno))
            frame = frame.f_back
        text = " < ".join(short(*f) for f in frames)
        node = torch._C._current_autograd_node()
        if node is not None:
            text = f"[{node.name()}] {text}".rstrip()
        return text or "<unknown>"

    def nbytes(tree) -> int:
        return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))

    class CollectiveBytes(OpAudit):
        """OpAudit plus, for every collective event, (payload bytes, bytes sent per rank, shapes)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sizes: dict[int, tuple[int, float, str]] = {}  # event index -> (payload, sent, shapes)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = len(self.events)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            for i in range(first, len(self.events)):
                if self.events[i].kind == "collective":
                    # OpAudit's own `where` stops at this override (a file outside torch): look past it
                    self.events[i] = dataclasses.replace(self.events[i], where=where())
                    self.sizes[i] = self._size(self.events[i].op, func, args, kwargs or {}, out)
            return out

        @staticmethod
        def _size(op: str, func, args: tuple, kwargs: dict, out) -> tuple[int, float, str]:
            n = dist.get_world_size()
            functional = func.namespace != "c10d"
            shapes = [tuple(t.shape) for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
            if op.startswith("allreduce"):
                payload = nbytes(args[0])  # c10d: the list of buffers; functional: the input
                sent = 2 * (n - 1) / n * payload
            elif op.startswith("allgather"):
                payload = nbytes(out) if functional else nbytes(args[0])  # the gathered output
                sent = (n - 1) / n * payload
            elif op.startswith("reduce_scatter"):
                payload = nbytes(args[0]) if functional else nbytes(args[1])  # the input being reduced
                sent = (n - 1) / n * payload
            else:
                payload = nbytes(args[0])
                sent = float(payload)
            return payload, sent, "x".join("[" + ",".join(map(str, s)) + "]" for s in shapes)

    return CollectiveBytes


def worker(args: argparse.Namespace) -> dict:
    """One rank's record: the collectives of one training step with their bytes, layers, loss."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import npu_parallel

    if args.impl == "ours":
        state = npu_parallel.init_distributed(args.tp)
        model = npu_parallel.load_pretrained(args.model, state, dtype=torch.float32, progress=False)
    else:
        from transformers import AutoModelForCausalLM, DistributedConfig

        dist.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained(
            args.model, distributed_config=DistributedConfig(tp_size=args.tp, tp_plan="auto"), dtype=torch.float32
        )
    rank = dist.get_rank()
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warmup: lazy initialisations stay out of the count
    CollectiveBytes = _make_audit_class()
    with CollectiveBytes(model=model) as audit:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    events = [
        {
            "op": e.op,
            "phase": e.phase,
            "scope": e.scope,
            "where": e.where,
            "payload": audit.sizes[i][0],
            "sent": audit.sizes[i][1],
            "shapes": audit.sizes[i][2],
        }
        for i, e in enumerate(audit.events)
        if e.kind == "collective"
    ]
    layers = [name for name, m in model.named_modules() if type(m).__name__.endswith("DecoderLayer")]
    moe = [
        name
        for name, m in model.named_modules()
        if type(m).__name__.endswith("DecoderLayer") and hasattr(m.mlp, "experts")
    ]
    record = {
        "impl": args.impl,
        "rank": rank,
        "tp": args.tp,
        "loss": loss.item(),
        "layers": layers,
        "moe_layers": moe,
        "tokens": args.batch * args.seq,
        "hidden": model.config.hidden_size,
        "events": events,
        "host_syncs_forward": audit.host_syncs(phase="forward"),
        "mlp_types": sorted(
            {type(m.mlp).__name__ for n, m in model.named_modules() if type(m).__name__.endswith("DecoderLayer")}
        ),
    }
    return record


# --------------------------------------------------------------------------------------------- launcher side


def launch(impl: str, args, model: Path) -> list[dict]:
    """Per-rank records of ``worker`` on ``args.tp`` ranks."""
    from npu_parallel.tools.launch import launch as launch_ranks

    worker_args = argparse.Namespace(impl=impl, model=str(model), tp=args.tp, batch=args.batch, seq=args.seq)
    try:
        return launch_ranks("bench_collectives:worker", args.tp, worker_args, env={"OMP_NUM_THREADS": "1"})
    except RuntimeError as exc:
        raise SystemExit(f"{impl}: {exc}") from None


def _fmt_bytes(b: float) -> str:
    if b == 0:
        return "0"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def _table(header: list[str], rows: list[list]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _kind(op: str) -> str:
    return "AR" if op.startswith("allreduce") else "AG" if op.startswith("allgather") else "other"


def summarize(records: dict[str, dict]) -> str:
    out = []
    layers = records["ours"]["layers"]
    moe = set(records["ours"]["moe_layers"])
    scopes = layers + [""]
    header = [
        "layer",
        "kind",
        "impl",
        "fwd AR",
        "fwd AG",
        "fwd other",
        "fwd payload",
        "fwd sent/rank",
        "bwd AR",
        "bwd AG",
        "bwd other",
        "bwd payload",
        "bwd sent/rank",
    ]
    rows = []
    totals = {}
    for scope in scopes:
        for impl in IMPLS:
            ev = [e for e in records[impl]["events"] if e["scope"] == scope]
            row = [
                scope.replace("model.layers.", "layer ") or "outside layers",
                "-" if not scope else ("MoE" if scope in moe else "dense"),
                impl,
            ]
            for phase in ("forward", "backward"):
                pe = [e for e in ev if e["phase"] == phase]
                cnt = defaultdict(int)
                for e in pe:
                    cnt[_kind(e["op"])] += 1
                payload, sent = sum(e["payload"] for e in pe), sum(e["sent"] for e in pe)
                row += [cnt["AR"], cnt["AG"], cnt["other"], _fmt_bytes(payload), _fmt_bytes(sent)]
                t = totals.setdefault((impl, phase), [0, 0, 0, 0, 0.0])
                t[0] += cnt["AR"]
                t[1] += cnt["AG"]
                t[2] += cnt["other"]
                t[3] += payload
                t[4] += sent
            rows.append(row)
    for impl in IMPLS:
        row = ["total", "", impl]
        for phase in ("forward", "backward"):
            t = totals[(impl, phase)]
            row += [t[0], t[1], t[2], _fmt_bytes(t[3]), _fmt_bytes(t[4])]
        rows.append(row)
    out.append(_table(header, rows))

    # breakdown: which code issued them (per MoE / dense layer, first matching layer as the example)
    out.append("")
    out.append(
        "Where they come from (one dense layer, one MoE layer (every MoE layer is the same) and outside the "
        "layers; `[Node]` is the autograd node running in backward):"
    )
    out.append("")
    brows = []
    example = {
        "dense": next((s for s in layers if s not in moe), None),
        "MoE": next((s for s in layers if s in moe), None),
        "outside": "",
    }
    for impl in IMPLS:
        for kind, scope in example.items():
            if scope is None:
                continue
            groups: dict[tuple, list] = defaultdict(list)
            for e in records[impl]["events"]:
                if e["scope"] == scope:
                    where = e["where"]
                    groups[(e["phase"], e["op"], where, e["shapes"])].append(e)
            for (phase, op, where, shapes), evs in sorted(
                groups.items(), key=lambda kv: (kv[0][0] != "forward", kv[0][2])
            ):
                brows.append([impl, kind, phase, op, len(evs), shapes, _fmt_bytes(evs[0]["payload"]), where])
    out.append(_table(["impl", "layer", "phase", "op", "count", "tensor shapes", "payload each", "issued at"], brows))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "npu_parallel_bench_collectives"))
    common.add_results_flag(p)
    args = p.parse_args()

    sys.path.insert(0, str(HERE.parent))
    from npu_parallel.tools.tiny import build_tiny_deepseek_v2_lite

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_deepseek_v2_lite(work / "tiny_deepseek_v2_lite")
    records = {}
    for impl in IMPLS:
        ranks = launch(impl, args, model)
        assert len(ranks) == args.tp, f"{impl}: {len(ranks)} rank records"
        same = all(
            [(e["op"], e["phase"], e["scope"], e["payload"]) for e in r["events"]]
            == [(e["op"], e["phase"], e["scope"], e["payload"]) for e in ranks[0]["events"]]
            for r in ranks
        )
        records[impl] = ranks[0]
        records[impl]["ranks_identical"] = same
    r = records["ours"]
    model = (
        f"tiny DeepSeek-V2-Lite ({len(r['layers'])} decoder layers, hidden {r['hidden']}, layer 0 dense, "
        f"64 experts top-6 + 2 shared)"
    )
    out = [
        f"{model}, tp={args.tp}, batch {args.batch} x seq {args.seq} = {r['tokens']} tokens, "
        f"fp32 (one [tokens, hidden] activation = {_fmt_bytes(r['tokens'] * r['hidden'] * 4)})"
    ]
    for impl in IMPLS:
        rec = records[impl]
        out.append(
            f"  {impl}: mlp modules {rec['mlp_types']}, loss {rec['loss']:.4f}, "
            f"all ranks issued the same collectives: {rec['ranks_identical']}"
        )
    out += ["", summarize(records), ""]
    fwd = defaultdict(int)
    for e in records["ours"]["events"]:
        if e["phase"] == "forward" and e["op"].startswith("allreduce"):
            fwd[e["scope"]] += 1
    ok = all(fwd[s] == 2 for s in records["ours"]["layers"])
    out.append(
        f"ours: forward all-reduces per decoder layer {[fwd[s] for s in records['ours']['layers']]} "
        f"(expected 2 each): {'PASS' if ok else 'MISS'}"
    )
    common.write_results("bench_collectives", args, model, "\n".join(out))


if __name__ == "__main__":
    main()
