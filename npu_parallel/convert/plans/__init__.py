"""One file per model family, each defining a module-level ``PLAN``; every module here is found and registered.

Adding a model family is adding one file here (see README.md, "Adding a model family").
"""

from __future__ import annotations

import importlib
import pkgutil

from npu_parallel.convert.plan import Plan, config_value


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


def all_plans() -> tuple[Plan, ...]:
    return PLANS


def supported_model_types() -> list[str]:
    return sorted(t for p in PLANS for t in p.model_types)


def plan_for(config: object) -> Plan:
    """The plan of ``config.model_type``; a ValueError listing the supported types otherwise."""
    model_type = config_value(config, "model_type")
    for plan in PLANS:
        if model_type in plan.model_types:
            return plan
    archs = config_value(config, "architectures") or [type(config).__name__]
    raise ValueError(
        f"no parallel plan for model_type={model_type!r} ({', '.join(archs)}); supported: "
        f"{', '.join(supported_model_types())}. See README.md, section 'Adding a model family'."
    )
