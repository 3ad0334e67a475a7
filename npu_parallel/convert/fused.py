"""A converted model's norms and DeepSeek-V2's rotary embedding on the kernel wrappers of ``parallel/kernels.py``.

* RMSNorm: transformers' standard ``*RMSNorm`` modules become :class:`RMSNorm` (same ``weight`` parameter,
  same formula; ``npu_rms_norm`` on an NPU).
* DeepSeek-V2 (transformers' port) computes its rotary embedding in complex64 (``torch.polar``,
  ``view_as_complex``), which torch_npu runs only with ``jit_compile=False``. Its rotary module becomes
  :class:`InterleavedRotaryEmbedding`, real ``[2, B, S, D/2]`` cos/sin tables, and the modelling module's
  ``apply_rotary_emb`` learns to take them: the same product on real pairs (``npu_rotary_mul`` interleaved on
  an NPU). Complex tables, from models that were not converted, still take the original function.

The MLP and expert activations (``npu_swiglu``) are the MLP style's and ``LocalExperts``' own.
Shapes: B batch, S sequence, D rotary head dim, H hidden.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from npu_parallel.parallel import kernels
from npu_parallel.parallel.linear import GradSummedRMSNorm

__all__ = ["InterleavedRotaryEmbedding", "RMSNorm", "use_fused_kernels"]

# rope types whose rotary module rewrites inv_freq during the forward (transformers' dynamic_rope_update)
_DYNAMIC_ROPE = ("dynamic", "longrope")
_REAL_TABLES = "_npu_parallel_real_tables"  # marks our apply_rotary_emb on the modelling module


class RMSNorm(nn.Module):
    """transformers' RMSNorm formula on :func:`kernels.rms_norm`, holding the source module's own ``weight``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight: nn.Parameter = norm.weight  # type: ignore[assignment]
        self.variance_epsilon: float = norm.variance_epsilon  # type: ignore[assignment]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _is_standard_rms_norm(module: nn.Module) -> bool:
    """transformers' ``weight * normalise(x)`` RMSNorm (not Gemma's ``1 + weight``), nothing else inside."""
    name = type(module).__name__
    return (
        name.endswith("RMSNorm")
        and "Gemma" not in name
        and not isinstance(module, (RMSNorm, GradSummedRMSNorm))
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() == 1  # type: ignore[operator]
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and [n for n, _ in module.named_parameters()] == ["weight"]
        and not list(module.children())
    )


class InterleavedRotaryEmbedding(nn.Module):
    """DeepSeek-V2's rotary tables as real ``[2, B, S, D/2]`` (cos, sin) instead of complex ``[B, S, D/2]``.

    Holds the source module (its ``inv_freq`` and ``attention_scaling``); the angles are computed as it
    computes them. Tables past the kernel's ``[-1, 1]`` (``attention_scaling > 1``) get a third, zero plane
    that tells ``apply_rotary_emb`` to keep the twin.
    """

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        inv_freq: torch.Tensor = self.rotary.inv_freq  # type: ignore[assignment]
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)  # [B, S, D/2]
        scaling: float = self.rotary.attention_scaling  # type: ignore[assignment]
        planes = [freqs.cos() * scaling, freqs.sin() * scaling]
        if abs(scaling) > 1:
            planes.append(torch.zeros_like(freqs))
        return torch.stack(planes)


def _real_apply_rotary_emb(original: Callable) -> Callable:
    def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
        if freqs_cis.is_complex():  # a model that was not converted
            return original(xq, xk, freqs_cis)
        cos, sin = freqs_cis[0], freqs_cis[1]  # [B, S, D/2] each
        bounded = freqs_cis.shape[0] == 2
        return (
            kernels.rotary_interleaved(xq, cos, sin, bounded=bounded),
            kernels.rotary_interleaved(xk, cos, sin, bounded=bounded),
        )

    setattr(apply_rotary_emb, _REAL_TABLES, True)
    apply_rotary_emb.__wrapped__ = original  # type: ignore[attr-defined]
    return apply_rotary_emb


def _use_real_rotary(model: nn.Module) -> bool:
    """Swap a complex DeepSeek-V2 rotary module for the real one; True when one was swapped."""
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or type(rotary).__name__ != "DeepseekV2RotaryEmbedding":
        return False
    modeling = sys.modules[type(rotary).__module__]
    original = getattr(modeling, "apply_rotary_emb", None)
    if original is None or getattr(rotary, "rope_type", "default") in _DYNAMIC_ROPE:
        return False  # upstream remote code (real rotary already), or inv_freq that changes per forward
    if not getattr(original, _REAL_TABLES, False):
        setattr(modeling, "apply_rotary_emb", _real_apply_rotary_emb(original))  # noqa: B010 (mypy: a module)
    setattr(inner, "rotary_emb", InterleavedRotaryEmbedding(rotary))  # noqa: B010
    return True


def use_fused_kernels(model: nn.Module) -> None:
    """Put the model's standard RMSNorms and DeepSeek-V2's rotary on the kernel wrappers, in place."""
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if _is_standard_rms_norm(child):
                setattr(parent, name, RMSNorm(child))
    _use_real_rotary(model)
