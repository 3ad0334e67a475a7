"""``npu-parallel verify`` and ``npu-parallel audit``: the converted model against transformers', layer by layer.

Both commands start their own ranks: for each tp size > 1 they run
``python -m torch.distributed.run --standalone --nproc_per_node TP -m npu_parallel.tools.verify --worker ...``
(tp = 1 runs in the calling process). Inside a torchrun job (``WORLD_SIZE`` set) they run the one tp size
equal to the world size in place.

verify: every rank loads the converted model with ``load_pretrained``; rank 0 also builds the reference
(``AutoModelForCausalLM.from_pretrained``). Both see the same seeded random batch; forward hooks capture
per decoder layer the attention output, the MLP/MoE output, the router's expert indices and weights
(and auxiliary loss); then the logits and loss, and with ``backward`` every parameter's gradient,
gathered to full shape over the tp group (ShardSpec dim, padding trimmed) and compared by group.

audit: one forward and backward of a small batch under :class:`~npu_parallel.audit.OpAudit`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from npu_parallel.convert.conversion import conversion_info

__all__ = ["Tolerances", "tolerances_for", "run_verify", "run_audit", "evaluate", "format_table", "plot_errors"]

LAYER_OUTPUTS = ("attn_out", "mlp_out")  # mlp_out is named moe_out on MoE layers
GRAD_GROUPS = ("g_attn", "g_mlp", "g_router", "g_norm")
MODEL_OUTPUTS = ("logits", "loss", "aux_loss")
MODEL_GRADS = ("g_embed", "g_final_norm", "g_lm_head")


# -- tolerances -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerances:
    atol: float           # max abs diff of outputs (attention, MLP/MoE, router weights, logits, loss, aux loss)
    grad_atol: float      # max abs diff of gathered gradients
    min_agree: float      # router top-k agreement, percent of tokens with the same expert set


DEFAULT_TOLERANCES = {
    "float32": Tolerances(1e-4, 1e-4, 100.0),
    "bfloat16": Tolerances(5e-2, 5e-2, 99.0),
    "float16": Tolerances(5e-2, 5e-2, 99.0),
}


def tolerances_for(dtype: str, atol: float | None = None, grad_atol: float | None = None,
                   min_agree: float | None = None) -> Tolerances:
    base = DEFAULT_TOLERANCES[dtype]
    grad = grad_atol if grad_atol is not None else (atol if atol is not None else base.grad_atol)
    return Tolerances(base.atol if atol is None else atol, grad, base.min_agree if min_agree is None else min_agree)


# -- launching ranks ------------------------------------------------------------------------------------

def in_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(tp: int, worker_args: list[str], timeout: float = 1800.0) -> None:
    """Run the worker on ``tp`` ranks with torchrun; raise RuntimeError with the ranks' output on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
           "-m", "npu_parallel.tools.verify", "--worker", *worker_args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TQDM_DISABLE", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(cmd[:8])} ... exited with {proc.returncode}:\n{tail}")


def _state_for_worker():
    """torchrun: init the group (tp = world); else a single-rank state without a process group."""
    from npu_parallel.parallel.state import init_distributed, single_rank_state

    if in_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        return init_distributed(None)
    return single_rank_state()


