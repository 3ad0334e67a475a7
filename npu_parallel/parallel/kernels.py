"""torch_npu's fused dense kernels, each behind a capability probe, each with the pure-torch twin other devices run.

``swiglu`` (``npu_swiglu``), ``rms_norm`` (``npu_rms_norm``), ``rotary_interleaved`` (``npu_rotary_mul``,
``rotary_mode="interleave"``) and ``fusion_attention`` (``npu_fusion_attention``, ``Dk >= Dv``). A wrapper
calls the fused kernel when its tensors are on an NPU (or a test installed a stand-in with :func:`use_kernels`),
torch_npu has the kernel and its probe passed: on first use per process the kernel runs forward and backward
on a tiny input and must match the twin (:func:`npu_parallel.parallel.probe.probe`; a failure warns once and
the twin is used from then on). Otherwise the twin, which is the formula the Hugging Face modules compute.
When each is used, and the documentation relied on: ``docs/npu_kernels.md``.

Shapes: B batch, N heads, S sequence, D head dim, I intermediate, H hidden.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from npu_parallel.parallel import device as _device
from npu_parallel.parallel.probe import probe

__all__ = [
    "FUSED_KERNELS",
    "fused",
    "fusion_attention",
    "probe_all",
    "rms_norm",
    "rms_norm_twin",
    "rotary_interleaved",
    "rotary_interleaved_twin",
    "swiglu",
    "swiglu_pair",
    "swiglu_twin",
    "use_kernels",
]

_forced: list[Any] = []  # stand-in kernel modules installed by use_kernels, innermost last


@contextlib.contextmanager
def use_kernels(module: Any) -> Iterator[None]:
    """Route every wrapper through ``module`` (torch_npu's kernel names and signatures) on any device (tests)."""
    _forced.append(module)
    try:
        yield
    finally:
        _forced.pop()


def fused(name: str, device_type: str, variant: str | None = None) -> Any | None:
    """The module whose kernel ``name`` to call for tensors on ``device_type``, or None: use the twin.

    ``variant``: a way of calling the kernel with a probe of its own (``"TND"``: npu_fusion_attention's varlen
    layout), so a release where only that call fails keeps the other.
    """
    check = name if variant is None else f"{name} {variant}"
    if _forced:
        module, label = _forced[-1], f"{check} ({type(_forced[-1]).__name__})"
    elif device_type == "npu":
        module, label = _device.torch_npu_module(), check
    else:
        return None
    if module is None or not hasattr(module, name):
        return None  # a release without the kernel: never tried
    ok = probe(label, functools.partial(_run_check, check, module, device_type), device_type=device_type)
    return module if ok else None


def probe_device(device_type: str) -> torch.device:
    """The device the probes run their tiny inputs on (a test routes an ``npu`` probe to the CPU stand-in)."""
    return torch.device(device_type)


def probe_all(device_type: str) -> dict[str, str]:
    """Run every fused kernel's probe for ``device_type`` now (``npu-parallel env``; verdicts in probe_results);
    returns the kernels this torch_npu does not have, each with that verdict."""
    module = _forced[-1] if _forced else _device.torch_npu_module()
    absent = {}
    for name in FUSED_KERNELS:
        if not hasattr(module, name):
            absent[name] = "absent from this torch_npu (the twin runs)"
        else:
            fused(name, device_type)
            for variant in VARIANTS.get(name, ()):
                fused(name, device_type, variant)
    return absent


def release(module: Any) -> tuple[int, int]:
    """``(major, minor)`` of the torch_npu ``module`` (``(0, 0)`` when it does not say: treated as the oldest)."""
    try:
        major, minor = str(module.__version__).split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return 0, 0


# the first torch_npu whose npu_fusion_attention META kernel shapes the output like the value ([B, N, S, Dv]);
# 2.5.1 and 2.6.0 shape it like the query (Dq), so a traced call with Dk > Dv is mis-shaped there
# (tests/test_npu_wheels.py); eager is right on every release
ATTENTION_META_DV = (2, 7)


def _run_check(name: str, module: Any, device_type: str) -> None:
    # hidden from dispatch modes (an OpAudit would count the comparisons' host syncs as the model's), with grad on
    # (the first use may come under no_grad)
    with _disable_current_modes(), torch.enable_grad():
        _CHECKS[name](module, probe_device(device_type))


# -- the twins -----------------------------------------------------------------------------------------------


def swiglu_twin(h: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for ``h = [a | b]`` split in halves on the last dim: ``[..., 2I] -> [..., I]``."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm_twin(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalised in float32, cast back to ``x``'s dtype, times ``weight``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Pairs ``(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])``: multiplication by ``i`` in complex terms."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., D/2, 2]
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotary_interleaved_twin(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``x * r1 + rotate_interleaved(x) * r2``, npu_rotary_mul's interleave formula (``r1``/``r2`` full width)."""
    return x * r1 + _rotate_interleaved(x) * r2


# -- the wrappers --------------------------------------------------------------------------------------------


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``[..., 2I] -> [..., I]``: ``silu`` of the first half times the second (npu_swiglu's layout)."""
    kernels = fused("npu_swiglu", h.device.type)
    if kernels is None:
        return swiglu_twin(h)
    return kernels.npu_swiglu(h.contiguous(), dim=-1)


def swiglu_pair(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for two separate projections ``[..., I]``: fused, they are concatenated first."""
    kernels = fused("npu_swiglu", gate.device.type)
    if kernels is None:
        return F.silu(gate) * up
    return kernels.npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of ``x [..., H]`` with ``weight [H]``; fused when weight and x share a dtype."""
    kernels = fused("npu_rms_norm", x.device.type) if weight.dtype == x.dtype else None
    if kernels is None:  # a float32 weight on bf16 x promotes the output: the twin keeps that
        return rms_norm_twin(x, weight, eps)
    return kernels.npu_rms_norm(x, weight, epsilon=eps)[0]


def rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, bounded: bool = True) -> torch.Tensor:
    """Rotary embedding on interleaved pairs, in float32, back in ``x``'s dtype.

    ``x [B, N, S, D]``; ``cos``/``sin [B or 1, S, D/2]`` (one angle per pair, scaled or not). Exactly the
    complex product ``(x[2i] + i x[2i+1]) * (cos_i + i sin_i)`` that DeepSeek-V2's ``apply_rotary_emb``
    computes. ``bounded=False``: the tables may leave ``[-1, 1]``, the kernel's documented range (twin).
    """
    r1 = cos.unsqueeze(1).repeat_interleave(2, dim=-1)  # [B or 1, 1, S, D]
    r2 = sin.unsqueeze(1).repeat_interleave(2, dim=-1)
    xf = x.float()
    # the interleave mode (jit_compile=False): 11SD tables for BNSD input, tables in [-1, 1], B*N < 1000, D < 896
    b, n, _, d = x.shape
    ok = r1.shape[0] == 1 and bounded and b * n < 1000 and d < 896
    kernels = fused("npu_rotary_mul", x.device.type) if ok else None
    if kernels is None:
        return rotary_interleaved_twin(xf, r1, r2).type_as(x)
    return kernels.npu_rotary_mul(xf.contiguous(), r1, r2, rotary_mode="interleave").type_as(x)


_CAUSAL_SIDE = 2048  # sparse_mode=2 takes this compressed upper-triangle mask whatever the sequence length


@functools.lru_cache(maxsize=8)
def _causal_mask(device: torch.device) -> torch.Tensor:
    return torch.ones(_CAUSAL_SIDE, _CAUSAL_SIDE, dtype=torch.bool, device=device).triu(1)


def fusion_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scale: float,
    dropout: float = 0.0,
    is_causal: bool = True,
    seq_lens: list[int] | None = None,
) -> torch.Tensor | None:
    """``npu_fusion_attention`` on ``query/key [B, N(kv), S, Dk]``, ``value [B, Nkv, S, Dv]`` (``Dv <= Dk``:
    no padding) -> ``[B, N, S, Dv]``; None when the kernel is not usable here (the caller runs SDPA).

    ``seq_lens``: a packed micro-batch's documents as cumulative ends over the flattened ``B * S`` tokens
    (convert/documents.py): the TND (varlen) layout, causal inside each document, no ``[S, S]`` mask; the
    ``attention_mask`` it comes with (the same block-diagonal mask) is then not read.

    ``attention_mask``: transformers' SDPA mask (bool, True = attend, ``[B or 1, 1, Sq, Skv]``) or None with
    ``is_causal``. Graph mode (``torch.compile``) with ``Dk > Dv`` on torch_npu < 2.7: None (the meta kernel of
    those releases shapes the output like the query).
    """
    if value.shape[-1] > key.shape[-1] or query.shape[-1] != key.shape[-1] or key.shape[-1] > 768:
        return None
    kernels = fused("npu_fusion_attention", query.device.type)
    if kernels is None:
        return None
    if value.shape[-1] < key.shape[-1] and torch.compiler.is_compiling() and release(kernels) < ATTENTION_META_DV:
        return None  # graph mode: this release's meta kernel would give [B, N, S, Dq]; SDPA traces right
    if seq_lens is not None:
        varlen = fused("npu_fusion_attention", query.device.type, "TND")
        if varlen is not None and query.shape[2] == key.shape[2]:
            return _varlen_attention(varlen, query, key, value, seq_lens, scale, dropout)
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            return None  # an additive float mask: SDPA's path keeps its exact meaning
        mask, sparse_mode = ~attention_mask, 0  # the kernel masks where True
    elif is_causal and query.shape[2] > 1:
        if query.shape[2] != key.shape[2]:
            return None
        mask, sparse_mode = _causal_mask(query.device), 2  # leftUpCausal
    else:
        mask, sparse_mode = None, 0
    return kernels.npu_fusion_attention(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),  # MLA's values are a split view of kv_b_proj's output
        query.shape[1],
        "BNSD",
        atten_mask=mask,
        scale=scale,
        keep_prob=1.0 - dropout,
        sparse_mode=sparse_mode,
    )[0]


def _varlen_attention(
    kernels: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    dropout: float,
) -> torch.Tensor:
    """TND: ``[B, N, S, D]`` -> ``[B * S, N, D]`` tokens, causal per document (sparse_mode 3, rightDownCausal,
    with the compressed 2048 x 2048 mask) -> ``[B, N, S, Dv]``."""
    b, n, s, _ = query.shape

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[-1])  # [B*S, N(kv), D]

    out = kernels.npu_fusion_attention(
        tokens(query),
        tokens(key),
        tokens(value),
        n,
        "TND",
        atten_mask=_causal_mask(query.device),
        scale=scale,
        keep_prob=1.0 - dropout,
        sparse_mode=3,
        actual_seq_qlen=seq_lens,
        actual_seq_kvlen=seq_lens,
    )[0]  # [B*S, N, Dv]
    return out.reshape(b, s, n, -1).transpose(1, 2)  # -1: Dv (a pre-2.7 meta kernel says Dq; graph mode is SDPA there)


