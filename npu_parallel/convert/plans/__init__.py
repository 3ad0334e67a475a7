"""One file per model family, each defining a module-level ``PLAN``; every module here is found and registered.

Adding an architecture is adding one file here (see README, "Adding an architecture").
"""

from __future__ import annotations

import importlib
import pkgutil

from npu_parallel.convert.plan import Plan


def _discover() -> tuple[Plan, ...]:
    plans = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        plan = getattr(module, "PLAN", None)
        if not isinstance(plan, Plan):
            raise TypeError(f"{module.__name__} must define PLAN = Plan(...)")
        plans.append(plan)
    seen: dict[str, str] = {}
    for plan in plans:
        for model_type in plan.model_types:
            if model_type in seen:
                raise ValueError(f"model_type {model_type!r} is claimed by both {seen[model_type]} and {plan.name}")
            seen[model_type] = plan.name
    return tuple(plans)


PLANS: tuple[Plan, ...] = _discover()
