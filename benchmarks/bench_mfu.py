#!/usr/bin/env python
"""Model FLOPs utilization against this machine's own GEMM rate, and where a fine-tuning step's time goes.

    python benchmarks/bench_mfu.py [--model tiny|slice|PATH] [--seq 2048] [--batch 1] [--dtype fp32|bf16]

One rank (tp 1), the same checkpoint loaded by npu_parallel (``load_pretrained``) and by transformers
(``from_pretrained``), in alternating fresh launches. Each launch measures, in the same process:

- the GEMM rate: ``torch.mm`` at every weight shape of the model with ``batch x seq`` rows, the best one kept (the
  rate the machine reaches on this model's matrices);
- the decoder layers alone: forward and backward of ``model.model`` (no head, no loss) against their model FLOPs;
- the full step: forward, loss, backward and AdamW, against the model FLOPs with the head (each side's AdamW as
  its users get it: ours ``build_optimizer``, what ``npu-parallel train`` runs; transformers' the Trainer default,
  fused AdamW; both fused on CPU);
- one profiled step (``torch.profiler``), its self time split into GEMMs by layer part (told apart by their matrix
  shapes), attention, routing and permutation, elementwise and norms, copies, loss and embedding, collectives and
  the optimizer.

Model FLOPs count the matrices a token passes through, not the work an implementation chooses to do: per token
2 x (in x out) for every weight on its path (the top-k routed experts, not all), causal attention as half of the
T x T scores, and the backward as twice the forward. Writes benchmarks/results/bench_mfu.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

MODES = ("ours", "transformers")
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"}
ROUTING = ("topk", "sort", "gather", "scatter", "index", "cumsum", "bincount", "histc", "nonzero", "masked", "one_hot",
           "repeat_interleave", "searchsorted", "argsort", "take", "put", "where")  # fmt: skip
COPIES = {"copy_", "cat", "stack", "clone", "contiguous", "to", "_to_copy", "empty", "empty_like", "empty_strided",
          "zeros", "zeros_like", "fill_", "zero_", "split", "split_with_sizes", "view", "_unsafe_view", "reshape",
          "transpose", "permute", "expand", "slice", "select", "narrow", "t", "as_strided", "unsqueeze", "squeeze",
          "flatten", "unbind", "chunk", "detach", "alias", "new_empty", "new_zeros", "resize_", "set_",
          "lift_fresh"}  # exact names: a prefix such as "t" would take tanh and threshold_backward  # fmt: skip
LOSS = ("cross_entropy", "log_softmax", "_log_softmax", "nll_loss", "embedding")
PART_ORDER = ["attention projections", "dense MLP", "routed experts", "shared experts", "router", "head", "other GEMM"]


# ---------------------------------------------------------------------------------------------- model FLOPs
def attention_weights(cfg) -> list[tuple[int, int]]:
    """(in, out) of every attention projection of one decoder layer: MLA's (DeepSeek-V2/V3), else q, k, v, o."""
    h, n_heads = cfg.hidden_size, cfg.num_attention_heads
    if getattr(cfg, "kv_lora_rank", None):
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = [(h, cfg.q_lora_rank), (cfg.q_lora_rank, n_heads * qk)] if cfg.q_lora_rank else [(h, n_heads * qk)]
        kv = [(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim), (cfg.kv_lora_rank, n_heads * (cfg.qk_nope_head_dim +
              cfg.v_head_dim))]  # fmt: skip
        return [*q, *kv, (n_heads * cfg.v_head_dim, h)]
    d = getattr(cfg, "head_dim", None) or h // n_heads
    kv_width = cfg.num_key_value_heads * d
    return [(h, n_heads * d), (h, kv_width), (h, kv_width), (n_heads * d, h)]


def attention_core(cfg, seq: int) -> float:
    """Forward FLOPs per token of causal attention's two T x T products (scores and values), averaged over T."""
    if getattr(cfg, "kv_lora_rank", None):
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_attention_heads * (qk + v) * seq / 2  # each query sees (seq + 1) / 2 keys on average


def moe_shape(cfg) -> tuple[int, int, int]:
    """(routed experts, an expert's width, the shared experts' total width, 0 if none) of an MoE config."""
    experts = getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_experts", None) or cfg.num_local_experts
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    shared = (getattr(cfg, "n_shared_experts", 0) or 0) * width
    return experts, width, shared or getattr(cfg, "shared_expert_intermediate_size", 0) or 0