# -- the probes' checks: forward and backward on a tiny input, against the twin --------------------------------


def _inputs(device: torch.device, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(device).requires_grad_(True) for s in shapes]


def _compare(fused_fn: Callable, twin_fn: Callable, inputs: list[torch.Tensor], what: str) -> None:
    """Fused and twin outputs and input gradients equal (fp32 tolerance); raises naming what differs."""
    outs, grads = [], []
    for fn in (fused_fn, twin_fn):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape))
        outs.append(out.detach())
        grads.append([t.grad for t in leaves if t.requires_grad])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4, msg=lambda m: f"{what} output: {m}")
    for i, (a, b) in enumerate(zip(grads[0], grads[1], strict=True)):
        if a is None or b is None:
            raise RuntimeError(f"{what}: no gradient for input {i} (no autograd formula)")
        diff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{what} grad of input {i}: max diff {diff}")


def _check_swiglu(kernels: Any, device: torch.device) -> None:
    def run(h: torch.Tensor) -> torch.Tensor:
        return kernels.npu_swiglu(h, dim=-1)

    _compare(run, swiglu_twin, _inputs(device, (3, 16)), "npu_swiglu")


def _check_rms_norm(kernels: Any, device: torch.device) -> None:
    inputs = _inputs(device, (3, 16), (16,))
    _compare(lambda x, w: kernels.npu_rms_norm(x, w, epsilon=1e-6)[0], functools.partial(rms_norm_twin, eps=1e-6),
             inputs, "npu_rms_norm")  # fmt: skip


