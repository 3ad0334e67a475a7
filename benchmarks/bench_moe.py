#!/usr/bin/env python
"""MoE layer forward+backward on one simulated tensor-parallel rank: every implementation registered in
``npu_parallel.moe.dispatchers`` against transformers' own experts module, with DeepSeek-V2-Lite's routing at a
CPU-sized width.

    python benchmarks/bench_moe.py            # the full run (10-15 minutes on the shared 2-core VM)
    python benchmarks/bench_moe.py --quick    # a smoke run (tiny sizes, about 30 s)

The layer: DeepSeek-V2-Lite's MoE (64 routed experts, top-6, 2 shared experts, transformers'
``DeepseekV2TopkRouter`` with its greedy softmax top-k) at hidden 1024 and expert intermediate 704 by default
(``--hidden``/``--intermediate``). One rank at tensor-parallel size ``tp`` routes *all* tokens with the replicated
router, computes only its local experts ``[0, 64/tp)`` (``LocalExperts.from_module`` on transformers' experts
module) with the implementation under test (``dispatcher(x, indices, weights, experts)``, one per registered name:
every entry except ``"npu"``, read at run time), and its shard of the shared experts (a dense SwiGLU MLP of
intermediate ``2 * 704 / tp``, the same module for every implementation). The all-reduce that sums the ranks'
partial outputs is not part of it (bench_collectives.py counts collectives). Implementations that accept a
``capacity_factor`` run twice: as registered (``static``: dropless) and with ``--capacity-factor``
(``static@cf1.25``, which drops the slots past an expert's capacity).

Baselines, same process, same weights, same routing: transformers' ``DeepseekV2Experts`` with
``config._experts_implementation = "grouped_mm"`` (sort + ``torch.nn.functional.grouped_mm``, transformers' default
for a model) and ``"eager"`` (a Python loop over the experts hit), at tp=1 only: transformers has no notion of a rank
holding a subset of the experts, so there is no like-for-like baseline for tp > 1.

Timing: forward + backward of the whole layer (router, experts, shared experts, output sum; the output gradient is
a fixed random ``[T, H]`` tensor), fp32, ``torch.set_num_threads(--threads)`` (1 by default). The step is cut at the
detach points router | experts | shared so each part is timed on its own within the same iteration: ``expert`` is
the implementation's forward + backward (gradients of its input, the routing weights and the expert weights),
``total`` the whole step. Both the wall clock and this process's CPU time (``time.process_time``) are recorded;
the tables read CPU time, which with one thread is the wall time minus the time spent waiting for a core (the
machine is shared), and also show wall-clock numbers. Per cell (tp, tokens) each implementation gets ``--warmup``
untimed iterations (only 1 if the first took over ``--long-iteration`` CPU s), then up to ``--repeats`` timed ones,
round-robin with the order rotated every round so background load hits all alike, stopping early once its timed
iterations add up to ``--cell-seconds`` (n shown). An implementation is skipped in a cell when its time predicted
from the previous token count (linear in tokens) exceeds ``--max-iteration`` CPU s: that keeps ``masked``,
``static`` (dropless) and transformers' eager to the small cells and the default run under 15 minutes.

Before timing, each cell checks every implementation's first warmup iteration against ``masked`` (the seed's
reference): max |diff| of the expert output and of the gradients (input, routing weights, expert weights). Where
``masked`` is not timed, the reference is its no-grad forward on the first ``--check-tokens`` tokens (outputs only).
``@cf`` variants are checked against ``grouped`` with the dropped slots' routing weights set to zero (the slots past
capacity, counted in token order), and their drop count against the one they report.

Tables: (a) times, (b) ratios against the targets, (c1) scaling with tokens, (c2) with local experts at fixed
tokens, (c3) with total experts at fixed tokens and fixed local experts (``--sweep-*``). Chart: tp=1 time vs
tokens, ``benchmarks/moe_time_vs_tokens.png`` (``--chart``).
The tables are printed and written to ``benchmarks/results/bench_moe.md`` (not with ``--quick`` or
``--no_results``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from npu_parallel.moe.dispatchers import implementations, option_names, resolve_dispatcher  # noqa: E402
from npu_parallel.moe.dispatchers.static import capacity  # noqa: E402
from npu_parallel.moe.experts import LocalExperts  # noqa: E402
from npu_parallel.parallel.state import Group  # noqa: E402

NOT_RUNNABLE = {"npu"}  # needs torch_npu
HF_IMPLS = ("grouped_mm", "eager")


# ----------------------------------------------------------------------------------------------- the layer


def hf_config(args, num_experts: int):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        n_routed_experts=num_experts,
        num_experts_per_tok=args.top_k,
        n_shared_experts=2,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        hidden_act="silu",
        num_hidden_layers=1,
    )


def make_router(args, num_experts: int, seed: int) -> nn.Module:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    router = DeepseekV2TopkRouter(hf_config(args, num_experts))
    with torch.no_grad():
        router.weight.normal_(0, 1.0 / math.sqrt(args.hidden), generator=torch.Generator().manual_seed(seed))
    return router


def make_shared(args, tp: int, seed: int) -> nn.Module:
    """This rank's shard of the 2 shared experts: a dense SwiGLU MLP of intermediate 2 * I / tp."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP

    mlp = DeepseekV2MLP(hf_config(args, 64), intermediate_size=2 * args.intermediate // tp)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.normal_(0, 1.0 / math.sqrt(lin.weight.shape[1]), generator=g)
    return mlp


def make_hf_experts(args, num_experts: int, seed: int) -> nn.Module:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

    experts = DeepseekV2Experts(hf_config(args, num_experts))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 1.0 / math.sqrt(args.hidden), generator=g)
        experts.down_proj.normal_(0, 1.0 / math.sqrt(args.intermediate), generator=g)
    return experts