def _quiet() -> None:
    """No progress bars or per-load INFO lines in the tables' way (``npu-parallel -v`` keeps them)."""
    import logging

    from transformers.utils import logging as hf_logging

    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("npu_parallel").setLevel(logging.WARNING)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _batch(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


# -- capture --------------------------------------------------------------------------------------------

def _decoder_layers(model) -> list:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: cannot compare it layer by layer")
    return list(layers)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class Capture:
    """Forward hooks on every decoder layer's attention, MLP block and router."""

    def __init__(self, model):
        from npu_parallel.convert.moe_blocks import find_moe_blocks

        self.data: dict[int, dict] = {}
        self.handles = []
        layers = _decoder_layers(model)
        routers = {info.layer: info for info in find_moe_blocks(model, required=False) if info.layer is not None}
        self.moe_layers = sorted(routers)
        for i, layer in enumerate(layers):
            self.data[i] = {}
            attn = getattr(layer, "self_attn", None)
            mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
            if attn is not None:
                self.handles.append(attn.register_forward_hook(self._store(i, "attn_out")))
            if mlp is not None:
                self.handles.append(mlp.register_forward_hook(self._store(i, "mlp_out")))
            if i in routers:
                self.handles.append(routers[i].router.register_forward_hook(self._router(i)))

    def _store(self, i: int, key: str):
        def hook(module, args, out):
            t = _first_tensor(out)
            if t is not None:
                self.data[i][key] = t.detach().float().clone()

        return hook

    def _router(self, i: int):
        from npu_parallel.moe.router import router_outputs

        def hook(module, args, out):
            indices, weights, aux = router_outputs(out)
            if indices is not None:
                self.data[i]["indices"] = indices.detach().reshape(-1, indices.shape[-1]).clone()
            if weights is not None:
                self.data[i]["weights"] = weights.detach().float().reshape(-1, weights.shape[-1]).clone()
            if aux is not None:
                self.data[i]["aux"] = aux.detach().float().reshape(()).clone()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _grad_group(name: str) -> tuple[int | None, str]:
    from npu_parallel.convert.moe_blocks import layer_index

    layer = layer_index(name)
    if layer is None:
        if "embed" in name:
            return None, "g_embed"
        if "lm_head" in name:
            return None, "g_lm_head"
        return None, "g_final_norm"
    if "norm" in name.rsplit(".", 2)[-2] and ".self_attn." not in name:
        return layer, "g_norm"
    if ".self_attn." in name:
        return layer, "g_attn"
    if ".gate." in name or ".router." in name or name.endswith(".gate.weight") or "e_score_correction" in name:
        return layer, "g_router"
    return layer, "g_mlp"


def _full_grads(model, state) -> dict[str, torch.Tensor]:
    """Every parameter's gradient at full (global) shape, on every rank: sharded ones all-gathered over tp."""
    import torch.distributed as dist

    from npu_parallel.parallel.shard_spec import spec_of

    params = dict(model.named_parameters())
    grads = {}
    ranges = None
    if state.tp_size > 1:
        mine = {n: (s.start, s.stop) for n, p in params.items() if (s := spec_of(p)) is not None}
        ranges = [None] * state.tp_size
        dist.all_gather_object(ranges, mine, group=state.tp_group)
    for name, p in params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        spec = spec_of(p)
        if spec is None or state.tp_size == 1:
            if spec is not None and spec.padded > spec.length:
                g = g.narrow(spec.dim, 0, spec.length)
            grads[name] = g.detach().float().cpu()
            continue
        parts = [torch.empty_like(g) for _ in range(state.tp_size)]
        dist.all_gather(parts, g.contiguous(), group=state.tp_group)
        shape = list(g.shape)
        shape[spec.dim] = spec.full
        full = torch.zeros(shape, dtype=torch.float32)
        for r, part in enumerate(parts):
            start, stop = ranges[r][name]
            full.narrow(spec.dim, start, stop - start).copy_(part.narrow(spec.dim, 0, stop - start).float().cpu())
        grads[name] = full
    return grads


def _forward(model, ids, backward: bool):
    cap = Capture(model)
    model.train()  # routers' auxiliary losses; the tiny and the published models have no dropout
    try:
        out = model(input_ids=ids, labels=ids)
        if backward:
            out.loss.backward()
    finally:
        cap.remove()
    aux = getattr(out, "aux_loss", None)
    return cap, {"logits": out.logits.detach().float(), "loss": out.loss.detach().float(),
                 "aux_loss": aux.detach().float() if isinstance(aux, torch.Tensor) else None}


def _perturb(model, spec: str, state) -> None:
    """Debug: ``RANK:LAYER`` adds noise to that tp rank's routed experts in that layer (proves verify fails)."""
    rank, layer = (int(x) for x in spec.split(":"))
    if state.tp_rank != rank:
        return
    experts = _decoder_layers(model)[layer].mlp.experts
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        w = experts.gate_up_proj
        w.add_(torch.randn(w.shape, generator=g).to(w) * 0.5)


def verify_rank(path: str, state, *, dtype: str = "float32", moe_impl: str = "auto", backward: bool = False,
                batch: int = 2, seq: int = 16, seed: int = 1234, perturb: str | None = None) -> dict | None:
    """One tp size on this rank: rank 0 returns the raw differences, the others None."""
    from transformers import AutoModelForCausalLM

    from npu_parallel.checkpoint.load import load_pretrained

    _quiet()
    torch_dtype = getattr(torch, dtype)
    model = load_pretrained(path, state, dtype=torch_dtype, moe_impl=moe_impl, progress=False)
    if perturb:
        _perturb(model, perturb, state)
    ids = _batch(model.config.vocab_size, batch, seq, seed).to(state.device)
    cap, outs = _forward(model, ids, backward)
    grads = _full_grads(model, state) if backward else {}
    moe_impl_used = conversion_info(model).moe_impl
    del model
    if state.rank != 0:
        return None
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(state.device)
    ref_cap, ref_outs = _forward(ref, ids, backward)
    ref_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu()
                 for n, p in ref.named_parameters()} if backward else {}
    result = compare(ref_cap, cap, ref_outs, outs, ref_grads, grads)
    result.update(tp=state.tp_size, dtype=dtype, moe_impl=moe_impl_used, batch=[batch, seq],
                  model_type=ref.config.model_type, backward=backward)
    return result


