"""Streaming safetensors: write a file tensor by tensor (memory bounded by one tensor), read it lazily."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        ST_DTYPES[getattr(torch, _name)] = _code
TORCH_DTYPES = {code: dtype for dtype, code in ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file or tensor and the fix."""


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Writes the header for all ``entries`` up front, then each tensor's bytes in that order."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = [name for name, _, _ in entries]
        self._expect = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for name, dtype, shape in entries:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._sha = hashlib.sha256()
        self._file = open(self.path, "wb")
        self._put(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _put(self, data) -> None:
        self._file.write(data)
        self._sha.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"{self.path.name}: expected tensor {self._order[self._next:self._next + 1]}, got {name!r}")
        dtype, shape = self._expect[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{self.path.name}: {name} is {tensor.dtype} {tuple(tensor.shape)}, header says {dtype} {shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._put(memoryview(data))
        self._next += 1

    def close(self) -> str:
        """Close the file; returns its sha256."""
        if self._next != len(self._order):
            self._file.close()
            raise RuntimeError(f"{self.path.name}: {len(self._order) - self._next} tensors were never written")
        self._file.close()
        return self._sha.hexdigest()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._file.close()


def open_safetensors(path: str | Path):
    """``safe_open`` that names the file when it is missing, truncated or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); re-download or re-save it") from None


def read_range(handle, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """``key`` whole, or rows ``[start, stop)`` of dimension ``dim``, reading only those bytes."""
    if dim is None:
        return handle.get_tensor(key)
    sl = handle.get_slice(key)
    index = (slice(None),) * dim + (slice(start, stop),)
    return sl[index]


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()
