"""What tests read from the package's registries (dispatchers, families) instead of copying their lists, so a new
dispatcher or family is covered as soon as it registers."""

from __future__ import annotations

from npu_parallel.convert.plans import all_plans
from npu_parallel.moe.dispatchers import implementation, implementations, option_names
from npu_parallel.moe.dispatchers.base import ANY_DEVICE

from .models import VARIANTS


def portable_impls() -> list[str]:
    """Dispatchers inside one tp group that run on any device, in listing order (not the ones "auto" picks only
    on a named device, such as npu: those need its kernels)."""
    names = []
    for name in implementations():
        cls = implementation(name)
        if not cls.cross_group and (not cls.auto_for or ANY_DEVICE in cls.auto_for):
            names.append(name)
    return names


def default_impl() -> str:
    """The dispatcher "auto" picks on any device (inside one tp group)."""
    return next(n for n in portable_impls() if ANY_DEVICE in implementation(n).auto_for)


def other_impls() -> list[str]:
    """The portable dispatchers besides the default one (what "other moe_impl" tests run)."""
    return [n for n in portable_impls() if n != default_impl()]


def impls_taking(option: str) -> list[str]:
    """The dispatchers that take ``option`` (e.g. overlap_shared), in listing order."""
    return [n for n in implementations() if option in option_names(n)]


# a family whose tiny model is named otherwise (DeepSeek-MoE v1: its trust_remote_code tree, from Mixtral's layout)
TINY_FOR = {"deepseek": "deepseek_moe_remote"}


def family_checkpoints() -> list[str]:
    """Every model type the plans support that has a tiny checkpoint of its own name in tests/models.py."""
    return [t for p in all_plans() for t in sorted(p.model_types) if t in VARIANTS]


def uncovered_families() -> list[str]:
    """The plans none of whose model types has a tiny model (by its name or in TINY_FOR)."""
    return [p.name for p in all_plans() if not any(t in VARIANTS or TINY_FOR.get(t) in VARIANTS for t in p.model_types)]