def _maxdiff(a, b) -> float | None:
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        return math.inf
    return (a.float().cpu() - b.float().cpu()).abs().max().item() if a.numel() else 0.0


def _router_compare(ref: dict, got: dict) -> tuple[float | None, float | None]:
    """(percent of tokens with the same top-k expert set, max abs diff of their weights matched by expert)."""
    if "indices" not in ref or "indices" not in got:
        return None, None
    ri, gi = ref["indices"].cpu(), got["indices"].cpu()
    if ri.shape != gi.shape:
        return 0.0, math.inf
    rs, rorder = ri.sort(dim=-1)
    gs, gorder = gi.sort(dim=-1)
    same = (rs == gs).all(dim=-1)
    agree = 100.0 * same.float().mean().item()
    wdiff = None
    if "weights" in ref and "weights" in got and same.any():
        rw = ref["weights"].cpu().gather(-1, rorder)[same]
        gw = got["weights"].cpu().gather(-1, gorder)[same]
        wdiff = (rw - gw).abs().max().item()
    return agree, wdiff


def compare(ref_cap: Capture, cap: Capture, ref_outs: dict, outs: dict, ref_grads: dict, grads: dict) -> dict:
    layers = []
    grad_diffs: dict[tuple[int | None, str], float] = {}
    missing = sorted(set(ref_grads) ^ set(grads))
    for name, g in grads.items():
        if name not in ref_grads:
            continue
        key = _grad_group(name)
        d = _maxdiff(ref_grads[name], g)
        grad_diffs[key] = max(grad_diffs.get(key, 0.0), d)
    for i, ref in ref_cap.data.items():
        got = cap.data.get(i, {})
        agree, wdiff = _router_compare(ref, got)
        row = {
            "layer": i,
            "kind": "moe" if i in ref_cap.moe_layers else "dense",
            "attn_out": _maxdiff(ref.get("attn_out"), got.get("attn_out")),
            "mlp_out": _maxdiff(ref.get("mlp_out"), got.get("mlp_out")),
            "router_agree": agree,
            "router_w": wdiff,
            "aux": _maxdiff(ref.get("aux"), got.get("aux")),
        }
        for g in GRAD_GROUPS:
            row[g] = grad_diffs.get((i, g))
        layers.append(row)
    model_row = {k: _maxdiff(ref_outs[k], outs[k]) for k in MODEL_OUTPUTS}
    for g in MODEL_GRADS:
        model_row[g] = grad_diffs.get((None, g))
    return {"layers": layers, "model": model_row, "unmatched_params": missing}


# -- evaluation and reports -----------------------------------------------------------------------------

def _limit(key: str, tol: Tolerances) -> tuple[float, bool]:
    """(limit, higher_is_better) for a quantity."""
    if key == "router_agree":
        return tol.min_agree, True
    return (tol.grad_atol if key.startswith("g_") else tol.atol), False


