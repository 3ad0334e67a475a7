"""Upcycle a dense HF checkpoint into an MoE one (``npu-parallel upcycle``), streamed tensor by tensor.

Each MoE layer's dense FFN is read once (gate, up, down: about three of the largest tensors), every expert is
written from its slices, and the layer is dropped before the next: peak memory stays near the largest tensor
times three plus one expert, never the model. What the output computes at init, and why it equals the dense
model, is in :mod:`npu_parallel.checkpoint.upcycle_spec`.

The router of layer ``l`` is ``normal(0, ROUTER_STD)`` from ``torch.Generator().manual_seed(seed * 1_000_003 + l)``
(``[E/G, H]``, each row repeated for the G chunks of its copy), so a run is reproducible from ``--seed``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from npu_parallel.checkpoint.hf_source import INDEX_FILE, HFSource
from npu_parallel.checkpoint.manifest import (
    GENERATION_CONFIG,
    MARKER,
    MERGED_FORMAT,
    check_output_dir,
    fresh_partial_dir,
    is_tokenizer_file,
    publish,
    write_json,
)
from npu_parallel.checkpoint.offline import ST_METADATA, _shards, _writing
from npu_parallel.checkpoint.safetensors_io import CheckpointError, SafetensorsWriter, nbytes
from npu_parallel.checkpoint.upcycle_spec import (
    EXPERT_KEYS,
    MLP_KEYS,
    SHARED_NAME,
    Request,
    check_request,
    target_config,
)

logger = logging.getLogger(__name__)
_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")
Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


class _DenseFFN:
    """The current layer's dense gate/up/down (read on first use; the previous layer's dropped)."""

    def __init__(self, src: HFSource):
        self.src, self.layer = src, -1
        self.parts: dict[str, torch.Tensor] = {}

    def get(self, layer: int) -> dict[str, torch.Tensor]:
        if layer != self.layer:
            self.parts = {}  # free the previous layer first: peak is one layer's FFN
            self.parts = {p: self.src._read(f"model.layers.{layer}.mlp.{p}.weight") for p in MLP_KEYS}
            self.layer = layer
        return self.parts


def router_rows(req: Request, layer: int, dtype: torch.dtype) -> torch.Tensor:
    """``[E, H]``: ``[E/G, H]`` seeded rows, each repeated G times (the chunks of one copy get equal logits)."""
    gen = torch.Generator().manual_seed(req.seed * 1_000_003 + layer)
    base = torch.randn(req.experts // req.granularity, req.hidden, generator=gen) * req.router_std
    return base.repeat_interleave(req.granularity, dim=0).to(dtype)


def _expert_part(ffn: _DenseFFN, layer: int, part: str, chunk: int, req: Request, scale: float, dtype):
    def read() -> torch.Tensor:
        w = ffn.get(layer)[part]
        lo, hi = chunk * req.chunk, (chunk + 1) * req.chunk
        piece = w[lo:hi] if part != "down_proj" else w[:, lo:hi]
        return (piece.float() * scale).to(dtype) if scale != 1.0 else piece.clone()

    return read


def moe_entries(req: Request, src: HFSource, ffn: _DenseFFN, layer: int) -> list[Entry]:
    """Every tensor of one upcycled layer's MoE block, in the order they are written."""
    names, module = EXPERT_KEYS[req.target]
    prefix = f"model.layers.{layer}.{module}"
    dtype = src.key_info(f"model.layers.{layer}.mlp.gate_proj.weight")[0]
    h, c = req.hidden, req.chunk
    out: list[Entry] = [(f"{prefix}.gate.weight", dtype, (req.experts, h), lambda: router_rows(req, layer, dtype))]
    shapes = {"gate_proj": (c, h), "up_proj": (c, h), "down_proj": (h, c)}
    for e in range(req.experts):
        for part, name in zip(MLP_KEYS, names, strict=True):
            scale = req.down_scale() if part == "down_proj" else 1.0
            read = _expert_part(ffn, layer, part, e % req.granularity, req, scale, dtype)
            out.append((f"{prefix}.experts.{e}.{name}.weight", dtype, shapes[part], read))
    if req.shared:
        whole = {
            "gate_proj": (req.intermediate, h),
            "up_proj": (req.intermediate, h),
            "down_proj": (h, req.intermediate),
        }
        for part in MLP_KEYS:
            scale = req.shared_down_scale() if part == "down_proj" else 1.0

            def read(part=part, scale=scale) -> torch.Tensor:
                w = ffn.get(layer)[part]
                return (w.float() * scale).to(dtype) if scale != 1.0 else w.clone()

            out.append((f"{prefix}.{SHARED_NAME[req.target]}.{part}.weight", dtype, whole[part], read))
        if req.target == "qwen2_moe":  # sigmoid(0) = 1/2 exactly: the shared half of the dense output
            out.append((f"{prefix}.shared_expert_gate.weight", dtype, (1, h), lambda: torch.zeros(1, h, dtype=dtype)))
    return out


