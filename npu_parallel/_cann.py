"""Recognise "torch_npu is installed but CANN's environment is not loaded" in an import error (no torch import here).

torch imports torch_npu through its ``torch.backends`` entry point ("Failed to load the backend extension:
torch_npu"), and transformers' ``is_torch_npu_available()`` imports it unguarded: without CANN's
``set_env.sh`` sourced, ``import torch`` (or transformers) fails on a machine that has torch_npu installed.
"""

from __future__ import annotations

SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
BACKEND_FAILED = "Failed to load the backend extension: torch_npu"  # torch's own message
# shared libraries of CANN (and torch_npu's, which links them) that an import fails to load without set_env.sh
_LIBRARIES = (
    "libhccl", "libascend", "libacl", "libge_", "libgraph", "libruntime", "libopapi", "libtorch_npu", "libc_sec"
)  # fmt: skip


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def cann_not_sourced(exc: BaseException) -> str | None:
    """The one-line explanation when ``exc`` is torch_npu failing to load for want of CANN, else None."""
    chain = list(_chain(exc))
    backend = any(BACKEND_FAILED in str(e) for e in chain)
    library = any(isinstance(e, (ImportError, OSError)) and any(m in str(e) for m in _LIBRARIES) for e in chain)
    if not (backend or library):
        return None
    root = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
    return (
        f"torch_npu is installed but CANN is not sourced ({root}): run `source {SET_ENV}` (your CANN toolkit's "
        "set_env.sh) in this shell first; to use this machine without the NPU, `pip uninstall torch_npu`"
    )
