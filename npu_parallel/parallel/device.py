"""Which accelerator this process drives (npu > cuda > cpu), its collective backend, and HCCL presets."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}

# Defaults applied on Ascend before the process group exists, never over a value the user exported.
# The first step JIT-compiles for minutes on a large model; HCCL's default 120 s / 1800 s timeouts then
# kill the job with error 107020 while nothing is wrong.
HCCL_DEFAULTS: dict[str, str] = {
    "HCCL_CONNECT_TIMEOUT": "7200",
    "HCCL_EXEC_TIMEOUT": "7200",
    # Caching allocator: smaller split blocks fragment less on long fine-tunes. torch_npu reads only this
    # spelling (no release reads TORCH_NPU_ALLOC_CONF); 2.13+ also read PYTORCH_ALLOC_CONF and refuse both set.
    "PYTORCH_NPU_ALLOC_CONF": "max_split_size_mb:128",
}
# A default is not applied when the user exported one of these instead (torch_npu 2.13+ fails on both).
CONFLICTING = {"PYTORCH_NPU_ALLOC_CONF": ("PYTORCH_ALLOC_CONF",)}
HCCL_REPORTED = tuple(HCCL_DEFAULTS) + (
    "PYTORCH_ALLOC_CONF",
    "HCCL_BUFFSIZE",
    "HCCL_IF_IP",
    "ASCEND_RT_VISIBLE_DEVICES",
    "HCCL_WHITELIST_DISABLE",
)

_torch_npu_checked = False
_torch_npu = None


def torch_npu_module():
    """The imported ``torch_npu`` module, or None when it is not installed (imported at most once)."""
    global _torch_npu_checked, _torch_npu
    if not _torch_npu_checked:
        _torch_npu_checked = True
        if importlib.util.find_spec("torch_npu") is not None:
            try:
                import torch_npu

                _torch_npu = torch_npu
            except Exception as exc:  # a broken CANN install must not break CPU use
                from npu_parallel._cann import cann_not_sourced

                logger.warning("%s", cann_not_sourced(exc) or f"torch_npu is installed but failed to import: {exc}")
    return _torch_npu


def npu_available() -> bool:
    return torch_npu_module() is not None and hasattr(torch, "npu") and torch.npu.is_available()


def device_type() -> str:
    """'npu', 'cuda' or 'cpu', in that order of preference."""
    if npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def device_count(kind: str | None = None) -> int:
    kind = kind or device_type()
    if kind in ("npu", "cuda"):
        return getattr(torch, kind).device_count()  # torch.npu exists only once torch_npu is imported
    return 0


def backend_for(kind: str) -> str:
    return BACKENDS[kind]


def local_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    dev = torch.device(kind, local_rank % max(device_count(kind), 1))
    getattr(torch, kind).set_device(dev)
    return dev


def pending_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The HCCL_DEFAULTS neither exported by the user nor in conflict with what they exported."""
    env = os.environ if environ is None else environ
    return {
        key: value
        for key, value in HCCL_DEFAULTS.items()
        if key not in env and not any(other in env for other in CONFLICTING.get(key, ()))
    }


def apply_hccl_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set HCCL_DEFAULTS that the user did not export (nor a conflicting variable); returns what was set."""
    env = os.environ if environ is None else environ
    applied = pending_defaults(env)
    env.update(applied)
    return applied


def hccl_settings(environ: dict | None = None) -> dict[str, str | None]:
    env = os.environ if environ is None else environ
    return {key: env.get(key) for key in HCCL_REPORTED}


def supports_bf16(kind: str) -> bool:
    if kind == "npu":
        return True
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


@dataclass(frozen=True)
class DeviceInfo:
    kind: str
    backend: str
    count: int
    torch_version: str
    torch_npu_version: str | None


def describe() -> DeviceInfo:
    kind = device_type()
    npu = torch_npu_module()
    return DeviceInfo(
        kind=kind,
        backend=backend_for(kind),
        count=device_count(kind),
        torch_version=torch.__version__,
        torch_npu_version=getattr(npu, "__version__", None) if npu else None,
    )
