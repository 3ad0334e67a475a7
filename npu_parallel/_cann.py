"""Recognise "torch_npu is installed but CANN's environment is not loaded" in an import error (no torch import here).

torch imports torch_npu through its ``torch.backends`` entry point ("Failed to load the backend extension:
torch_npu"), and transformers' ``is_torch_npu_available()`` imports it unguarded: without CANN's
``set_env.sh`` sourced, ``import torch`` (or transformers) fails on a machine that has torch_npu installed.
"""

from __future__ import annotations

SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
_MARKERS = ("torch_npu", "libhccl", "libascend", "libacl", "libge_runner", "libgraph", "libruntime", "ascend")


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def cann_not_sourced(exc: BaseException) -> str | None:
    """The one-line explanation when ``exc`` is torch_npu failing to load for want of CANN, else None."""
    chain = list(_chain(exc))
    text = " | ".join(str(e) for e in chain).lower()
    names = " ".join(getattr(e, "name", None) or "" for e in chain)
    if not any(m in text for m in _MARKERS) and "torch_npu" not in names:
        return None
    root = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
    return (
        f"torch_npu is installed but CANN is not sourced ({root}): run `source {SET_ENV}` (your CANN toolkit's "
        "set_env.sh) in this shell first; to use this machine without the NPU, `pip uninstall torch_npu`"
    )