def model_flops(cfg, tokens: int, seq: int) -> dict[str, float]:
    """Forward + backward model FLOPs of ``tokens`` tokens in rows of ``seq``, per layer part (3x the forward)."""
    h = cfg.hidden_size
    parts = dict.fromkeys(PART_ORDER, 0.0)
    parts["attention core"] = 0.0
    dense_layers = getattr(cfg, "first_k_dense_replace", 0)
    experts, moe_width, shared = moe_shape(cfg)
    k = cfg.num_experts_per_tok
    for layer in range(cfg.num_hidden_layers):
        for a, b in attention_weights(cfg):
            parts["attention projections"] += 2 * a * b
        parts["attention core"] += attention_core(cfg, seq)
        if layer < dense_layers:
            parts["dense MLP"] += 2 * 3 * h * cfg.intermediate_size
        else:
            parts["router"] += 2 * h * experts
            parts["routed experts"] += 2 * 3 * h * moe_width * k
            parts["shared experts"] += 2 * 3 * h * shared
    parts["head"] = 2 * h * cfg.vocab_size
    return {p: 3 * f * tokens for p, f in parts.items()}


def weight_parts(cfg) -> list[tuple[str, int, int]]:
    """(part, in, out) of every weight, most specific shapes first, for telling a GEMM's part by its dimensions."""
    h = cfg.hidden_size
    experts, moe_width, shared = moe_shape(cfg)
    rows = [("head", h, cfg.vocab_size), ("router", h, experts)]
    mlps = (("dense MLP", cfg.intermediate_size), ("shared experts", shared), ("routed experts", moe_width))
    for part, width in mlps:
        if width:  # gate and up fused into one [2 x width, hidden] weight, or apart
            rows += [(part, h, 2 * width), (part, h, width)]
    attention = [("attention projections", a, b) for a, b in attention_weights(cfg)]
    return rows + [w for w in attention if w[1] != w[2]] + [w for w in attention if w[1] == w[2]]  # square last


def gemm_dims(name: str, shapes: list) -> tuple[list[int], float] | None:
    """(the dimensions M, K, N of a GEMM event's product, its FLOPs) from the profiler's input shapes (the operands
    are the first two, after ``addmm``'s bias; an ``out=`` tensor follows them)."""
    first = 1 if name in ("aten::addmm", "aten::baddbmm") else 0
    if len(shapes) < first + 2 or not all(isinstance(s, (list, tuple)) for s in shapes[first : first + 2]):
        return None
    a, b = shapes[first], shapes[first + 1]
    if len(a) < 2 or len(b) < 2:
        return None
    if name == "aten::_grouped_mm":  # [S, K] x [G, K, N] or (the weight gradient) [K, S] x [S, N]
        n = b[2] if len(b) == 3 else b[1]
        return [a[0], a[1], n], 2.0 * a[0] * a[1] * n
    batch = a[0] if len(a) == 3 else 1
    m, k, n = a[-2], a[-1], b[-1]
    return [m, k, n], 2.0 * batch * m * k * n


def part_of(dims: list[int], parts: list[tuple[str, int, int]], tokens: int) -> str:
    """The first weight whose (in, out) both occur among a GEMM's dimensions (each dimension used once). Every
    token passes the dense and shared weights (the third dimension is the step's token count), a routed expert
    only its share: V2-Lite's two shared experts are as wide as one expert's fused gate and up (2 x 1408)."""
    for part, a, b in parts:
        rest = list(dims)
        if a in rest:
            rest.remove(a)
            if b in rest:
                rest.remove(b)
                routed = rest[0] != tokens
                if (part == "routed experts") == routed or part not in ("routed experts", "shared experts"):
                    return part
    return "other GEMM"


def category(name: str) -> str:
    """The breakdown row of a profiler op that is not a GEMM (by its name)."""
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention core"
    if "c10d" in name or "gloo" in name or "nccl" in name or "all_reduce" in name or "all_to_all" in name:
        return "collectives"
    if not name.startswith("aten::"):
        return "framework (autograd, Python, hooks)"
    op = name[len("aten::") :]
    if op.startswith(LOSS) or "nll_loss" in op:
        return "loss and embedding"
    if op.startswith(ROUTING):
        return "routing and permutation"
    if op in COPIES:
        return "copies and views"
    return "elementwise and norms"


