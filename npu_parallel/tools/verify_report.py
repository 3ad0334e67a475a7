"""What ``npu-parallel verify`` reports: tolerances, the figures out of them, the per-layer table, the plot.

Works on the raw results of :func:`npu_parallel.tools.verify.verify_rank` (plain dicts, no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GRAD_GROUPS",
    "LAYER_OUTPUTS",
    "MODEL_GRADS",
    "MODEL_OUTPUTS",
    "Tolerances",
    "evaluate",
    "failures",
    "format_table",
    "layer_errors",
    "layout_name",
    "plot_errors",
    "tolerances_for",
]

LAYER_OUTPUTS = ("attn_out", "mlp_out")  # mlp_out is named moe_out on MoE layers
GRAD_GROUPS = ("g_attn", "g_mlp", "g_router", "g_norm")
MODEL_OUTPUTS = ("logits", "loss", "aux_loss")
MODEL_GRADS = ("g_embed", "g_final_norm", "g_lm_head")


def layout_name(tp: int, pp: int = 1) -> str:
    """``tp=2`` (pp 1) or ``tp=2 pp=2``: how progress lines and reports name a layout."""
    return f"tp={tp}" + (f" pp={pp}" if pp > 1 else "")


def result_name(result: dict) -> str:
    return layout_name(result["tp"], result.get("pp", 1))


# -- tolerances -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerances:
    atol: float  # max abs diff of outputs (attention, MLP/MoE, router weights, logits, loss, aux loss)
    grad_atol: float  # max abs diff of gathered gradients
    min_agree: float  # router top-k agreement, percent of tokens with the same expert set


# bfloat16, measured (batch 2x16, tp 1 and 2, forward and backward, the tests' tiny DeepSeek-V2/V3, Mixtral,
# Qwen2/3-MoE and npu_parallel.tools.tiny): honest max diffs <= 8.3e-3 on outputs and <= 3.9e-3 on gradients, router
# agreement >= 93.75 % (near-tie tokens, 2 of 32 at most, flip under bf16 rounding); with one expert perturbed
# (--_perturb-expert) outputs differ by >= 0.73 and gradients by >= 0.28. 2.5e-2 sits 3x above the first and 11x
# below the second; agreement 90 % allows tie-flips, while a wrong router disagrees on most tokens.
DEFAULT_TOLERANCES = {
    "float32": Tolerances(1e-4, 1e-4, 100.0),
    "bfloat16": Tolerances(2.5e-2, 2.5e-2, 90.0),
    "float16": Tolerances(5e-2, 5e-2, 99.0),
}


def tolerances_for(
    dtype: str, atol: float | None = None, grad_atol: float | None = None, min_agree: float | None = None
) -> Tolerances:
    """The dtype's defaults, overridden by the values given (gradients default to ``atol`` when only it is)."""
    base = DEFAULT_TOLERANCES[dtype]
    grad = grad_atol if grad_atol is not None else (atol if atol is not None else base.grad_atol)
    return Tolerances(base.atol if atol is None else atol, grad, base.min_agree if min_agree is None else min_agree)


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
    tp = result_name(result)

    def check(where: str, key: str, value, row: dict | None = None) -> list[str]:
        if value is None:
            return []
        limit, higher = _limit(key, tol)
        name = _column_name(key, row or {})
        if higher:
            return [f"{tp} {where}{name} {value:.2f}% < {limit:g}%"] if value < limit else []
        return [f"{tp} {where}{name} max diff {value:.1e} > {limit:.0e}"] if not value <= limit else []

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


def evaluate(results: dict, tol: Tolerances) -> list[str]:
    """Every failure of every layout (keyed by tp, or by (tp, pp)), smallest first."""
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
    staged = "stages" in result  # pp > 1: which stage ran each layer
    header = ["layer", "kind"] + (["stage"] if staged else []) + ["mlp/moe_out" if k == "mlp_out" else k for k in keys]
    rows = []
    scores = [max((_score(r.get(k), k, tol) for k in keys), default=0.0) for r in result["layers"]]
    worst = max(range(len(scores)), key=scores.__getitem__) if scores else -1
    for idx, r in enumerate(result["layers"]):
        stage = [str(r.get("stage", "-"))] if staged else []
        rows.append(
            [str(r["layer"]), r["kind"]]
            + stage
            + [_fmt(r.get(k), k) for k in keys]
            + (["<- worst"] if idx == worst else [""])
        )
    widths = [max(len(x) for x in col) for col in zip(header + [""], *rows, strict=True)]
    passes = ", forward+backward" if result.get("backward") else ""
    lines = [
        f"{result_name(result)}  {result['model_type']} {result['dtype']}, batch {result['batch'][0]}x"
        f"{result['batch'][1]}, moe_impl {result['moe_impl']}{passes}"
    ]
    if staged:
        lines.append(stages_line(result))
    for line in [header + [""]] + rows:
        lines.append("  ".join(f"{x:<{w}}" for x, w in zip(line, widths, strict=True)).rstrip())
    model = "  ".join(f"{k} {_fmt(v, k)}" for k, v in result["model"].items() if v is not None)
    lines.append(f"model  {model}")
    return "\n".join(lines)


def stages_line(result: dict) -> str:
    """``stages (1f1b, 2 micro-batches): 0 = layers 0-1 + embedding | 1 = layer 2 + norm, head``."""
    parts = []
    for st in result["stages"]:
        start, stop = st["layers"]
        held = f"layers {start}-{stop - 1}" if stop - start > 1 else f"layer {start}"
        parts.append(f"{st['stage']} = " + " + ".join([held] + ([", ".join(st["extra"])] if st["extra"] else [])))
    return f"stages ({result['schedule']}, {result['micro']} micro-batches): " + " | ".join(parts)


def layer_errors(result: dict) -> list[float]:
    """Max abs diff per layer over its outputs and gradients (for the plot)."""
    keys = list(LAYER_OUTPUTS) + ["router_w", "aux"] + list(GRAD_GROUPS)
    return [max((r[k] for k in keys if r.get(k) is not None), default=0.0) for r in result["layers"]]


def plot_errors(results: dict, out: str | Path, tol: Tolerances) -> Path:
    """PNG of the worst error per layer, one line per layout, with the tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in sorted(results):
        errs = layer_errors(results[key])
        ax.plot(range(len(errs)), [max(e, 1e-12) for e in errs], marker="o", label=result_name(results[key]))
    ax.axhline(tol.atol, color="red", linestyle="--", linewidth=1, label=f"atol {tol.atol:g}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max abs diff vs reference")
    ax.set_title("npu-parallel verify: worst error per layer")
    ax.legend()
    from npu_parallel.training.metrics import save_figure

    return save_figure(fig, out)
