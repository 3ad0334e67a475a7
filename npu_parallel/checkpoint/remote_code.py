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
    return remote_rule(path, raw, trust_remote_code)


def remote_rule(where: str | Path, raw: Any, trust_remote_code: bool | None = None) -> bool:
    """The rule of the module docstring applied to a config dict (``config.json``, or a sharded manifest's)."""
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    if not isinstance(auto_map, dict) or "AutoModelForCausalLM" not in auto_map:
        return False
    trusted = trust_from_env(trust_remote_code)
    model_type = raw.get("model_type")
    if has_native_class(model_type):
        if not trusted and str(where) not in _warned and os.environ.get("RANK", "0") == "0":  # once, on rank 0
            _warned.add(str(where))
            logger.warning(
                "%s: model_type %r has transformers' own class, used instead of the checkpoint's code (%s); "
                "pass trust_remote_code=True (CLI: --trust_remote_code) to run the checkpoint's code",
                where,
                model_type,
                auto_map["AutoModelForCausalLM"],
            )
        return trusted
    if not trusted:
        raise RemoteCodeError(
            f"{where}: model_type {model_type!r} has no class in transformers; the checkpoint's own code "
            f"({auto_map['AutoModelForCausalLM']}) runs only with trust_remote_code=True "
            f"(CLI: --trust_remote_code); read that code first"
        )
    return True


def code_files(folder: str | Path, auto_map: Any) -> list[str]:
    """The ``*.py`` files of ``folder`` the ``auto_map`` names, plus the local modules they import (recursively).

    A module named but absent (or code in another repository, ``repo--module.Class``) is left out: the caller
    decides whether that is an error.
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = Path(folder)
    refs: list[str] = []
    for value in (auto_map or {}).values() if isinstance(auto_map, dict) else ():
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    names: set[str] = set()
    for ref in refs:
        if "--" in ref:
            continue
        path = folder / (ref.rpartition(".")[0] + ".py")
        if path.is_file():
            names.add(path.name)
            names.update(Path(f).name for f in get_relative_import_files(str(path)))
    return sorted(n for n in names if (folder / n).is_file())


def model_code(model: Any, source_path: str | None) -> tuple[Path, list[str]] | None:
    """Where a live model's own code is (folder, file names), for save_sharded to keep with its weights.

    A model built from its checkpoint's code: the folder transformers imported that code from; else (a
    transformers class, the config still mapping to code) the Hugging Face folder it came from, if it has
    the files. None when the config has no ``auto_map``.
    """
    import sys

    auto_map = getattr(model.config, "auto_map", None)
    if not isinstance(auto_map, dict):
        return None
    # the class itself, or the one a wrapper (FSDP2's FSDP<cls>) derives from
    remote = next((c for c in type(model).__mro__ if c.__module__.startswith("transformers_modules")), None)
    if remote is not None:
        folder = Path(sys.modules[remote.__module__].__file__ or ".").parent
        names = code_files(folder, auto_map)
        if not names:
            raise RemoteCodeError(f"{folder}: the code of {remote.__name__} is not there any more; cannot save it")
        return folder, names
    if source_path and Path(source_path).is_dir() and (names := code_files(source_path, auto_map)):
        return Path(source_path), names
    return None


def config_from_code(folder: str | Path, cfg: dict) -> Any:
    """The config of ``cfg`` (a config dict with an ``auto_map``) built by the ``AutoConfig`` class of the code
    files in ``folder``; its ``name_or_path`` is ``folder``, where ``from_config`` finds the model class."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cfg = dict(cfg)
    cfg.pop("_name_or_path", None)
    try:
        config_class: Any = get_class_from_dynamic_module(cfg["auto_map"]["AutoConfig"], str(folder))
        config = config_class.from_dict(cfg)
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        raise remote_code_failed(folder, exc) from None
    config._name_or_path = str(folder)
    return config


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