# ---------------------------------------------------------------------------------------------- one launch
def gemm_rate(cfg, rows: int, dtype, device, repeats: int = 3, min_s: float = 0.2) -> tuple[float, str]:
    """(FLOP/s, shape) of the fastest ``torch.mm`` over the model's weight shapes with ``rows`` rows (each timed
    over enough calls to last ``min_s``, best of ``repeats``)."""
    import torch

    def sync() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize()

    best, where = 0.0, ""
    for _, a, b in weight_parts(cfg):
        x = torch.randn(rows, a, dtype=dtype, device=device)
        w = torch.randn(a, b, dtype=dtype, device=device)
        out = torch.mm(x, w)
        sync()
        t0 = time.perf_counter()
        torch.mm(x, w, out=out)
        sync()
        calls = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                torch.mm(x, w, out=out)
            sync()
            rate = 2.0 * rows * a * b * calls / (time.perf_counter() - t0)
            if rate > best:
                best, where = rate, f"[{rows}, {a}] x [{a}, {b}]"
    return best, where


def profile_step(step, batch) -> list:
    """The self-time events of one profiled step (optimizer ops marked by their enclosing scope)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(batch)
    return list(prof.events())


def breakdown(events: list, cfg, tokens: int) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(self seconds and GEMM FLOPs per breakdown row, self seconds per shape of the GEMMs no weight explains);
    everything under the ``optimizer`` scope is the optimizer."""
    parts = weight_parts(cfg)
    rows: dict[str, dict[str, float]] = {}
    other: dict[str, float] = {}

    def add(row: str, seconds: float, flops: float = 0.0) -> None:
        r = rows.setdefault(row, {"s": 0.0, "flops": 0.0})
        r["s"] += seconds
        r["flops"] += flops

    for e in events:
        seconds = e.self_cpu_time_total / 1e6
        scope, in_optimizer = e, False
        while scope is not None:
            if scope.name == "optimizer":
                in_optimizer = True
                break
            scope = scope.cpu_parent
        if in_optimizer:
            add("optimizer", seconds)
        elif e.name in GEMM_OPS and (dims := gemm_dims(e.name, e.input_shapes or [])) is not None:
            batched = e.name in ("aten::bmm", "aten::baddbmm")  # no weight is batched: attention's T x T products
            part = "attention core (bmm)" if batched else part_of(dims[0], parts, tokens)
            inner = e.cpu_parent is not None and e.cpu_parent.name in GEMM_OPS  # a kernel's own per-group mm
            add("GEMM: " + part, seconds, 0.0 if inner else dims[1])
            if part == "other GEMM":
                key = f"{e.name} {e.input_shapes}"
                other[key] = other.get(key, 0.0) + seconds
        else:
            add(category(e.name), seconds)
    return rows, other


def worker(args: argparse.Namespace) -> dict:
    """One launch's record: GEMM rate, decoder and step times, the profiled breakdown."""
    import torch
    from transformers import AutoModelForCausalLM

    import npu_parallel

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    state = npu_parallel.init_distributed(1)
    if args.mode == "ours":
        model = npu_parallel.load_pretrained(args.path, state, dtype=dtype, progress=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype).to(state.device)
    model.train()
    cfg, device = model.config, state.device
    tokens = args.batch * args.seq
    rate, rate_shape = gemm_rate(cfg, tokens, dtype, device)
    if args.mode == "ours":  # what `npu-parallel train` runs
        from npu_parallel.training.optim import build_optimizer

        opt = build_optimizer(model, 1e-5)
    else:  # transformers' Trainer default on torch >= 2.8 (optim="adamw_torch_fused")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batches = [b.to(device) for b in common.random_batches(cfg.vocab_size, args.batch, args.seq, 2)]
    grad = torch.randn(args.batch, args.seq, cfg.hidden_size, dtype=dtype, device=device)

    def decoder(ids):
        model.model(input_ids=ids).last_hidden_state.backward(grad)
        model.zero_grad(set_to_none=True)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.profiler.record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    dec_times, _ = common.timed_steps(decoder, [batches[0]] * (args.warmup + args.steps), args.warmup)
    step_times, _ = common.timed_steps(step, [batches[0]] * (args.warmup + args.steps), args.warmup)
    rows, other = breakdown(profile_step(step, batches[-1]), cfg, tokens)
    return {
        "rank": state.rank,
        "gemm_rate": rate,
        "gemm_shape": rate_shape,
        "decoder_s": min(dec_times),
        "step_s": min(step_times),
        "breakdown": rows,
        "other_gemms": sorted(other.items(), key=lambda kv: -kv[1])[:5],
        "experts_impl": str(getattr(cfg, "_experts_implementation", None) or "-") if args.mode != "ours" else "-",
        "device": str(device),
    }


