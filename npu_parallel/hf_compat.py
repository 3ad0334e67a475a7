"""The transformers releases npu_parallel supports, and the few calls whose spelling changed between them.

Tested: transformers 4.51 (the first with ``AttentionInterface``) through 5.x (``make test`` runs 5.x,
``make test-compat`` 4.51 and 4.57). Every layer may import this module; it imports only transformers.
"""

from __future__ import annotations

import re
from typing import Any

import transformers

MIN_TRANSFORMERS = (4, 51)
BELOW_TRANSFORMERS = (6, 0)
SUPPORTED = "transformers>=4.51,<6"


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(re.match(r"\d*", minor).group() or 0)  # type: ignore[union-attr]


TRANSFORMERS = _release(transformers.__version__)


def unsupported_transformers(version: str = transformers.__version__) -> str | None:
    """Why this transformers release is outside the supported range (one line with the fix), or None."""
    if MIN_TRANSFORMERS <= _release(version) < BELOW_TRANSFORMERS:
        return None
    return f"transformers {version} is outside the supported range ({SUPPORTED}): pip install '{SUPPORTED}'"


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``from_pretrained``/``from_config``'s dtype keyword: ``dtype`` from 4.56 on, ``torch_dtype`` before."""
    return {"dtype" if TRANSFORMERS >= (4, 56) else "torch_dtype": dtype}


def is_remote_code(model: object) -> bool:
    """Whether the model's class came from a checkpoint's own code (``auto_map``), not from transformers."""
    return type(model).__module__.startswith("transformers_modules")


def set_attn_implementation(model: Any, name: str) -> bool:
    """Switch a transformers model's attention function (4.54+'s method, else the config); False if not possible.

    Remote code picks its attention classes when it builds the model, so switching it later would only make
    its config disagree with its modules: it is left alone.
    """
    if is_remote_code(model):
        return False
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:  # 4.51-4.53: the attention modules read config._attn_implementation at every forward
        model.config._attn_implementation = name
    return True
