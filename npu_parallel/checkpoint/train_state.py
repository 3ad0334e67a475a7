"""Training state (optimizer, scheduler, RNG) as one safetensors file per rank: tensors plus a JSON tree.

No pickle anywhere: loading a checkpoint someone handed you must never run code. ``encode`` splits a nested
state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) into named tensors and a JSON tree that
points at them; the tree travels in the safetensors header's ``__metadata__``. ``decode`` rebuilds exactly
those types and nothing else, so a crafted file can at worst fail to load.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from npu_parallel.checkpoint.safetensors_io import ST_DTYPES, CheckpointError, SafetensorsWriter

STATE_FORMAT = "safetensors+json/1"  # manifest ``training.state_format``; the only one ever loaded
META_KEY = "npu_parallel.train_state"
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")


def encode(obj, tensors: dict[str, torch.Tensor], where: str = "state"):
    """``obj`` as JSON with tensors moved into ``tensors`` (named ``t<N>``); a CheckpointError for other types."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dtype not in ST_DTYPES:
            raise CheckpointError(f"training state: {where} is a {obj.dtype} tensor, which safetensors cannot hold")
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        pairs = [[encode(k, tensors, where), encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]
        return {"__dict__": pairs}
    kind = type(obj)
    if kind.__module__ == "numpy":
        if hasattr(obj, "tolist") and hasattr(obj, "shape") and obj.shape != ():
            return {"__ndarray__": {"dtype": str(obj.dtype), "data": obj.tolist()}}
        return encode(obj.item(), tensors, where)  # numpy scalar
    raise CheckpointError(
        f"training state: {where} is a {kind.__module__}.{kind.__qualname__}, which is saved only as tensors, "
        f"numbers, strings, lists and dicts (never pickled)"
    )


def decode(tree, tensors: dict[str, torch.Tensor]):
    """Inverse of :func:`encode`; builds only containers, primitives, tensors and numpy arrays."""
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        raise CheckpointError(f"training state: unexpected {type(tree).__name__} in the JSON tree")
    if len(tree) == 1 and next(iter(tree)) in _MARKERS:
        ((marker, value),) = tree.items()
        if marker == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"training state: tensor {value!r} is named but not stored")
            return tensors[value]
        if marker == "__tuple__" and isinstance(value, list):
            return tuple(decode(v, tensors) for v in value)
        if marker == "__dict__" and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
            return {decode(k, tensors): decode(v, tensors) for k, v in value}
        if marker == "__ndarray__" and isinstance(value, dict):
            import numpy as np

            return np.array(value["data"], dtype=np.dtype(str(value["dtype"])))
        raise CheckpointError(f"training state: malformed {marker} entry")
    return {k: decode(v, tensors) for k, v in tree.items()}


def write_state(path: Path, state: dict) -> dict:
    """Write ``state`` to ``path``; returns its manifest entry (sha256, bytes)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(encode(state, tensors), separators=(",", ":"))
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with SafetensorsWriter(path, entries, {"format": "pt", META_KEY: tree}) as w:
        for k, t in tensors.items():
            w.write(k, t)
        digest = w.close()
    return {"sha256": digest, "bytes": path.stat().st_size}


def read_state(path: Path) -> dict:
    """The state written by :func:`write_state` (tensors on the CPU); the caller has checked the sha256."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable training-state file ({exc})") from None
    if META_KEY not in meta:
        raise CheckpointError(f"{path}: not an npu-parallel training-state file (no {META_KEY} metadata)")
    try:
        state = decode(json.loads(meta[META_KEY]), tensors)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt training state ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt training state (not a mapping)")
    return state


def rng_state(device: torch.device) -> dict:
    """Every RNG a training step draws from: Python, torch (CPU and device), numpy when installed."""
    out = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        out["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if device.type in ("cuda", "npu"):
        out["device"] = getattr(torch, device.type).get_rng_state(device)
    return out


def set_rng_state(saved: dict, device: torch.device) -> None:
    random.setstate(saved["python"])
    torch.set_rng_state(saved["torch"].cpu())
    if "numpy" in saved:
        import numpy as np

        np.random.set_state(saved["numpy"])
    if "device" in saved and device.type in ("cuda", "npu"):
        getattr(torch, device.type).set_rng_state(saved["device"].cpu(), device)
