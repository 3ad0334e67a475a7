"""What a checkpoint holds and how it can be split, read from its config and safetensors headers only.

``inspect_checkpoint(path)`` returns a JSON-serialisable report of a Hugging Face checkpoint directory
(``config.json`` + ``*.safetensors``) or of our own sharded format (``manifest.json``): architecture,
dense/MoE layers, experts and routing, attention, sizes, parameter count and bytes, and which tensor-
parallel sizes the model's parallel plan allows. ``format_report`` renders it for ``npu-parallel inspect``.
No tensor data is ever read.
"""

from __future__ import annotations

import math
from pathlib import Path

from npu_parallel.checkpoint.fp8 import as_dequantized
from npu_parallel.checkpoint.hf_source import INDEX_FILE, HFSource
from npu_parallel.checkpoint.keys import FUSED_EXPERT_PARAMS
from npu_parallel.checkpoint.manifest import FORMAT, MANIFEST
from npu_parallel.checkpoint.safetensors_io import CheckpointError, read_header
from npu_parallel.checkpoint.sharded_source import ShardedSource
from npu_parallel.checkpoint.source import TensorSource
from npu_parallel.convert.plan import Plan, config_value
from npu_parallel.moe.load import layer_index

# bits per element of each safetensors dtype code
DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U64": 64,
    "U32": 32,
    "U16": 16,
    "U8": 8,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
}
# tensors the tp plans split (the estimate's rule; the sharded format records the real split)
SPLIT_PATTERNS = (
    ".experts.",
    "q_proj",
    "q_b_proj",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
)
ROUTED_EXPERTS = ".experts."  # not ".shared_experts.": those run for every token
MAX_TP = 16
ROUTING_FIELDS = ("topk_method", "scoring_func", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")


# -- small helpers ------------------------------------------------------------------------------------


def compact_ranges(values) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'; [] -> 'none'."""
    values = sorted(set(values))
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def human_count(n: int | float) -> str:
    """285616 -> '285.6 K', 15.7e9 -> '15.7 B'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)}"


def human_bytes(n: int | float) -> str:
    """Decimal units, as disk sizes are quoted: 31.4e9 -> '31.4 GB'."""
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _tensor_bytes(shape, dtype: str) -> int:
    return math.ceil(math.prod(shape) * DTYPE_BITS.get(dtype, 16) / 8)


def _layer_of(name: str) -> int | None:
    return layer_index(name)


# -- reading the tensors' headers ------------------------------------------------------------------------


def _hf_tensors(path: Path):
    """(source, {name: (dtype code, shape)}) of a Hugging Face checkpoint; nothing but headers is read."""
    with HFSource(path) as source:  # config.json, the index and its shards, checked there
        headers = {f: read_header(source.path / f) for f in source.files()}
        tensors = {}
        for key, filename in source.file_of.items():
            if key not in headers[filename]:
                raise CheckpointError(
                    f"{source.path / INDEX_FILE} puts {key} in {filename}, which does not hold it; "
                    f"the index does not match the shards"
                )
            t = headers[filename][key]
            tensors[key] = (t.dtype, t.shape)
        return source, tensors


def _sharded_tensors(path: Path):
    """(source, {name: (dtype code, shape)}, names of split tensors) of a sharded checkpoint."""
    source = ShardedSource(path)
    tensors, split = {}, set()
    for name, info in source.tensors.items():
        tensors[name] = (info["dtype"], tuple(int(s) for s in info["shape"]))
        if info.get("split") is not None:
            split.add(name)
    return source, tensors, split


# -- the facts ------------------------------------------------------------------------------------------


def _plan(source: TensorSource) -> tuple[Plan | None, str | None]:
    """The model type's parallel plan, or None and why not."""
    try:
        return source.plan, None
    except ValueError as exc:
        msg = str(exc)
        return None, msg if msg.startswith("no parallel plan") else f"no parallel plan: {msg}"


def _stored_experts(tensors: dict) -> int | None:
    """Routed experts per layer as the tensors store them (per-expert indices, or a fused tensor's first dim)."""
    per_layer: dict[str, set[int]] = {}
    for name, (_, shape) in tensors.items():
        head, sep, tail = name.partition(ROUTED_EXPERTS)
        index = tail.split(".", 1)[0]
        if sep and index.isdigit():
            per_layer.setdefault(head, set()).add(int(index))
        elif sep and index in FUSED_EXPERT_PARAMS and shape:
            per_layer.setdefault(head, set()).update(range(shape[0]))
    return max(map(len, per_layer.values()), default=0) or None


def _num_experts(config, plan: Plan | None, tensors: dict) -> int | None:
    """Routed experts: where the plan says the config keeps them; without a plan, counted in the tensors."""
    return plan.num_experts(config) if plan is not None else _stored_experts(tensors)


def _layer_split(config, num_layers: int, experts: int | None, tensors: dict) -> tuple[list[int], list[int], list[str]]:
    """(dense layers, MoE layers, warnings): from the config's DeepSeek fields, else from the tensor names."""
    warnings = []
    with_experts = {i for i in map(_layer_of, (n for n in tensors if ROUTED_EXPERTS in n)) if i is not None}
    if not experts:
        moe = set()
    elif config_value(config, "first_k_dense_replace") is not None:
        first = int(config_value(config, "first_k_dense_replace"))
        freq = config_value(config, "moe_layer_freq") or 1
        moe = {i for i in range(num_layers) if i >= first and i % freq == 0}
    else:
        moe = {i for i in with_experts if i < num_layers} if with_experts else set(range(num_layers))
    stored = {i for i in with_experts if i < num_layers}
    if with_experts and stored != moe:
        warnings.append(
            f"the config makes layers {compact_ranges(moe)} MoE but the tensors hold routed experts "
            f"in layers {compact_ranges(stored)}; does config.json belong to these weights?"
        )
    dense = [i for i in range(num_layers) if i not in moe]
    return dense, sorted(moe), warnings


def _routing(config, tensors: dict) -> dict:
    out = {}
    for field in ROUTING_FIELDS:
        value = config_value(config, field)
        if value is not None:
            out[field] = value
    if any(n.endswith("e_score_correction_bias") for n in tensors):
        out["e_score_correction_bias"] = True  # DeepSeek-V3's aux-loss-free load-balancing bias
    return out


def _attention(config, model_type: str | None) -> dict:
    heads = config_value(config, "num_attention_heads")
    kv_lora = config_value(config, "kv_lora_rank")
    if model_type in ("deepseek_v2", "deepseek_v3") or kv_lora:
        q_lora = config_value(config, "q_lora_rank")
        dims = {k: config_value(config, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
        summary = f"MLA, q_lora_rank={q_lora}" if q_lora else "MLA without q LoRA (q_proj)"
        return {
            "kind": "MLA",
            "summary": summary,
            "q_lora_rank": q_lora,
            "kv_lora_rank": kv_lora,
            "num_heads": heads,
            **dims,
        }
    kv_heads = config_value(config, "num_key_value_heads") or heads
    hidden = config_value(config, "hidden_size")
    head_dim = config_value(config, "head_dim") or (hidden // heads if hidden and heads else None)
    kind = "MHA" if kv_heads == heads else ("MQA" if kv_heads == 1 else "GQA")
    return {"kind": kind, "summary": kind, "num_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim}


def _tp_table(plan, config, candidates) -> tuple[list[int], dict[int, str]]:
    sizes = [(what, fn(config)) for what, fn in plan.sizes()]
    sizes = [(what, int(n)) for what, n in sizes if n]
    valid, invalid = [], {}
    for tp in candidates:
        bad = [f"{n} {what}" for what, n in sizes if n % tp]
        why = next((w for check in plan.checks if (w := check(config, tp))), None)
        if bad:
            invalid[tp] = "does not divide " + " and ".join(bad)
        elif why:
            invalid[tp] = f"does not fit {why}"
        else:
            valid.append(tp)
    return valid, invalid


def _per_rank_bytes(tensors: dict, is_split, tps) -> dict[int, int]:
    split = sum(_tensor_bytes(s, d) for n, (d, s) in tensors.items() if is_split(n))
    whole = sum(_tensor_bytes(s, d) for n, (d, s) in tensors.items() if not is_split(n))
    return {tp: whole + math.ceil(split / tp) for tp in tps}


def inspect_checkpoint(path: str | Path, tp_sizes=()) -> dict:
    """The report for a HF checkpoint folder or a sharded (``manifest.json``) one; raises CheckpointError.

    Every tp from 1 to 16 is checked against the parallel plan, plus any in ``tp_sizes``.
    """
    path = Path(path)
    sharded = (path / MANIFEST).is_file()
    manifest: dict = {}
    split_names = None
    if sharded:
        source, tensors, split_names = _sharded_tensors(path)
        manifest = source.manifest
        architecture, model_type = manifest.get("architecture"), manifest.get("model_type")
    else:
        source, tensors = _hf_tensors(path)
        archs = config_value(source.config, "architectures") or [type(source.config).__name__]
        architecture, model_type = archs[0], config_value(source.config, "model_type")
    config, files, disk = source.config, source.files(), source.disk_bytes()

    num_layers = int(config_value(config, "num_hidden_layers") or 0)
    plan, plan_error = _plan(source)
    experts = _num_experts(config, plan, tensors)
    dense, moe, warnings = _layer_split(config, num_layers, experts, tensors)

    numel = {n: math.prod(s) for n, (_, s) in tensors.items()}
    params_total = sum(numel.values())
    params_experts = sum(v for n, v in numel.items() if ROUTED_EXPERTS in n)
    top_k = config_value(config, "num_experts_per_tok") if experts else None
    extra_layers = sorted({i for i in map(_layer_of, tensors) if i is not None and i >= num_layers})
    params_extra = sum(v for n, v in numel.items() if (_layer_of(n) or 0) >= num_layers > 0)
    dtypes: dict[str, int] = {}
    for n, (d, _) in tensors.items():
        dtypes[d] = dtypes.get(d, 0) + numel[n]
        if d not in DTYPE_BITS:
            warnings.append(f"tensor {n} has dtype {d}, unknown here; byte estimates assume 2 bytes per element")
            break
    quant = config_value(config, "quantization_config")
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else str(quant)

    report = {
        "path": str(path),
        "format": FORMAT if sharded else "huggingface",
        "sharded_tp": manifest["tp_size"] if sharded else None,
        "sharded_ep": manifest.get("ep_size", manifest["tp_size"]) if sharded else None,
        "files": files,
        "architecture": architecture,
        "model_type": model_type,
        "num_layers": num_layers,
        "dense_layers": dense,
        "moe_layers": moe,
        "extra_layers": extra_layers,
        "params_extra_layers": params_extra,
        "num_nextn_predict_layers": config_value(config, "num_nextn_predict_layers"),
        "experts": experts,
        "top_k": top_k,
        "shared_experts": config_value(config, "n_shared_experts") if experts else None,
        "routing": _routing(config, tensors) if experts else {},
        "attention": _attention(config, model_type),
        "hidden_size": config_value(config, "hidden_size"),
        "vocab_size": config_value(config, "vocab_size"),
        "tie_word_embeddings": bool(config_value(config, "tie_word_embeddings")),
        "num_tensors": len(tensors),
        "params_total": params_total,
        "params_experts": params_experts,
        "params_other": params_total - params_experts,
        "params_active_estimate": (
            params_total - params_experts + params_experts * top_k // experts if experts and top_k else None
        ),
        "bytes_on_disk": disk,
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
        "quantization": quant,
        "plan": None,
        "plan_error": None,
        "tp": {"valid": [], "invalid": {}},
        "per_rank_bytes_estimate": {},
        "warnings": warnings,
    }
    if plan is None:
        report["plan_error"] = plan_error
        return report
    report["plan"] = plan.name
    candidates = sorted(set(range(1, MAX_TP + 1)) | {int(t) for t in tp_sizes})
    valid, invalid = _tp_table(plan, config, candidates)
    report["tp"] = {"valid": valid, "invalid": invalid}
    if split_names is not None:
        is_split = split_names.__contains__
    else:

        def is_split(name: str) -> bool:
            return any(p in name for p in SPLIT_PATTERNS)

    report["per_rank_bytes_estimate"] = _per_rank_bytes(as_dequantized(tensors), is_split, valid)  # as loaded
    return report


# -- text ------------------------------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_report(report: dict) -> str:
    """The report as aligned text, one fact per line, the tp table last."""
    lines = []

    def line(label: str, text) -> None:
        lines.append(f"{label:<14} {text}")

    r = report
    if r["format"] == FORMAT:
        fmt = (
            f"npu_parallel sharded checkpoint, tp={r['sharded_tp']}"
            + (f", ep={r['sharded_ep']}" if r.get("sharded_ep", r["sharded_tp"]) != r["sharded_tp"] else "")
            + f" ({len(r['files'])} rank file{'s' if len(r['files']) != 1 else ''})"
        )
    else:
        fmt = f"Hugging Face safetensors ({len(r['files'])} file{'s' if len(r['files']) != 1 else ''})"
    line("checkpoint", r["path"])
    line("format", fmt)
    line("architecture", f"{r['architecture']} (model_type {r['model_type']})")
    if r["experts"]:
        line(
            "layers",
            f"{r['num_layers']} (dense: {compact_ranges(r['dense_layers'])}; MoE: {compact_ranges(r['moe_layers'])})",
        )
    else:
        line("layers", f"{r['num_layers']} (all dense, no routed experts)")
    if r["extra_layers"]:
        note = (
            f"; num_nextn_predict_layers={r['num_nextn_predict_layers']} (multi-token prediction)"
            if r.get("num_nextn_predict_layers")
            else ""
        )
        line(
            "extra layers",
            f"{compact_ranges(r['extra_layers'])} stored beyond num_hidden_layers "
            f"({human_count(r['params_extra_layers'])} params, counted below){note}",
        )
    if r["experts"]:
        line("experts", f"{r['experts']} routed, top-{r['top_k']}, {r['shared_experts'] or 0} shared")
        routing = ", ".join(
            k if v is True and k == "e_score_correction_bias" else f"{k}={v}" for k, v in r["routing"].items()
        )
        line("routing", routing or "-")
    a = r["attention"]
    if a["kind"] == "MLA":
        line(
            "attention",
            f"{a['summary']}, kv_lora_rank={a['kv_lora_rank']}, {a['num_heads']} heads, "
            f"qk_nope/qk_rope/v head dims "
            f"{a['qk_nope_head_dim']}/{a['qk_rope_head_dim']}/{a['v_head_dim']}",
        )
    else:
        line(
            "attention",
            f"{a['kind']}, {a['num_heads']} heads, {a['num_key_value_heads']} kv heads, head dim {a['head_dim']}",
        )
    line("hidden size", r["hidden_size"])
    line("vocab", f"{r['vocab_size']} ({'tied' if r['tie_word_embeddings'] else 'untied'} embeddings / lm_head)")
    total = r["params_total"]
    line("parameters", f"{human_count(total)} params ({total:,})")
    if r["experts"]:
        line("  experts", f"{human_count(r['params_experts'])} in routed experts ({_pct(r['params_experts'], total)})")
        line(
            "  the rest",
            f"{human_count(r['params_other'])} ({_pct(r['params_other'], total)}): attention, "
            f"dense/shared MLPs, router, norms, embeddings",
        )
        if r["params_active_estimate"] is not None:
            line(
                "  active",
                f"~{human_count(r['params_active_estimate'])} per token (top-{r['top_k']} of "
                f"{r['experts']} routed experts plus the rest)",
            )
    line("on disk", f"{human_bytes(r['bytes_on_disk'])} ({r['bytes_on_disk']:,} bytes, {r['num_tensors']} tensors)")
    line("dtypes", ", ".join(f"{d} ({_pct(n, total)})" for d, n in r["dtypes"].items()) or "-")
    if r.get("quantization"):
        q = r["quantization"]
        line("quantization", ", ".join(f"{k}={v}" for k, v in q.items()) if isinstance(q, dict) else q)
    for w in r.get("warnings", []):
        line("warning", w)

    if r["plan"] is None:
        line("tp sizes", r["plan_error"])
        return "\n".join(lines)
    line("plan", r["plan"])
    lines.append("tp sizes       (per-rank weights: an estimate, split tensors / tp + replicated tensors, fp8 as bf16)")
    est = {int(k): v for k, v in r["per_rank_bytes_estimate"].items()}  # int keys, or str after a JSON round trip
    rows = []
    for tp in r["tp"]["valid"]:
        rows.append((f"tp={tp}", "valid   " + (f"~{human_bytes(est[int(tp)])} per rank" if int(tp) in est else "")))
    by_reason: dict[str, list[int]] = {}
    for tp, reason in r["tp"]["invalid"].items():
        by_reason.setdefault(reason, []).append(int(tp))
    for reason, tps in sorted(by_reason.items(), key=lambda kv: min(kv[1])):
        rows.append((f"tp={compact_ranges(tps)}", f"invalid: {reason}"))
    width = max(len(label) for label, _ in rows) if rows else 0
    lines.extend(f"  {label:<{width}}  {text}" for label, text in rows)
    return "\n".join(lines)