def _column_name(key: str, row: dict) -> str:
    return "moe_out" if key == "mlp_out" and row.get("kind") == "moe" else key


def _score(value, key: str, tol: Tolerances) -> float:
    """How close to failing: value / limit for diffs (>1 fails), shortfall for agreement."""
    if value is None:
        return 0.0
    limit, higher = _limit(key, tol)
    if higher:
        return 1.0 + (limit - value) if value < limit else 0.0
    return value / limit if limit else (math.inf if value else 0.0)


def failures(result: dict, tol: Tolerances) -> list[str]:
    """Every figure out of tolerance, in the order an error propagates: forward quantities layer by layer,
    then logits/loss, then gradients in backward order (LM head, last layer ... first layer, embedding),
    so the first entry points at the root cause."""
    tp = result["tp"]

    def check(where: str, key: str, value, row: dict | None = None) -> list[str]:
        if value is None:
            return []
        limit, higher = _limit(key, tol)
        name = _column_name(key, row or {})
        if higher:
            return [f"tp={tp} {where}{name} {value:.2f}% < {limit:g}%"] if value < limit else []
        return [f"tp={tp} {where}{name} max diff {value:.1e} > {limit:.0e}"] if not value <= limit else []

    out = []
    for row in result["layers"]:
        for key in LAYER_OUTPUTS + ("router_agree", "router_w", "aux"):
            out += check(f"layer {row['layer']} ", key, row.get(key), row)
    model = result["model"]
    for key in MODEL_OUTPUTS:
        out += check("", key, model.get(key))
    for key in ("g_lm_head", "g_final_norm"):
        out += check("", key, model.get(key))
    for row in reversed(result["layers"]):
        for key in GRAD_GROUPS:
            out += check(f"layer {row['layer']} ", key, row.get(key), row)
    out += check("", "g_embed", model.get("g_embed"))
    return out


def evaluate(results: dict[int, dict], tol: Tolerances) -> list[str]:
    return [f for tp in sorted(results) for f in failures(results[tp], tol)]


def _fmt(value, key: str) -> str:
    if value is None:
        return "-"
    if key == "router_agree":
        return f"{value:.1f}%"
    if math.isinf(value):
        return "inf"
    return f"{value:.1e}"


def format_table(result: dict, tol: Tolerances) -> str:
    """One row per decoder layer (max abs diffs, router agreement), the worst row marked, then the model row."""
    keys = list(LAYER_OUTPUTS) + ["router_agree", "router_w", "aux"]
    if result.get("backward"):
        keys += list(GRAD_GROUPS)
    keys = [k for k in keys if any(r.get(k) is not None for r in result["layers"])]
    header = ["layer", "kind"] + ["mlp/moe_out" if k == "mlp_out" else k for k in keys]
    rows = []
    scores = [max((_score(r.get(k), k, tol) for k in keys), default=0.0) for r in result["layers"]]
    worst = max(range(len(scores)), key=scores.__getitem__) if scores else -1
    for idx, r in enumerate(result["layers"]):
        rows.append([str(r["layer"]), r["kind"]] + [_fmt(r.get(k), k) for k in keys]
                    + (["<- worst"] if idx == worst else [""]))
    widths = [max(len(x) for x in col) for col in zip(header + [""], *rows)]
    lines = [f"tp={result['tp']}  {result['model_type']} {result['dtype']}, batch {result['batch'][0]}x"
             f"{result['batch'][1]}, moe_impl {result['moe_impl']}{', forward+backward' if result.get('backward') else ''}"]
    for line in [header + [""]] + rows:
        lines.append("  ".join(f"{x:<{w}}" for x, w in zip(line, widths)).rstrip())
    model = "  ".join(f"{k} {_fmt(v, k)}" for k, v in result["model"].items() if v is not None)
    lines.append(f"model  {model}")
    return "\n".join(lines)


def layer_errors(result: dict) -> list[float]:
    """Max abs diff per layer over its outputs and gradients (for the plot)."""
    keys = list(LAYER_OUTPUTS) + ["router_w", "aux"] + list(GRAD_GROUPS)
    return [max((r[k] for k in keys if r.get(k) is not None), default=0.0) for r in result["layers"]]


