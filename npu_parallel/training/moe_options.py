"""The trainer's MoE options: router noise and z-loss (:mod:`npu_parallel.moe.gate_options`) and the capacity
of the dropping dispatchers, checked on their own (``check_moe_args``) and turned into the run's ConversionOptions."""

from __future__ import annotations

import math
from typing import Any

from npu_parallel.convert.options import DISPATCHER_OPTIONS, ConversionOptions
from npu_parallel.moe.gate_options import NOISES, GateOptions
from npu_parallel.training.errors import ConfigError

__all__ = ["CAPACITY_IMPLS", "check_moe_args", "conversion_options", "gate_options"]

CAPACITY_IMPLS = ("static", "alltoall_static")  # the dispatchers with fixed-size buffers, which can drop
CAPACITY_FLAGS = DISPATCHER_OPTIONS  # --capacity_factor, --eval_capacity_factor, --min_capacity


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_moe_args(cfg: Any) -> None:
    """The router and capacity flags' rules (ConfigError: the value, the rule, the fix)."""
    _need(
        cfg.router_noise is None or cfg.router_noise in NOISES,
        f"--router_noise {cfg.router_noise!r}: unknown; pass one of {', '.join(NOISES)} (or leave it out)",
    )
    _need(
        math.isfinite(cfg.router_noise_eps) and 0 < cfg.router_noise_eps < 1,
        f"--router_noise_eps {cfg.router_noise_eps}: must lie in (0, 1); DeepSpeed's default is 0.01",
    )
    _need(
        math.isfinite(cfg.router_z_loss) and cfg.router_z_loss >= 0,
        f"--router_z_loss {cfg.router_z_loss}: must be a finite number >= 0 (0: off; ST-MoE uses 0.001)",
    )
    for name in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(cfg, name)
        _need(
            value is None or (math.isfinite(value) and value > 0),
            f"--{name} {value}: must be a number above 0 (e.g. 1.25; leave it out for no dropping)",
        )
    _need(cfg.min_capacity is None or cfg.min_capacity >= 0, f"--min_capacity {cfg.min_capacity}: must be 0 or more")
    given = [f"--{n}" for n in CAPACITY_FLAGS if getattr(cfg, n) is not None]
    _need(
        not given or cfg.moe_impl in CAPACITY_IMPLS,
        f"{given[0] if given else ''} with --moe_impl {cfg.moe_impl}: only {' and '.join(CAPACITY_IMPLS)} have a "
        f"capacity (the others never drop a token); pass --moe_impl static (alltoall_static with --ep_size)",
    )
    _need(
        cfg.min_capacity is None or cfg.capacity_factor is not None or cfg.eval_capacity_factor is not None,
        f"--min_capacity {cfg.min_capacity}: a floor under the capacity, which is dropless without a factor; pass "
        f"--capacity_factor too",
    )


def gate_options(cfg: Any) -> GateOptions | None:
    """The run's router noise and z-loss for the conversion (None: both off); the noise seeded by --seed."""
    if cfg.router_noise is None and not cfg.router_z_loss:
        return None
    return GateOptions(cfg.router_noise, cfg.router_noise_eps, cfg.router_z_loss, cfg.seed)


def conversion_options(cfg: Any) -> ConversionOptions:
    """The run's conversion choices: --moe_impl with the capacity flags, --aux_loss_coef, the gate options."""
    capacity = {n: getattr(cfg, n) for n in CAPACITY_FLAGS}
    return ConversionOptions(cfg.moe_impl, **capacity, aux_loss_coef=cfg.aux_loss_coef, gate_options=gate_options(cfg))
