"""Streaming safetensors: write a file tensor by tensor (memory bounded by one tensor), read it lazily."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
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

    def __init__(
        self,
        path: str | Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self._order = [name for name, _, _ in entries]
        self._expect = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        header: dict[str, dict] = {}
        offset = 0
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
            raise RuntimeError(
                f"{self.path.name}: expected tensor {self._order[self._next : self._next + 1]}, got {name!r}"
            )
        dtype, shape = self._expect[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"{self.path.name}: {name} is {tensor.dtype} {tuple(tensor.shape)}, header says {dtype} {shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._put(data.data)
        self._next += 1

    def close(self) -> str:
        """Close the file; returns its sha256."""
        if self._next != len(self._order):
            self._file.close()
            raise RuntimeError(f"{self.path.name}: {len(self._order) - self._next} tensors were never written")
        self._file.close()
        return self._sha.hexdigest()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._file.close()


MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    stop: int


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor's dtype, shape and byte range from a safetensors header, checked against the file size."""
    path = Path(path)
    bad = f"{path}: not a readable safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            if n is None or n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{bad} (bad header length); re-download or re-save it")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{bad} (header is not JSON: {exc}); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (header is not a JSON object)")
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(o) for o in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
            out[name] = TensorInfo(str(info["dtype"]), shape, 8 + n + begin, 8 + n + stop)
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{bad} (corrupt header entry for {name}: {exc!r})") from None
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{bad}: {size:,} bytes but its header describes {8 + n + end:,}; the file is "
            f"truncated or corrupt, re-download or re-save it"
        )
    return out


class SafetensorsFile:
    """Reads tensors, or row ranges of them, into memory this process owns.

    Row ranges along dim 0 (and whole tensors) are contiguous bytes: ``readinto`` puts them straight
    into the destination, with no mmap (file pages would count in RSS and parameters would alias the
    file) and no intermediate copy. Other slices go through ``safe_open(...).get_slice`` and are copied.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors = read_header(self.path)
        self._file = open(self.path, "rb")
        self._lazy: safe_open | None = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self.tensors[key]
        if t.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has dtype {t.dtype}, which torch cannot hold")
        return TORCH_DTYPES[t.dtype], t.shape

    def read(
        self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``key`` whole, or rows ``[start, stop)`` of dimension ``dim``; into ``out`` when given."""
        dtype, shape = self.info(key)
        if dim is not None and any(s != 1 for s in shape[:dim]):
            return self._read_strided(key, dim, start, stop, out)
        if dim is not None:  # leading dims of size 1: still one contiguous byte range
            rows = list(shape)
            stop = rows[dim] if stop is None else stop
            rows[dim] = stop - start
            row = nbytes(rows[dim + 1 :], dtype)
            shape = tuple(rows)
        else:
            start, row = 0, 0
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
            raise RuntimeError(f"{key}: destination {out.dtype} {tuple(out.shape)} does not fit {dtype} {shape}")
        size = nbytes(shape, dtype)
        if size:
            self._file.seek(self.tensors[key].start + start * row)
            got = self._file.readinto(out.reshape(-1).view(torch.uint8).numpy().data)
            if got != size:
                raise CheckpointError(
                    f"{self.path}: tensor {key} is cut short ({got} of {size} bytes); the file is truncated"
                )
        return out

    def _read_strided(self, key, dim, start, stop, out):
        if self._lazy is None:
            try:
                self._lazy = safe_open(str(self.path), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from None
        view = self._lazy.get_slice(key)[(slice(None),) * dim + (slice(start, stop),)]
        if out is None:
            out = torch.empty(view.shape, dtype=view.dtype)
        return out.copy_(view)  # never keep a view of the mapped file

    def close(self) -> None:
        self._file.close()
        self._lazy = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()
