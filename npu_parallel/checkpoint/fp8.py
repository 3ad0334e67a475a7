"""FP8 block-scaled checkpoints (DeepSeek-V3/R1 layout), dequantized slice by slice while reading.

A quantized ``W`` ([R, C], ``float8_e4m3fn``) is stored with ``W_scale_inv`` ([ceil(R/b0), ceil(C/b1)],
float32): one scale per b0 x b1 block, edge blocks partial, and ``W ~= fp8.float() * scale`` (DeepSeek's
``weight_dequant``). :func:`dequantize_rows` reads rows ``[start, stop)`` of one dimension of ``W`` and only
the scale blocks that cover them, so a tp or expert split that cuts a block needs nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from npu_parallel.checkpoint.safetensors_io import CheckpointError

SCALE_SUFFIX = "_scale_inv"
SUPPORTED = 'quant_method "fp8" with fmt "e4m3" and a 2-value weight_block_size (DeepSeek-V3/R1 layout)'
# what a dequantized tensor is stored as when the user asks for no dtype (convert, merge)
DEQUANT_DTYPE = torch.bfloat16
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))

# reads rows [start, stop) of dimension dim of a key (dim None: the whole tensor)
RowReader = Callable[[str, "int | None", int, "int | None"], torch.Tensor]


@dataclass(frozen=True)
class BlockFP8:
    """A checkpoint's fp8 quantization: the block shape its scales cover."""

    block: tuple[int, int]


def _get(q, key: str):
    return q.get(key) if isinstance(q, dict) else getattr(q, key, None)


def quantization_of(config, where: str) -> BlockFP8 | None:
    """The checkpoint's quantization (None when it has no ``quantization_config``); a CheckpointError for
    any method other than block-scaled fp8, naming it and what is supported."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    if not isinstance(q, dict) and hasattr(q, "to_dict"):
        q = q.to_dict()
    method, fmt, block = _get(q, "quant_method"), _get(q, "fmt"), _get(q, "weight_block_size")
    if method != "fp8":
        raise CheckpointError(
            f"{where}: quantization_config quant_method={method!r} is not supported; supported: {SUPPORTED}"
        )
    if fmt not in (None, "e4m3"):
        raise CheckpointError(f"{where}: fp8 fmt={fmt!r} is not supported; supported: {SUPPORTED}")
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(
            f"{where}: fp8 weight_block_size={block!r} is not two positive integers; supported: {SUPPORTED}"
        )
    scheme = _get(q, "activation_scheme")
    if scheme not in (None, "dynamic"):
        raise CheckpointError(
            f"{where}: fp8 activation_scheme={scheme!r} is not supported (static activation scales are not "
            f"read); supported: activation_scheme 'dynamic'"
        )
    return BlockFP8((int(block[0]), int(block[1])))


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a [R, C] weight: one entry per (possibly partial) block."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def check_scale(key: str, shape: tuple[int, ...], scale: tuple[int, ...] | None, quant: BlockFP8, where: str) -> None:
    """One-line CheckpointError when fp8 tensor ``key`` has no scale or one of the wrong shape."""
    if len(shape) != 2:
        raise CheckpointError(f"{where}: fp8 tensor {key} has shape {list(shape)}; only 2-D block-scaled weights")
    want = scale_shape(shape, quant.block)
    if scale is None:
        raise CheckpointError(
            f"{where}: fp8 tensor {key} has no {key}{SCALE_SUFFIX}; the checkpoint is incomplete, re-download it"
        )
    if tuple(scale) != want:
        raise CheckpointError(
            f"{where}: {key}{SCALE_SUFFIX} has shape {list(scale)} but {list(shape)} in {list(quant.block)} "
            f"blocks needs {list(want)}; the checkpoint is damaged or its weight_block_size is wrong"
        )


def dequantize_rows(
    read: RowReader, key: str, shape: tuple[int, ...], block: tuple[int, int], dim: int | None, start: int, stop
) -> torch.Tensor:
    """Rows ``[start, stop)`` of dimension ``dim`` of fp8 weight ``key`` (dim None: all), in float32.

    Reads that slice of ``key`` and the scale rows ``[start // b, ceil(stop / b))`` that cover it.
    """
    if dim is None:
        dim, start, stop = 0, 0, shape[0]
    stop = shape[dim] if stop is None else stop
    b = block[dim]
    lo, hi = start // b, -(-stop // b)
    q = read(key, dim, start, stop)  # [rows, C] or [R, cols]: fp8
    s = read(key + SCALE_SUFFIX, dim, lo, hi)  # the covering scale blocks: float32
    s = s.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)  # per element, edges overshoot
    s = s.narrow(dim, start - lo * b, stop - start).narrow(1 - dim, 0, q.shape[1 - dim])
    return q.float() * s


def as_dequantized(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype code, shape)} as loaded: scales consumed, fp8 weights bfloat16."""
    return {
        n: ("BF16" if d.startswith("F8") else d, s) for n, (d, s) in tensors.items() if not n.endswith(SCALE_SUFFIX)
    }


def is_quantized(path) -> bool:
    """Whether the checkpoint folder's config.json declares a quantization_config."""
    try:
        return "quantization_config" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
