"""Whether a checkpoint's own code (``auto_map`` + ``modeling_*.py``, how DeepSeek publishes) runs: opt-in only.

The rule, for a ``config.json`` with an ``auto_map``:

- its ``model_type`` has a transformers class (``deepseek_v2``/``deepseek_v3`` on releases that have them):
  transformers' class is used, as transformers itself does, unless ``trust_remote_code=True`` asks for the
  checkpoint's code (which, for DeepSeek-V2, trains with its own auxiliary loss; transformers' class has none);
- it has none (DeepSeek-MoE 16B, ``model_type: deepseek``): the checkpoint's code runs only with
  ``trust_remote_code=True``, else a :class:`RemoteCodeError` names the flag.

``trust_remote_code=None`` reads ``NPU_PARALLEL_TRUST_REMOTE_CODE`` (``1``/``0``), which the CLI verbs'
``--trust_remote_code`` set so that the ranks they launch inherit the choice; unset means no.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.hf_compat import dtype_kwargs

logger = logging.getLogger(__name__)

ENV = "NPU_PARALLEL_TRUST_REMOTE_CODE"
_warned: set[str] = set()


class RemoteCodeError(CheckpointError):
    """The checkpoint needs its own code and the user did not allow it, or that code cannot run here."""


def trust_from_env(trust_remote_code: bool | None) -> bool:
    """The explicit choice, else ``NPU_PARALLEL_TRUST_REMOTE_CODE=1``; never on by default."""
    if trust_remote_code is not None:
        return bool(trust_remote_code)
    return os.environ.get(ENV, "0").strip().lower() in ("1", "true", "yes")


def has_native_class(model_type: str | None) -> bool:
    """Whether this transformers release has its own classes for ``model_type``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def use_remote_code(path: str | Path, trust_remote_code: bool | None = None) -> bool:
    """Whether the folder's model is built from its own code (see the module docstring for the rule)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # load_config reports the unreadable file
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    if not isinstance(auto_map, dict) or "AutoModelForCausalLM" not in auto_map:
        return False
    trusted = trust_from_env(trust_remote_code)
    model_type = raw.get("model_type")
    if has_native_class(model_type):
        if not trusted and str(path) not in _warned and os.environ.get("RANK", "0") == "0":  # once, on rank 0
            _warned.add(str(path))
            logger.warning(
                "%s: model_type %r has transformers' own class, used instead of the checkpoint's code (%s); "
                "pass trust_remote_code=True (CLI: --trust_remote_code) to run the checkpoint's code",
                path,
                model_type,
                auto_map["AutoModelForCausalLM"],
            )
        return trusted
    if not trusted:
        raise RemoteCodeError(
            f"{path}: model_type {model_type!r} has no class in transformers; the checkpoint's own code "
            f"({auto_map['AutoModelForCausalLM']}) runs only with trust_remote_code=True "
            f"(CLI: --trust_remote_code); read that code first"
        )
    return True


def remote_code_failed(path: str | Path, exc: Exception) -> RemoteCodeError:
    """The checkpoint's code does not import or build under this transformers release: say so in one line."""
    import transformers

    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return RemoteCodeError(
        f"{path}: the checkpoint's own code fails under transformers {transformers.__version__} "
        f"({type(exc).__name__}: {first}); DeepSeek's published code runs under transformers 4.51-4.57"
    )


def load_hf_model(path: str | Path, dtype: Any = None, trust_remote_code: bool | None = None, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` (the unconverted reference), remote code by the rule above."""
    from transformers import AutoModelForCausalLM

    remote = use_remote_code(path, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=remote, **dtype_kwargs(dtype), **kwargs
        )
    except (ImportError, AttributeError, TypeError) as exc:
        if remote:
            raise remote_code_failed(path, exc) from None
        raise
