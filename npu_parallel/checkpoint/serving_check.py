"""``npu-parallel inspect --serving DIR``: what a serving engine (vLLM, SGLang) would miss in a Hugging Face folder.

Each finding is ``{"level": "error" | "warning" | "ok", "what": ..., "fix": ...}``: an error is something vLLM
refuses or gets wrong (no tokenizer, no chat template for chat requests, a quantization_config over weights
that are not quantized, an end of turn it does not stop on, missing remote code), a warning something it
guesses (no dtype, no generation_config.json). Only config files and safetensors headers are read.
"""

from __future__ import annotations

import json
from pathlib import Path

from npu_parallel.checkpoint.fp8 import SCALE_SUFFIX
from npu_parallel.checkpoint.hf_source import INDEX_FILE
from npu_parallel.checkpoint.manifest import GENERATION_CONFIG, MANIFEST
from npu_parallel.checkpoint.safetensors_io import CheckpointError, read_header
from npu_parallel.checkpoint.serving_files import chat_template_of, end_of_turn_ids, load_tokenizer

ST_TORCH = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _finding(level: str, what: str, fix: str = "") -> dict:
    return {"level": level, "what": what, "fix": fix}


def _headers(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        for name, t in read_header(f).items():
            out[name] = (t.dtype, tuple(t.shape))
    return out


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def _weights(folder: Path, config: dict, tensors: dict) -> list[dict]:
    out = []
    quant = config.get("quantization_config")
    fp8 = any(d.startswith("F8") for d, _ in tensors.values())
    scales = any(n.endswith(SCALE_SUFFIX) for n in tensors)
    if quant is not None and not (fp8 or scales):
        out.append(
            _finding(
                "error",
                f"config.json has a quantization_config ({(quant or {}).get('quant_method')!r}) but no tensor is "
                f"quantized: vLLM would load these weights as fp8 blocks and fail or serve garbage",
                "delete quantization_config from config.json (npu-parallel merge writes none after dequantizing)",
            )
        )
    elif quant is not None:
        out.append(_finding("ok", f"quantized weights with their quantization_config ({quant.get('quant_method')})"))
    floats: dict[str, int] = {}
    for d, shape in tensors.values():
        if d in ST_TORCH:
            n = 1
            for s in shape:
                n *= s
            floats[ST_TORCH[d]] = floats.get(ST_TORCH[d], 0) + n
    stored = max(floats, key=floats.__getitem__) if floats else None
    named = config.get("torch_dtype") or config.get("dtype")
    if named is None:
        out.append(
            _finding(
                "warning",
                f"config.json names no torch_dtype; vLLM then picks one itself (weights are {stored})",
                f'add "torch_dtype": "{stored}" to config.json',
            )
        )
    elif stored is not None and named != stored and not fp8:
        out.append(
            _finding(
                "warning",
                f"config.json says torch_dtype {named} but the weights are stored in {stored}: vLLM casts to {named}",
                f'set "torch_dtype": "{stored}" (or merge with --dtype {named})',
            )
        )
    else:
        out.append(_finding("ok", f"dtype {named}"))
    mtp = int(config.get("num_nextn_predict_layers") or 0)
    layers = int(config.get("num_hidden_layers") or 0)
    if mtp:
        have = {n for n in tensors if n.startswith(f"model.layers.{layers}.")}
        if not have:
            out.append(
                _finding(
                    "warning",
                    f"num_nextn_predict_layers={mtp} but no model.layers.{layers}.* (MTP) weights: vLLM's MTP "
                    f"speculative decoding has nothing to load",
                    "merge from a checkpoint that kept the MTP layers, or set num_nextn_predict_layers to 0",
                )
            )
        else:
            out.append(_finding("ok", f"{mtp} MTP layer(s) stored ({len(have)} tensors)"))
    return out


def _remote_code(folder: Path, config: dict) -> list[dict]:
    auto_map = config.get("auto_map")
    if not auto_map:
        return []
    modules = {str(v).split("--")[-1].rsplit(".", 1)[0] for v in auto_map.values() if isinstance(v, str)}
    missing = sorted(m for m in modules if not (folder / f"{m}.py").is_file())
    if missing:
        return [
            _finding(
                "error",
                f"config.json's auto_map names {', '.join(m + '.py' for m in missing)}, not in the folder",
                "copy the model's own code files beside config.json",
            )
        ]
    return [
        _finding(
            "warning",
            f"remote code ({', '.join(sorted(m + '.py' for m in modules))}): vLLM needs --trust-remote-code "
            f"unless it implements {config.get('architectures')}",
        )
    ]


def _tokenizer(folder: Path, config: dict) -> list[dict]:
    tok = load_tokenizer(folder)
    if tok is None:
        return [
            _finding(
                "error",
                "no tokenizer loads from the folder (tokenizer.json / tokenizer.model and tokenizer_config.json)",
                "copy the base model's tokenizer files in (npu-parallel merge --tokenizer DIR)",
            )
        ]
    out = [_finding("ok", f"tokenizer {type(tok).__name__}, {len(tok)} tokens")]
    template = chat_template_of(tok)
    if template is None:
        out.append(
            _finding(
                "error",
                "no chat template: vLLM refuses chat requests (/v1/chat/completions)",
                "add chat_template.jinja (npu-parallel merge writes the training template)",
            )
        )
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        out.append(
            _finding(
                "warning",
                f"no {GENERATION_CONFIG}: vLLM stops on the tokenizer's eos only and uses no default sampling",
                "merge again (npu-parallel merge writes it) or save a GenerationConfig",
            )
        )
        eos = _ids(config.get("eos_token_id")) + _ids(tok.eos_token_id)
    else:
        gen = json.loads(path.read_text())
        eos = _ids(gen.get("eos_token_id"))
        if not eos:
            out.append(_finding("error", f"{GENERATION_CONFIG} has no eos_token_id", "set eos_token_id"))
    if template is not None:
        ends = end_of_turn_ids(tok, template)
        missed = [i for i in ends if i not in eos]
        if missed:
            names = ", ".join(repr(tok.convert_ids_to_tokens(i)) for i in missed)
            out.append(
                _finding(
                    "error",
                    f"the chat template closes a turn with {names} (id {', '.join(map(str, missed))}), not among the "
                    f"eos ids {eos}: generation runs on past the end of the reply",
                    f"add it to eos_token_id in {GENERATION_CONFIG}",
                )
            )
        else:
            out.append(_finding("ok", f"chat template; end of turn {ends or '(none found)'} within eos {eos}"))
    return out


def serving_report(folder: str | Path) -> list[dict]:
    """The findings for a Hugging Face folder; a CheckpointError for something that is not one."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        raise CheckpointError(
            f"{folder}: is an npu-parallel sharded checkpoint; merge it first (npu-parallel merge {folder} --out DIR)"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: no readable config.json ({exc}); pass a Hugging Face model folder") from None
    tensors = _headers(folder)
    if not tensors:
        raise CheckpointError(f"{folder}: holds no *.safetensors weights; pass a Hugging Face model folder")
    findings = []
    if not (folder / INDEX_FILE).is_file() and len(list(folder.glob("*.safetensors"))) > 1:
        findings.append(_finding("error", f"several safetensors files but no {INDEX_FILE}", "write the index"))
    findings += _weights(folder, config, tensors) + _remote_code(folder, config) + _tokenizer(folder, config)
    return findings


def format_serving(findings: list[dict]) -> str:
    """One line per finding, problems first; the last line counts them."""
    order = {"error": 0, "warning": 1, "ok": 2}
    lines = []
    for f in sorted(findings, key=lambda f: order[f["level"]]):
        lines.append(f"{f['level'].upper():<8}{f['what']}" + (f" (fix: {f['fix']})" if f["fix"] else ""))
    errors = sum(f["level"] == "error" for f in findings)
    warnings = sum(f["level"] == "warning" for f in findings)
    lines.append(f"serving: {errors} error(s), {warnings} warning(s)" + (" - ready to serve" if not errors else ""))
    return "\n".join(lines)
