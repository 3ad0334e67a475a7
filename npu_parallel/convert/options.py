"""ConversionOptions: the choices of a conversion in one frozen object, from the entry point to the plan and the
dispatcher.

``convert_model``, ``load_pretrained`` and ``load_sharded`` take ``options=ConversionOptions(...)``, or the same
choices as keywords; :func:`fold_options` makes one object of them where they enter (a keyword that contradicts a
field the options set is a ValueError). Inside, only the object travels. ``trust_remote_code`` is not one of them:
it decides how a checkpoint is read, not how the model is converted, so it stays a keyword of the load functions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from npu_parallel.moe.balance import check_coefficient
from npu_parallel.moe.dispatchers import Dispatcher, choices, resolve_dispatcher
from npu_parallel.moe.dispatchers.base import AUTO
from npu_parallel.moe.gate_options import GateOptions

__all__ = ["DISPATCHER_OPTIONS", "ConversionOptions", "fold_options"]

# the fields that are options of the dispatcher (the dropping ones', static and alltoall_static)
DISPATCHER_OPTIONS = ("capacity_factor", "eval_capacity_factor", "min_capacity")


@dataclass(frozen=True)
class ConversionOptions:
    """How a model is converted: its MoE implementation and that implementation's options, the load-balancing
    coefficient, and the gate options. Checked when made (ValueError naming the value, the rule and the fix)."""

    moe_impl: str | Dispatcher = AUTO  # a registered name, "auto" (resolved once, at conversion) or a Dispatcher
    capacity_factor: float | None = None  # static, alltoall_static: rows per expert ~ factor * T*k/E (None: dropless)
    eval_capacity_factor: float | None = None  # the factor in eval mode (None: capacity_factor)
    min_capacity: int | None = None  # a floor under the capacity, in token slots per expert
    aux_loss_coef: float | None = None  # the family's load-balancing coefficient (None: the config's; 0: off)
    gate_options: GateOptions | None = None  # router noise and z-loss, train mode only (None: off)

    def __post_init__(self) -> None:
        if not isinstance(self.moe_impl, str | Dispatcher):
            raise ValueError(f"moe_impl={self.moe_impl!r}: must be one of {choices()} or a Dispatcher instance")
        given = self.dispatcher_options()
        if given or (isinstance(self.moe_impl, str) and self.moe_impl not in choices()):
            # the registry's own checks: the name, which implementation takes each option, each value's range (a
            # name alone builds nothing here: "npu" needs torch_npu, which the conversion's device decides)
            resolve_dispatcher(self.moe_impl, "meta", **given)
        if self.aux_loss_coef is not None:
            check_coefficient(self.aux_loss_coef)
        if self.gate_options is not None:
            if not isinstance(self.gate_options, GateOptions):
                raise ValueError(
                    f"gate_options={self.gate_options!r}: must be a npu_parallel.GateOptions (e.g. "
                    f"GateOptions(noise='jitter')) or None"
                )
            self.gate_options.check()

    def dispatcher_options(self) -> dict[str, Any]:
        """The dispatcher options that are set (capacity_factor, ...), for :func:`resolve_dispatcher`."""
        return {k: getattr(self, k) for k in DISPATCHER_OPTIONS if getattr(self, k) is not None}

    def dispatcher(self, device_type: str, cross_group: bool = False) -> Dispatcher:
        """The dispatcher on ``device_type`` ("auto" decided here; ``cross_group``: ep above tp)."""
        return resolve_dispatcher(self.moe_impl, device_type, cross_group=cross_group, **self.dispatcher_options())


_DEFAULTS = {f.name: f.default for f in fields(ConversionOptions)}


def fold_options(options: ConversionOptions | None = None, **keywords: Any) -> ConversionOptions:
    """One ConversionOptions from an entry point's ``options`` and its keywords (a keyword at its default is not
    given). A keyword fills a field ``options`` leaves at its default; one that contradicts a set field raises."""
    if options is not None and not isinstance(options, ConversionOptions):
        raise ValueError(f"options={options!r}: must be a npu_parallel.ConversionOptions or None")
    unknown = sorted(set(keywords) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"{unknown}: not fields of ConversionOptions ({', '.join(_DEFAULTS)})")
    given = {k: v for k, v in keywords.items() if v is not _DEFAULTS[k] and v != _DEFAULTS[k]}
    if options is None:
        return ConversionOptions(**given)
    changes = {}
    for key, value in given.items():
        mine = getattr(options, key)
        if mine is value or mine == value:
            continue
        if mine is not _DEFAULTS[key] and mine != _DEFAULTS[key]:
            raise ValueError(
                f"{key}={value!r} contradicts options.{key}={mine!r}: give {key} once, as a keyword or in options"
            )
        changes[key] = value
    return replace(options, **changes) if changes else options