def plan_entries(req: Request, src: HFSource) -> list[Entry]:
    """The output's tensors: the source's own, each upcycled layer's MLP replaced by its MoE block."""
    ffn = _DenseFFN(src)
    seen: dict[int, set[str]] = {}
    entries: list[Entry] = []
    for key in sorted(src.file_of, key=_natural):
        m = _MLP.fullmatch(key)
        if m is None or int(m.group(1)) not in req.layers:
            dtype, shape = src.key_info(key)
            entries.append((key, dtype, shape, partial(src._read, key)))
            continue
        layer = int(m.group(1))
        if layer not in seen:
            entries += moe_entries(req, src, ffn, layer)
        seen.setdefault(layer, set()).add(m.group(2))
    for layer in req.layers:
        if seen.get(layer) != set(MLP_KEYS):
            raise CheckpointError(
                f"{src.path}: layer {layer} has no dense MLP (model.layers.{layer}.mlp.gate_proj/up_proj/down_proj."
                f"weight); upcycle needs a dense SwiGLU FFN in each layer it makes MoE"
            )
        parts = {p: src.key_info(f"model.layers.{layer}.mlp.{p}.weight")[1] for p in MLP_KEYS}
        want = {"gate_proj": (req.intermediate, req.hidden), "up_proj": (req.intermediate, req.hidden)}
        want["down_proj"] = (req.hidden, req.intermediate)
        if parts != want:
            raise CheckpointError(
                f"{src.path}: layer {layer}'s MLP is {parts}, but config.json says hidden_size {req.hidden} and "
                f"intermediate_size {req.intermediate}; the config does not belong to these weights"
            )
    return entries


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def upcycle_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    experts: int,
    top_k: int,
    granularity: int = 1,
    layers: str | None = None,
    shared_experts: int | None = None,
    target: str | None = None,
    seed: int = 0,
    norm_topk_prob: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    progress: bool = True,
) -> tuple[Path, Request]:
    """Write the upcycled HF checkpoint to ``out``; returns it and the checked :class:`Request`."""
    from transformers import AutoConfig

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json; pass a Hugging Face checkpoint folder")
    raw = json.loads((src / "config.json").read_text())
    req = check_request(
        raw,
        experts=experts,
        top_k=top_k,
        granularity=granularity,
        layers=layers,
        shared_experts=shared_experts,
        target=target,
        seed=seed,
        norm_topk_prob=norm_topk_prob,
    )
    for note in req.notes:
        logger.warning("not function-preserving: %s", note)
    source = HFSource(src)
    entries = plan_entries(req, source)
    shards = _shards(entries, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    extra = sorted(
        p.name for p in src.iterdir() if p.is_file() and (is_tokenizer_file(p.name) or p.name == GENERATION_CONFIG)
    )
    owned = check_output_dir(out, overwrite, source=src, writes=[*names, INDEX_FILE, "config.json", MARKER, *extra])
    config = AutoConfig.for_model(req.target, **target_config(raw, req))
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    tmp = fresh_partial_dir(out)
    weight_map, total = {}, 0
    with _writing(out) as at:
        bar = tqdm(total=len(entries), desc=f"upcycle -> {req.target}", unit="tensor", disable=not progress)
        with bar:
            for fname, shard in zip(names, shards, strict=True):
                at.path = tmp / fname
                with SafetensorsWriter(at.path, [(k, d, s) for k, d, s, _ in shard], ST_METADATA) as w:
                    for key, dtype, shape, read in shard:
                        w.write(key, read())
                        weight_map[key] = fname
                        total += nbytes(shape, dtype)
                        bar.update()
                    w.close()
        source.close()
        at.path = tmp / INDEX_FILE
        write_json(at.path, {"metadata": {"total_size": total}, "weight_map": weight_map})
        at.path = tmp
        config.save_pretrained(tmp)
        for name in extra:
            at.path = tmp / name
            shutil.copyfile(src / name, at.path)
        written = {p.name: {"bytes": p.stat().st_size} for p in tmp.iterdir()}
        at.path = tmp / MARKER
        write_json(at.path, {
            "format": MERGED_FORMAT, "written_by": "npu-parallel upcycle", "source": str(src.resolve()),
            "tensors": len(entries), "upcycle": describe(req), "files": written,
        })  # fmt: skip
        at.path = out
        publish(tmp, out, owned)
    logger.info("upcycled %s -> %s (%s, E=%d, top_k=%d, G=%d)", src, out, req.target, experts, top_k, granularity)
    return out, req


def describe(req: Request) -> dict:
    """What the marker records about a run (enough to reproduce it)."""
    return {
        "source_type": req.source_type, "target": req.target, "experts": req.experts, "top_k": req.top_k,
        "granularity": req.granularity, "layers": list(req.layers), "shared_experts": req.shared,
        "seed": req.seed, "router_std": req.router_std, "function_preserving": req.exact(), "notes": req.notes,
    }  # fmt: skip
