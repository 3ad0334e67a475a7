"""Capability probes: does a torch_npu kernel really work in this process (forward, backward, numerics)?

``hasattr(torch_npu, name)`` says a kernel exists, not that it has an autograd formula, accepts our
arguments or computes what its twin computes: torch_npu 2.5.1 has ``npu_moe_token_permute`` without a
backward, and its ``npu_grouped_matmul`` rejects ``group_type=2``. A probe runs a tiny call of the kernel
(a ``check`` that raises on any failure) once per process and name, caches the verdict and, on failure,
warns once naming the kernel, the reason and the torch_npu version; the caller then takes the pure-torch
twin. ``probe_results()`` feeds ``npu-parallel env``.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

import torch

from npu_parallel.parallel import device as _device

__all__ = ["probe", "probe_results", "reset_probes"]

logger = logging.getLogger(__name__)

_results: dict[str, str] = {}  # name -> "ok" | "failed: <reason>"
_lock = threading.Lock()


def _torch_npu_version() -> str:
    module = _device.torch_npu_module()
    return getattr(module, "__version__", "?") if module is not None else "not installed"


def _synchronize(device_type: str) -> None:
    """Wait for the device, so a kernel's asynchronous failure is raised inside the probe, not later."""
    if device_type != "cpu":
        backend = getattr(torch, device_type, None)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()


def probe(name: str, check: Callable[[], None], *, device_type: str) -> bool:
    """Run ``check`` (raises on failure) once per process for ``name``; cached verdict, one warning on failure."""
    with _lock:
        verdict = _results.get(name)
        if verdict is None:
            try:
                check()
                _synchronize(device_type)
                verdict = "ok"
            except Exception as exc:  # any failure means "do not use this kernel here"
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                verdict = f"failed: {reason}"
                warnings.warn(
                    f"{name} failed its capability probe on {device_type} with torch_npu {_torch_npu_version()} "
                    f"({reason}); using the pure-torch implementation instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _results[name] = verdict
            logger.debug("capability probe %s on %s: %s", name, device_type, verdict)
    return verdict == "ok"


def probe_results() -> dict[str, str]:
    """Every probe run in this process: name -> ``"ok"`` or ``"failed: <reason>"``."""
    with _lock:
        return dict(_results)


def reset_probes() -> None:
    """Forget every verdict (tests; a process otherwise probes each kernel once)."""
    with _lock:
        _results.clear()