# ----------------------------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    name: str
    call: Callable  # (x, indices, weights) -> partial output [T, H]
    module: nn.Module  # holds the expert weights it uses
    capacity_factor: float | None = None
    stats: dict | None = None


def our_impls(experts: LocalExperts, capacity_factors: list[float]) -> list[Impl]:
    out = []
    for name in implementations():
        if name in NOT_RUNNABLE:
            continue
        d = resolve_dispatcher(name, "cpu")
        out.append(Impl(name, lambda x, i, w, d=d: d(x, i, w, experts), experts))
        if "capacity_factor" in option_names(name):
            for cf in capacity_factors:
                d = resolve_dispatcher(name, "cpu", capacity_factor=cf)
                out.append(Impl(f"{name}@cf{cf:g}", lambda x, i, w, d=d: d(x, i, w, experts), experts, cf, d.stats))
    return out


def hf_impls(hf_experts: nn.Module) -> list[Impl]:
    def call(impl):
        def run(x, i, w):
            hf_experts.config._experts_implementation = impl
            return hf_experts(x, i, w)

        return run

    return [Impl(f"hf_{impl}", call(impl), hf_experts) for impl in HF_IMPLS]


# ----------------------------------------------------------------------------------------------- one step


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def step(router: nn.Module, impl: Impl, shared: nn.Module, x0: torch.Tensor, proj: torch.Tensor, keep: bool = False):
    """One forward+backward of the layer; returns per-part seconds (and the tensors to check when ``keep``)."""
    for m in (router, impl.module, shared):
        for p in m.parameters():
            p.grad = None
    x = x0.detach().requires_grad_(True)
    t0 = now()
    _, weights, indices = router(x)
    t1 = now()
    xe, we = x.detach().requires_grad_(True), weights.detach().requires_grad_(True)
    ye = impl.call(xe, indices, we)
    t2 = now()
    xs = x.detach().requires_grad_(True)
    ys = shared(xs)
    out = ye + ys  # noqa: F841  (the layer's output; its gradient is proj for both parts)
    t3 = now()
    ye.backward(proj)
    t4 = now()
    ys.backward(proj)
    t5 = now()
    weights.backward(we.grad)
    x.grad.add_(xe.grad).add_(xs.grad)
    t6 = now()
    times = {}
    for c, suffix in ((0, ""), (1, "_cpu")):  # wall clock, and this process's CPU time
        times["router" + suffix] = (t1[c] - t0[c]) + (t6[c] - t5[c])
        times["expert" + suffix] = (t2[c] - t1[c]) + (t4[c] - t3[c])
        times["shared" + suffix] = (t3[c] - t2[c]) + (t5[c] - t4[c])
        times["total" + suffix] = t6[c] - t0[c]
    if not keep:
        return times, None
    grads = {"x": xe.grad, "weights": we.grad}
    for n in ("gate_up_proj", "down_proj"):
        grads[n] = getattr(impl.module, n).grad
    return times, {
        "y": ye.detach(),
        "indices": indices.detach(),
        "weights": weights.detach(),
        "grads": {k: v.detach().clone() for k, v in grads.items()},
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def dropped_weights(
    indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts, cf: float
) -> tuple[torch.Tensor, int]:
    """Routing weights with the slots an expert cannot take (past capacity, counted in token order) zeroed."""
    t, k = indices.shape
    cap = capacity(t, k, experts.num_experts, cf)
    local = (indices - experts.expert_start).reshape(-1)
    inside = (local >= 0) & (local < experts.num_local)
    onehot = torch.nn.functional.one_hot(torch.where(inside, local, experts.num_local), experts.num_local + 1)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1
    drop = inside & (position >= cap)
    return weights * (~drop).reshape(t, k).to(weights.dtype), int(drop.sum())


# ----------------------------------------------------------------------------------------------- one cell

CLOCK = ["cpu"]  # which clock the tables read: "cpu" (process CPU time) or "wall"


@dataclass
class Cell:
    tp: int
    tokens: int
    num_experts: int
    num_local: int
    local_slots: int = 0
    samples: dict = field(default_factory=dict)  # impl -> [{part: seconds}]
    warmups: dict = field(default_factory=dict)  # impl -> number of warmup iterations
    skipped: dict = field(default_factory=dict)  # impl -> reason
    checks: dict = field(default_factory=dict)  # impl -> {what: max abs diff}
    notes: dict = field(default_factory=dict)  # impl -> text
    reference: str = "masked"

    def median(self, impl: str, part: str = "expert", clock: str | None = None) -> float | None:
        s = self.samples.get(impl)
        key = part + ("_cpu" if (clock or CLOCK[0]) == "cpu" else "")
        return statistics.median(x[key] for x in s) if s else None

    def best(self, impl: str, part: str = "expert", clock: str | None = None) -> float | None:
        s = self.samples.get(impl)
        key = part + ("_cpu" if (clock or CLOCK[0]) == "cpu" else "")
        return min(x[key] for x in s) if s else None


def _compare(cell: Cell, impl: Impl, res: dict, ref: dict | None, x0: torch.Tensor) -> None:
    """max |diff| of an implementation's first iteration against the reference."""
    checks = cell.checks.setdefault(impl.name, {})
    if impl.capacity_factor is not None:
        w_ref, n_drop = dropped_weights(res["indices"], res["weights"], impl.module, impl.capacity_factor)
        with torch.no_grad():
            y_ref = resolve_dispatcher("grouped", "cpu")(x0, res["indices"], w_ref, impl.module)
        checks["y"] = max_diff(res["y"], y_ref)
        reported = impl.stats.get("dropped") if impl.stats is not None else None
        reported = "n/a" if reported is None else int(reported)
        cell.notes[impl.name] = (n_drop, reported)
        return
    if ref is None:
        checks["_y"] = res["y"]  # compared once the no-grad reference exists
        return
    checks["y"] = max_diff(res["y"], ref["y"])
    for k, v in res["grads"].items():
        r = ref["grads"].get(k)
        if v is not None and r is not None and v.shape == r.shape:
            checks[f"d{k}"] = max_diff(v, r)


def run_cell(
    args, cell: Cell, router, impls: list[Impl], shared, experts: LocalExperts, predicted: dict[str, float], log
) -> Cell:
    g = torch.Generator().manual_seed(1000 + cell.tokens)
    x0 = torch.randn(cell.tokens, args.hidden, generator=g)
    proj = torch.randn(cell.tokens, args.hidden, generator=g)
    active = []
    for impl in impls:
        guess = predicted.get(impl.name)
        if guess is not None and guess > args.max_iteration:
            cell.skipped[impl.name] = guess
        else:
            active.append(impl)
    with torch.no_grad():
        _, _, indices = router(x0)
        local = indices - experts.expert_start
        cell.local_slots = int(((local >= 0) & (local < experts.num_local)).sum())

    # warmup 1, masked first (the reference), each result compared right away and dropped
    ref, first = None, {}
    for impl in sorted(active, key=lambda i: i.name != "masked"):
        gc.collect()
        try:
            t, res = step(router, impl, shared, x0, proj, keep=True)
        except Exception as exc:  # a new implementation that cannot run here: report it, go on with the others
            cell.skipped[impl.name] = f"failed: {type(exc).__name__}: {exc}"[:120]
            log(f"    {impl.name} failed: {exc!r}")
            continue
        first[impl.name] = t["total_cpu"]
        cell.warmups[impl.name] = 1
        if impl.name == "masked":
            ref = res
            cell.checks["masked"] = {"y": 0.0, "y_abs": float(res["y"].abs().max())}
        else:
            _compare(cell, impl, res, ref, x0)
        del res
        log(f"    warmup {impl.name:<16} total {t['total'] * 1e3:9.1f} ms wall {t['total_cpu'] * 1e3:9.1f} ms cpu")
    del ref
    active = [i for i in active if i.name in first]
    if "masked" not in first:
        n = min(cell.tokens, args.check_tokens)
        cell.reference = f"masked, no-grad forward of the first {n} tokens"
        with torch.no_grad():
            _, weights, indices = router(x0)
            y_ref = resolve_dispatcher("masked", "cpu")(x0[:n], indices[:n], weights[:n], experts)
        for checks in cell.checks.values():
            if "_y" in checks:
                checks["y"] = max_diff(checks.pop("_y")[:n], y_ref)
        del y_ref
    # further warmups (not for iterations longer than --long-iteration), alternating
    for _ in range(1, args.warmup):
        for impl in active:
            if first[impl.name] <= args.long_iteration:
                gc.collect()
                step(router, impl, shared, x0, proj)
                cell.warmups[impl.name] += 1
    # timed rounds, alternating, the order rotated every round
    spent = {i.name: 0.0 for i in active}
    for r in range(args.repeats):
        k = r % max(1, len(active))
        for impl in active[k:] + active[:k]:
            samples = cell.samples.setdefault(impl.name, [])
            if samples and spent[impl.name] >= args.cell_seconds:
                continue
            gc.collect()
            gc.disable()
            try:
                t, _ = step(router, impl, shared, x0, proj)
            finally:
                gc.enable()
            samples.append(t)
            spent[impl.name] += t["total_cpu"]
    for impl in active:
        log(
            f"    {impl.name:<16} median total {cell.median(impl.name, 'total', 'wall') * 1e3:9.1f} ms wall "
            f"{cell.median(impl.name, 'total', 'cpu') * 1e3:9.1f} ms cpu, expert "
            f"{cell.median(impl.name, 'expert', 'cpu') * 1e3:9.1f} ms cpu  (n={len(cell.samples[impl.name])})"
        )
    return cell


# ----------------------------------------------------------------------------------------------- tables


def md_table(header: list[str], rows: list[list]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}" if v >= 0.1 else f"{v * 1e3:.1f}"


def impl_order(cells: list[Cell]) -> list[str]:
    names = []
    for c in cells:
        for n in list(c.samples) + list(c.skipped):
            if n not in names:
                names.append(n)
    rank = lambda n: (n.startswith("hf_"), n != "grouped", n.startswith("static"), n)
    return sorted(names, key=rank)


def skip_text(reason) -> str:
    return f"skipped (~{reason:.0f} s)" if isinstance(reason, float) else str(reason)


def table_times(cells: list[Cell], tokens: list[int], repeats: int) -> str:
    out = []
    for tp in sorted({c.tp for c in cells}):
        row_cells = {c.tokens: c for c in cells if c.tp == tp}
        any_cell = next(iter(row_cells.values()))
        rows = []
        for name in impl_order(list(row_cells.values())):
            row = [name]
            for t in tokens:
                c = row_cells.get(t)
                if c is None or (name not in c.samples and name not in c.skipped):
                    row.append("")
                elif name in c.skipped:
                    row.append(skip_text(c.skipped[name]))
                else:
                    n = len(c.samples[name])
                    row.append(
                        f"{ms(c.median(name, 'expert', 'cpu'))} / {ms(c.median(name, 'total', 'cpu'))} "
                        f"({ms(c.median(name, 'total', 'wall'))})" + (f" n={n}" if n < repeats else "")
                    )
            rows.append(row)
        other = ["shared MLP + router"]
        for t in tokens:
            c = row_cells.get(t)
            vals = [
                (x["shared_cpu"] + x["router_cpu"], x["shared"] + x["router"])
                for s in (c.samples.values() if c else [])
                for x in s
            ]
            other.append(
                f"{ms(statistics.median(v[0] for v in vals))} ({ms(statistics.median(v[1] for v in vals))})"
                if vals
                else ""
            )
        rows.append(other)
        slots = ["local slots (of T x k)"] + [
            f"{row_cells[t].local_slots} / {t * TOP_K[0]}" if t in row_cells else "" for t in tokens
        ]
        rows.append(slots)
        out.append(
            f"tp={tp}: local experts {any_cell.num_local} of {any_cell.num_experts}. Median CPU ms, "
            f"routed-expert part / whole layer, forward+backward (whole layer, wall-clock ms)"
        )
        out.append("")
        out.append(md_table(["impl"] + [f"T={t}" for t in tokens], rows))
        out.append("")
    return "\n".join(out)


TOP_K = [6]


def verdict(value: float | None, target: float | None, higher_is_better: bool) -> str:
    if value is None or target is None:
        return "-"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def table_ratios(cells: list[Cell], tokens: list[int]) -> tuple[str, list[dict]]:
    rows, records = [], []

    def add(label, c, a, b, target, higher_is_better):
        r = {
            clock: {part: (c.median(a, part, clock) / c.median(b, part, clock)) for part in ("expert", "total")}
            for clock in ("cpu", "wall")
        }
        v_cpu = verdict(r["cpu"]["expert"], target, higher_is_better)
        v_wall = verdict(r["wall"]["expert"], target, higher_is_better)
        f = (lambda v: f"{v:.1f}x") if higher_is_better else (lambda v: f"{v:.2f}")
        goal = "(none)" if target is None else (f">= {target:g}x" if higher_is_better else f"<= {target:g}")
        rows.append(
            [
                label,
                c.tp,
                c.tokens,
                f(r["cpu"]["expert"]),
                f(r["cpu"]["total"]),
                f(r["wall"]["expert"]),
                goal,
                v_cpu,
                v_wall,
            ]
        )
        records.append(
            {
                "what": label,
                "tp": c.tp,
                "tokens": c.tokens,
                "ratios": r,
                "target": target,
                "verdict_cpu": v_cpu,
                "verdict_wall": v_wall,
            }
        )

    for c in sorted(cells, key=lambda c: (c.tp, c.tokens)):
        if "grouped" not in c.samples:
            continue
        if "masked" in c.samples:
            add("masked / grouped (speedup)", c, "masked", "grouped", {1: 8.0, 4: 4.0}.get(c.tp), True)
        hf = [(c.median(n), n) for n in ("hf_grouped_mm", "hf_eager") if n in c.samples]
        if hf:
            best_hf = min(hf)[1]
            add(f"grouped / {best_hf} (the faster HF)", c, "grouped", best_hf, 1.0, False)
        for name in sorted(n for n in c.samples if n.startswith("static")):
            add(f"{name} / grouped", c, name, "grouped", 1.5, False)
    order = {"masked": 0, "grouped": 1}
    rows.sort(key=lambda r: (order.get(r[0].split(" ")[0], 2), r[0], r[1], r[2]))
    return md_table(
        [
            "comparison (ratio of medians)",
            "tp",
            "tokens",
            "expert part, CPU",
            "whole layer, CPU",
            "expert part, wall",
            "target (expert part)",
            "verdict (CPU)",
            "verdict (wall)",
        ],
        rows,
    ), records


def table_scaling_tokens(cells: list[Cell], tokens: list[int]) -> str:
    rows = []
    t0 = min(tokens)
    for tp in sorted({c.tp for c in cells}):
        by_t = {c.tokens: c for c in cells if c.tp == tp}
        for name in impl_order(list(by_t.values())):
            base = by_t.get(t0).median(name) if t0 in by_t else None
            row = [tp, name]
            for t in tokens:
                v = by_t[t].median(name) if t in by_t else None
                row.append("-" if v is None or base is None else f"{v / base:.2f}")
            last = max((t for t in tokens if t in by_t and by_t[t].median(name) is not None), default=None)
            per_slot = None if last is None else by_t[last].median(name) / by_t[last].local_slots * 1e6
            row.append("-" if last is None else f"{per_slot:.1f} (T={last})")
            rows.append(row)
    header = ["tp", "impl"] + [f"T={t} (ideal {t / t0:g})" for t in tokens] + ["expert us per local slot"]
    return md_table(header, rows)


def table_local(cells: list[Cell]) -> str:
    """Fixed tokens and total experts, local experts E/tp (from the main grid)."""
    rows = []
    for t in sorted({c.tokens for c in cells}):
        group = sorted((c for c in cells if c.tokens == t), key=lambda c: c.tp)
        if len(group) < 2:
            continue
        names = [n for n in impl_order(group) if not n.startswith("hf_")]
        for c in group:
            row = [t, c.tp, c.num_local, c.local_slots]
            for n in names:
                v = c.median(n)
                row.append("skipped" if n in c.skipped else "-" if v is None else ms(v))
            rows.append(row)
    names = [n for n in impl_order(cells) if not n.startswith("hf_")]
    return md_table(["tokens", "tp", "local experts", "local slots"] + [f"{n}: expert ms" for n in names], rows)


def table_sweep(cells: list[Cell]) -> str:
    names = impl_order(cells)
    rows = []
    for c in sorted(cells, key=lambda c: c.num_experts):
        row = [c.num_experts, c.tp, c.num_local, f"{c.local_slots} ({c.local_slots / (c.tokens * TOP_K[0]):.0%})"]
        for n in names:
            if n in c.skipped:
                row.append(skip_text(c.skipped[n]))
            else:
                v = c.median(n)
                row.append("-" if v is None else f"{ms(v)} ({v / c.local_slots * 1e6:.1f} us/slot)")
        rows.append(row)
    return md_table(
        ["total experts E", "tp = E/16", "local", "local slots (share of T x k)"] + [f"{n}: expert ms" for n in names],
        rows,
    )


def checks_table(cells: list[Cell]) -> str:
    names = impl_order(cells)
    rows = []
    for n in names:
        worst: dict[str, float] = {}
        checked, grad_cells = 0, 0
        drops = []
        for c in cells:
            ch = c.checks.get(n)
            if not ch:
                continue
            checked += 1
            grad_cells += any(k.startswith("d") for k in ch)
            for k, v in ch.items():
                if not k.startswith("_"):
                    worst[k] = max(worst.get(k, 0.0), v)
            if n in c.notes:
                drops.append(c.notes[n])
        ref = "grouped with dropped weights = 0" if "@cf" in n else "masked"
        fmt = lambda k, worst=worst: "-" if k not in worst else f"{worst[k]:.1e}"
        drop_txt = ""
        if drops:
            total = sum(d[0] for d in drops)
            agree = all(d[1] == "n/a" or d[1] == d[0] for d in drops)
            drop_txt = f"{total} slots dropped in all; reported count {'matches' if agree else 'DIFFERS'}"
        rows.append(
            [
                n,
                "(the reference)" if n == "masked" else ref,
                checked,
                grad_cells,
                fmt("y_abs") if n == "masked" else fmt("y"),
                fmt("dx"),
                fmt("dweights"),
                fmt("dgate_up_proj"),
                fmt("ddown_proj"),
                drop_txt,
            ]
        )
    return md_table(
        [
            "impl",
            "reference",
            "cells",
            "cells w/ grads",
            "output (masked: max abs)",
            "input grad",
            "routing-weight grad",
            "gate_up grad",
            "down grad",
            "drops",
        ],
        rows,
    )


def save_chart(cells: list[Cell], tokens: list[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp1 = {c.tokens: c for c in cells if c.tp == 1}
    if not tp1:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, part, label in ((axes[0], "expert", "routed experts only"), (axes[1], "total", "whole MoE layer")):
        for name in impl_order(list(tp1.values())):
            pts = [(t, tp1[t].median(name, part)) for t in tokens if t in tp1 and tp1[t].median(name, part)]
            if not pts:
                continue
            style = "--" if name.startswith("hf_") else "-"
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], style, marker="o", label=name)
        grouped = [(t, tp1[t].median("grouped", part)) for t in tokens if t in tp1 and tp1[t].median("grouped", part)]
        if grouped:  # a guide: proportional to tokens, through grouped's largest-T point
            t_last, v_last = grouped[-1]
            ax.plot(tokens, [v_last * 1e3 * t / t_last for t in tokens], ":", color="gray", label="proportional to T")
        skipped = sorted({n for c in tp1.values() for n in c.skipped})
        if skipped:
            ax.text(
                0.2,
                0.97,
                f"{', '.join(skipped)}: only T={min(tp1)}, larger T skipped\n"
                f"(predicted over --max-iteration CPU s per iteration)",
                transform=ax.transAxes,
                fontsize=7,
                color="dimgray",
                va="top",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(tokens)
        ax.set_xticklabels([str(t) for t in tokens])
        ax.set_xlabel("tokens")
        ax.set_ylabel("forward + backward, median CPU ms")
        ax.set_title(f"tp=1, {label}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: hidden 128, intermediate 64, tokens 64 128; prints only"
    )
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=704, help="routed expert intermediate size")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--capacity-factor",
        type=float,
        nargs="*",
        default=[1.25],
        help="extra runs of implementations that take a capacity_factor (none: only as registered)",
    )
    p.add_argument(
        "--sweep-experts",
        type=int,
        nargs="*",
        default=[16, 32, 64, 128],
        help="total experts for the fixed-local-experts sweep (empty: no sweep)",
    )
    p.add_argument("--sweep-local", type=int, default=16, help="local experts in the sweep (tp = E / this)")
    p.add_argument("--sweep-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--long-iteration",
        type=float,
        default=2.0,
        help="an implementation whose first iteration took longer gets no second warmup (s)",
    )
    p.add_argument(
        "--cell-seconds",
        type=float,
        default=10.0,
        help="stop sampling an implementation in a cell once its timed iterations add up to this (s)",
    )
    p.add_argument(
        "--max-iteration",
        type=float,
        default=8.0,
        help="skip a cell for an implementation when its predicted iteration exceeds this (CPU s)",
    )
    p.add_argument(
        "--sweep-max-iteration",
        type=float,
        default=30.0,
        help="--max-iteration for the sweep (masked costs the same at every E there)",
    )
    p.add_argument(
        "--check-tokens",
        type=int,
        default=512,
        help="where masked is not timed, its no-grad forward on this many tokens is the reference",
    )
    p.add_argument(
        "--chart", default=None, help="PNG path (default benchmarks/moe_time_vs_tokens.png; --quick: a temp file)"
    )
    p.add_argument("--json", default=None, help="write every sample here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    common.add_results_flag(p)
    args = p.parse_args()
    if args.quick:
        args.no_results = True  # a smoke run's tiny sizes are no reading: benchmarks/results/ keeps the last real one
        args.hidden, args.intermediate = 128, 64
        args.tokens = [64, 128]
        args.sweep_experts, args.sweep_tokens = [16, 32], 128
        args.repeats, args.warmup = 2, 1
    TOP_K[0] = args.top_k
    chart = args.chart or (
        str(HERE / "moe_time_vs_tokens.png")
        if not args.quick
        else os.path.join(os.environ.get("TMPDIR", "/tmp"), "moe_time_vs_tokens_quick.png")
    )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    import transformers

    names = [n for n in implementations() if n not in NOT_RUNNABLE]
    log(f"implementations registered: {implementations()} (running {names})")

    # the E-expert layer: transformers' experts module holds all weights; ranks slice theirs out of it
    hf_experts = make_hf_experts(args, args.experts, seed=1)
    router = make_router(args, args.experts, seed=2)
    cells: list[Cell] = []
    for tp in args.tp:
        experts = LocalExperts.from_module(hf_experts, Group.offline(0, tp))
        shared = make_shared(args, tp, seed=3)
        impls = our_impls(experts, args.capacity_factor) + (hf_impls(hf_experts) if tp == 1 else [])
        predicted: dict[str, float] = {}
        prev = None
        for t in sorted(args.tokens):
            log(
                f"tp={tp} tokens={t} (local experts {experts.num_local} of {experts.num_experts}), "
                f"{time.perf_counter() - started:.0f} s so far"
            )
            if prev is not None:
                for impl in impls:
                    base = prev.median(impl.name, "total", "cpu")
                    if base is not None:
                        predicted[impl.name] = base * t / prev.tokens
                    elif isinstance(prev.skipped.get(impl.name), float):
                        predicted[impl.name] = prev.skipped[impl.name] * t / prev.tokens
            cell = run_cell(
                args,
                Cell(tp, t, experts.num_experts, experts.num_local),
                router,
                impls,
                shared,
                experts,
                predicted,
                log,
            )
            cells.append(cell)
            prev = cell
        del experts, impls, shared
        gc.collect()

    # the sweep: fixed local experts (the same weights), fixed tokens, growing total experts
    sweep: list[Cell] = []
    if args.sweep_experts:
        gate_up = hf_experts.gate_up_proj.detach()[: args.sweep_local].clone()
        down = hf_experts.down_proj.detach()[: args.sweep_local].clone()
        act = hf_experts.act_fn
        predicted = {}
        for e in sorted(args.sweep_experts):
            tp = e // args.sweep_local
            log(f"sweep: E={e} tp={tp} tokens={args.sweep_tokens}, {time.perf_counter() - started:.0f} s so far")
            experts = LocalExperts(nn.Parameter(gate_up), nn.Parameter(down), act, e, 0)
            router_e = make_router(args, e, seed=4)
            shared = make_shared(args, tp, seed=3)
            sweep_args = argparse.Namespace(**{**vars(args), "max_iteration": args.sweep_max_iteration})
            cell = run_cell(
                sweep_args,
                Cell(tp, args.sweep_tokens, e, args.sweep_local),
                router_e,
                our_impls(experts, args.capacity_factor),
                shared,
                experts,
                predicted,
                log,
            )
            for name in cell.samples:
                predicted[name] = cell.median(name, "total", "cpu")  # masked: flat in E here; the others shrink
            sweep.append(cell)
    del hf_experts
    elapsed = time.perf_counter() - started

    # --- report
    out = [f"# bench_moe.py{' --quick' if args.quick else ''}: MoE layer forward+backward on one simulated TP rank"]
    out.append("")
    out.append(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}, "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )
    layer = (
        f"hidden {args.hidden}, expert intermediate {args.intermediate}, {args.experts} routed experts, "
        f"top-{args.top_k} greedy softmax router (DeepseekV2TopkRouter), 2 shared experts (this rank's shard: "
        f"intermediate 2*{args.intermediate}/tp), fp32"
    )
    out.append(f"layer: {layer}")
    out.append(
        f"implementations: {names} from npu_parallel.moe.dispatchers (+ @cf{args.capacity_factor} variants), "
        f"baselines hf_grouped_mm / hf_eager (DeepseekV2Experts, tp=1)"
    )
    out.append(
        f"timing: warmup {args.warmup} (1 when the first iteration > {args.long_iteration:g} s), median of up to "
        f"{args.repeats} alternating repeats (fewer once an implementation spent {args.cell_seconds:g} s in a cell: "
        f"n shown), cells predicted over {args.max_iteration:g} CPU s per iteration skipped; times are this "
        f"process's CPU time (1 thread: unaffected by waiting for a core) unless marked wall; "
        f"run took {elapsed:.0f} s wall"
    )
    out.append("")
    out.append("## Numerical check (first warmup iteration of every cell; largest max abs difference over the cells)")
    out.append("")
    out.append(checks_table(cells + sweep))
    refs = sorted({c.reference for c in cells + sweep})
    if any(r != "masked" for r in refs):
        out.append("")
        out.append(
            "Cells where masked was not timed: "
            + ", ".join(
                f"tp={c.tp} T={c.tokens}" + (f" E={c.num_experts}" if c in sweep else "")
                for c in cells + sweep
                if c.reference != "masked"
            )
            + f" (reference output: masked's no-grad forward on the first {args.check_tokens} tokens; gradients not "
            f"compared there)"
        )
    out.append("")
    out.append("## (a) Time per implementation")
    out.append("")
    out.append(table_times(cells, sorted(args.tokens), args.repeats))
    out.append("## (b) Ratios and targets (verdict on the expert part, the part the implementations differ in)")
    out.append("")
    text, records = table_ratios(cells, sorted(args.tokens))
    out.append(text)
    out.append("")
    out.append(
        "## (c1) Scaling with tokens: expert-part CPU time relative to the smallest T (linear in T x k is the ideal)"
    )
    out.append("")
    out.append(table_scaling_tokens(cells, sorted(args.tokens)))
    out.append("")
    out.append(
        f"## (c2) Fixed tokens and total experts ({args.experts}), local experts {args.experts}/tp: expert part, "
        f"median CPU ms (from (a))"
    )
    out.append("")
    out.append(table_local(cells))
    out.append("")
    if sweep:
        out.append(
            f"## (c3) Fixed tokens ({args.sweep_tokens}) and fixed local experts ({args.sweep_local}), growing total "
            f"experts (tp = E/{args.sweep_local}): expert part, median CPU ms"
        )
        out.append("")
        out.append(table_sweep(sweep))
        out.append("")
    save_chart(
        cells,
        sorted(args.tokens),
        chart,
        f"MoE layer fwd+bwd, hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts "
        f"top-{args.top_k}, fp32, {torch.get_num_threads()} thread(s); median",
    )
    out.append(f"chart: {chart}")
    common.write_results("bench_moe", args, f"one DeepSeek-V2-Lite-routed MoE layer: {layer}", "\n".join(out))
    if args.json:
        dump = [
            {
                "tp": c.tp,
                "tokens": c.tokens,
                "experts": c.num_experts,
                "local": c.num_local,
                "local_slots": c.local_slots,
                "samples": c.samples,
                "skipped": c.skipped,
                "checks": {k: {a: b for a, b in v.items() if not a.startswith("_")} for k, v in c.checks.items()},
                "warmups": c.warmups,
                "sweep": c in sweep,
            }
            for c in cells + sweep
        ]
        Path(args.json).write_text(json.dumps({"args": vars(args), "cells": dump, "ratios": records}, indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


if __name__ == "__main__":
    main()