def _check_rotary(kernels: Any, device: torch.device) -> None:
    (x,) = _inputs(device, (1, 2, 3, 8))
    angles = torch.arange(12, dtype=torch.float32, device=device).view(1, 1, 3, 4) / 5
    r1, r2 = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)  # [1, 1, S, D]
    _compare(lambda t: kernels.npu_rotary_mul(t, r1, r2, rotary_mode="interleave"),
             lambda t: rotary_interleaved_twin(t, r1, r2), [x], "npu_rotary_mul(interleave)")  # fmt: skip


def _check_attention(kernels: Any, device: torch.device) -> None:
    q, k, v = _inputs(device, (1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 4))  # Dk 8 > Dv 4, as MLA's 192 > 128
    mask = _causal_mask(device)

    def run(q, k, v):
        return kernels.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=mask, scale=0.3, sparse_mode=2)[0]

    def twin(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)

    _compare(run, twin, [q, k, v], "npu_fusion_attention(Dk > Dv, causal)")


def _check_attention_varlen(kernels: Any, device: torch.device) -> None:
    q, k, v = _inputs(device, (1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 4))  # two documents: 2 and 4 tokens

    def run(q, k, v):
        return _varlen_attention(kernels, q, k, v, [2, 6], 0.3, 0.0)

    def twin(q, k, v):
        parts = [
            F.scaled_dot_product_attention(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], is_causal=True, scale=0.3)
            for a, e in ((0, 2), (2, 6))
        ]
        return torch.cat(parts, dim=2)

    _compare(run, twin, [q, k, v], "npu_fusion_attention(TND, Dk > Dv, causal per document)")


_CHECKS: dict[str, Callable[[Any, torch.device], None]] = {  # the probe of each kernel in FUSED_KERNELS
    "npu_swiglu": _check_swiglu,
    "npu_rms_norm": _check_rms_norm,
    "npu_rotary_mul": _check_rotary,
    "npu_fusion_attention": _check_attention,
}
FUSED_KERNELS = tuple(_CHECKS)
VARIANTS = {"npu_fusion_attention": ("TND",)}  # calls of a kernel above with probes of their own
_CHECKS["npu_fusion_attention TND"] = _check_attention_varlen