def plot_errors(results: dict[int, dict], out: str | Path, tol: Tolerances) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tp in sorted(results):
        errs = layer_errors(results[tp])
        ax.plot(range(len(errs)), [max(e, 1e-12) for e in errs], marker="o", label=f"tp={tp}")
    ax.axhline(tol.atol, color="red", linestyle="--", linewidth=1, label=f"atol {tol.atol:g}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max abs diff vs reference")
    ax.set_title("npu-parallel verify: worst error per layer")
    ax.legend()
    from npu_parallel.training.metrics import save_figure

    return save_figure(fig, out)


def _worker_args(task: str, path: str, out: str, **kw) -> list[str]:
    args = ["--task", task, "--path", path, "--out", out]
    for key, value in kw.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def run_verify(path: str, tp_sizes: list[int], *, dtype: str = "float32", moe_impl: str = "auto",
               backward: bool = False, batch: int = 2, seq: int = 16, seed: int = 1234,
               perturb: str | None = None) -> dict[int, dict]:
    """tp -> raw result, launching ranks per tp size (or in place inside torchrun). Empty on non-zero ranks."""
    kw = dict(dtype=dtype, moe_impl=moe_impl, backward=backward, batch=batch, seq=seq, seed=seed, perturb_expert=perturb)
    if in_torchrun():
        state = _state_for_worker()
        res = verify_rank(path, state, dtype=dtype, moe_impl=moe_impl, backward=backward, batch=batch, seq=seq,
                          seed=seed, perturb=perturb)
        return {state.tp_size: res} if res is not None else {}
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="npu-parallel-verify-"))
    try:
        for tp in tp_sizes:
            if tp == 1:
                from npu_parallel.parallel.state import single_rank_state

                results[1] = verify_rank(path, single_rank_state(), dtype=dtype, moe_impl=moe_impl, backward=backward,
                                         batch=batch, seq=seq, seed=seed, perturb=perturb)
                continue
            out = tmp / f"tp{tp}"
            out.mkdir()
            launch(tp, _worker_args("verify", str(path), str(out), **kw))
            results[tp] = _load_json(out / "result.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=lambda x: None if x is None else str(x))


# -- audit ----------------------------------------------------------------------------------------------

def audit_rank(path: str, state, *, moe_impl: str = "auto", unconverted: bool = False,
               experts_implementation: str | None = None, batch: int = 2, seq: int = 16, seed: int = 1234) -> dict:
    """One forward and backward under OpAudit on this rank: its events and what ran."""
    from npu_parallel.tools.audit import OpAudit

    _quiet()
    if unconverted:
        from transformers import AutoModelForCausalLM

        kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
        what = f"unconverted transformers model (experts_implementation={model.config._experts_implementation})" \
            if hasattr(model.config, "_experts_implementation") else "unconverted transformers model"
    else:
        from npu_parallel.checkpoint.load import load_pretrained

        model = load_pretrained(path, state, dtype=torch.float32, moe_impl=moe_impl, progress=False)
        what = f"converted, tp={state.tp_size}, moe_impl={conversion_info(model).moe_impl}"
    ids = _batch(model.config.vocab_size, batch, seq, seed).to(state.device)
    model.train()
    with OpAudit(model) as audit:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    return {
        "rank": state.rank,
        "what": what,
        "tokens": [batch, seq],
        "events": [e.__dict__ for e in audit.events],
        "table": audit.table(),
    }


def run_audit(path: str, tp: int = 1, **kw) -> list[dict]:
    """Per-rank audit results (rank order), launching ``tp`` ranks when tp > 1."""
    if in_torchrun():
        state = _state_for_worker()
        return [audit_rank(path, state, **kw)]
    if tp == 1:
        from npu_parallel.parallel.state import single_rank_state

        return [audit_rank(path, single_rank_state(), **kw)]
    tmp = Path(tempfile.mkdtemp(prefix="npu-parallel-audit-"))
    try:
        launch(tp, _worker_args("audit", str(path), str(tmp), **kw))
        return [_load_json(tmp / f"rank{r}.json") for r in range(tp)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def audit_summary(results: list[dict]) -> tuple[str, int]:
    """(summary line, number of banned ops over all ranks)."""
    from collections import Counter

    per_rank = []
    total_banned = 0
    for res in results:
        kinds = Counter((e["kind"], e["phase"]) for e in res["events"])
        banned = kinds[("banned", "forward")] + kinds[("banned", "backward")]
        total_banned += banned
        per_rank.append((banned, kinds[("host_sync", "forward")], kinds[("host_sync", "backward")],
                         kinds[("collective", "forward")] + kinds[("collective", "backward")]))
    b, sf, sb, c = per_rank[0]
    head = results[0]
    line = (f"{head['what']}: forward+backward on {head['tokens'][0]}x{head['tokens'][1]} tokens: "
            f"{b} banned ops, {sf + sb} host syncs (forward {sf}, backward {sb}), {c} collectives")
    if len(results) > 1:
        same = all(p == per_rank[0] for p in per_rank)
        line += f" (rank 0; {len(results)} ranks, {'all the same' if same else 'per rank ' + str(per_rank)})"
    line += "  -> " + ("CLEAN" if total_banned == 0 else f"BANNED OPS FOUND ({total_banned})")
    return line, total_banned


# -- worker entry point ---------------------------------------------------------------------------------

def _run_job(job: dict, state) -> None:
    """One verify or audit job on this rank; results go to files under ``job["out"]``."""
    kw = dict(job.get("kwargs", {}))
    out = Path(job["out"])
    if job["task"] == "verify":
        res = verify_rank(job["path"], state, **kw)
        if res is not None:
            _dump(res, out / "result.json")
    else:
        _dump(audit_rank(job["path"], state, **kw), out / f"rank{state.rank}.json")


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m npu_parallel.tools.verify --worker")
    p.add_argument("--task", choices=("verify", "audit"))
    p.add_argument("--jobs", default=None, help="JSON list of {task, path, out, kwargs}: several jobs, one launch")
    p.add_argument("--path")
    p.add_argument("--out")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--moe-impl", default="auto")
    p.add_argument("--backward", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--perturb-expert", default=None)
    p.add_argument("--unconverted", action="store_true")
    p.add_argument("--experts-implementation", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.jobs:
        jobs = _load_json(Path(a.jobs))
    else:
        if not (a.task and a.path and a.out):
            p.error("--task, --path and --out (or --jobs) are required")
        common = dict(moe_impl=a.moe_impl, batch=a.batch, seq=a.seq, seed=a.seed)
        if a.task == "verify":
            kwargs = dict(common, dtype=a.dtype, backward=a.backward, perturb=a.perturb_expert)
        else:
            kwargs = dict(common, unconverted=a.unconverted, experts_implementation=a.experts_implementation)
        jobs = [{"task": a.task, "path": a.path, "out": a.out, "kwargs": kwargs}]
    state = _state_for_worker()
    import torch.distributed as dist

    for job in jobs:
        _run_job(job, state)
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def run_jobs(tp: int, jobs: list[dict]) -> list:
    """Several verify/audit jobs in ONE launch of ``tp`` ranks (saves the start-up per job).

    Each job is ``{"task": "verify" | "audit", "path": ..., "kwargs": {...}}`` with the keyword arguments of
    :func:`verify_rank` / :func:`audit_rank`; returns, per job, the verify result or the per-rank audit list.
    """
    tmp = Path(tempfile.mkdtemp(prefix="npu-parallel-jobs-"))
    try:
        todo = [dict(job, out=str(tmp / f"job{i}")) for i, job in enumerate(jobs)]
        _dump(todo, tmp / "jobs.json")
        launch(tp, ["--jobs", str(tmp / "jobs.json")])
        return [_load_json(Path(j["out"]) / "result.json") if j["task"] == "verify"
                else [_load_json(Path(j["out"]) / f"rank{r}.json") for r in range(tp)] for j in todo]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.argv.remove("--worker")
        sys.exit(worker_main())
    sys.exit("usage: python -m npu_parallel.tools.verify --worker ... (started by `npu-parallel verify` / `audit`)")