# ---------------------------------------------------------------------------------------------- report
def main() -> None:
    p = common.parser(__doc__, steps=2, warmup=1, batch=1, seq=2048, repeats=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per launch (all cores)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and compute of both models")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # common.alternate hands it to the launches
    desc, records = common.launch_modes("bench_mfu:worker", args, MODES, world=lambda m: 1)
    runs = common.best(records)  # one launch of one rank per mode (tp 1)
    bests = {m: rs[0] for m, rs in runs.items()}
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(common.resolve_model(args)[0])
    tokens = args.batch * args.seq
    flops = model_flops(cfg, tokens, args.seq)
    decoder_flops = sum(f for part, f in flops.items() if part != "head")
    step_flops = sum(flops.values())
    lines = [
        f"{desc}, tp 1, {args.dtype}, batch {args.batch} x {args.seq} tokens, {args.threads} torch threads, AdamW; "
        f"best of {args.warmup + args.steps} repetitions after {args.warmup} warmup, best of {args.repeats} launches",
        f"model FLOPs per step (forward + backward): decoder layers {decoder_flops / 1e12:.3f} T, head "
        f"{flops['head'] / 1e12:.3f} T; per part: "
        + ", ".join(f"{part} {f / 1e9:.0f} G" for part, f in flops.items() if f),
        "",
    ]
    header = ["impl", "GEMM rate GFLOP/s", "decoder s", "decoder MFU", "step s", "step MFU", "experts path"]
    rows, mfu = [], {}
    for m in MODES:
        r = bests[m]
        mfu[m] = decoder_flops / r["decoder_s"] / r["gemm_rate"]
        step_mfu = step_flops / r["step_s"] / r["gemm_rate"]
        rows.append([m, f"{r['gemm_rate'] / 1e9:.1f} ({r['gemm_shape']})", f"{r['decoder_s']:.2f}",
                     f"{100 * mfu[m]:.1f} %", f"{r['step_s']:.2f}", f"{100 * step_mfu:.1f} %",
                     r["experts_impl"]])  # fmt: skip
    lines += [common.table(header, rows), ""]
    for m in MODES:
        b = bests[m]["breakdown"]
        total = sum(r["s"] for r in b.values())
        rate = bests[m]["gemm_rate"]
        brows = [
            [row, f"{r['s']:.2f}", f"{100 * r['s'] / total:.1f} %",
             f"{r['flops'] / r['s'] / rate * 100:.0f} %" if r["flops"] and r["s"] else ""]
            for row, r in sorted(b.items(), key=lambda kv: -kv[1]["s"])
        ]  # fmt: skip
        counted = sum(r["flops"] for row, r in b.items() if "attention core" not in row)
        lines += [
            f"{m}: one profiled step, self time {total:.2f} s; GEMM FLOPs counted {counted / 1e12:.3f} T "
            f"({counted / (step_flops - flops['attention core']):.2f}x the model's GEMM FLOPs)",
            "",
            common.table(["where", "self s", "share", "GEMM rate share"], brows),
            "",
        ]
        if bests[m]["other_gemms"]:
            lines += ["GEMMs no weight shape explains (self s): " + "; ".join(
                f"{k} {v:.2f}" for k, v in bests[m]["other_gemms"]), ""]  # fmt: skip
    speed = common.ratio(runs, "step_s", "transformers", "ours")
    lines += [
        f"decoder MFU ours = {100 * mfu['ours']:.1f} % of the GEMM rate (target >= 60 %: "
        f"{'PASS' if mfu['ours'] >= 0.6 else 'MISS'}); transformers {100 * mfu['transformers']:.1f} %",
        common.ratio_line("step time transformers / ours", speed, (">=", 1.2)),
    ]
    common.write_results("bench_mfu", args, desc, "\n".join(lines))


if __name__ == "__main__":
    main()
