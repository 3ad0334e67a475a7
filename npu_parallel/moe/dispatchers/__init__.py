"""MoE dispatchers, one module per implementation; every module here is imported, so its classes register.

Adding an implementation is adding one file here that subclasses :class:`Dispatcher` with
``name=``/``order=`` (see ``base.py`` and docs/parallel_layout.md, "Adding an MoE implementation").
"""

from __future__ import annotations

import importlib
import pkgutil

from npu_parallel.moe.dispatchers.base import (
    Dispatcher,
    Routed,
    choices,
    implementation,
    implementations,
    option_names,
    resolve_dispatcher,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Dispatcher", "Routed", "choices", "implementation", "implementations", "option_names", "resolve_dispatcher"]
