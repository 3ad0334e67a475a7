"""Grouped matmul with a backward of our own: rows of ``x`` in contiguous groups, group ``g`` times ``w[g]``.

Uses ``torch._grouped_mm`` where the device has a kernel for it (probed once per device type and dtype),
a loop over the groups' contiguous slices otherwise. Its built-in autograd is missing or broken on some
devices (CPU in torch 2.13), so the backward is written here from the same two primitives.
"""

from __future__ import annotations

import torch

_native: dict[tuple[str, torch.dtype], bool] = {}


def native_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs and is correct here (forward and the weight-gradient form)."""
    key = (device.type, dtype)
    if key not in _native:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                x = (torch.arange(64, dtype=torch.float32, device=device).reshape(4, 16) % 7 / 8).to(dtype)
                w = (torch.arange(768, dtype=torch.float32, device=device).reshape(3, 16, 16) % 5 / 8).to(dtype)
                offs = torch.tensor([1, 1, 4], dtype=torch.int32, device=device)  # an empty group in the middle
                y = torch._grouped_mm(x, w, offs=offs)
                ref = torch.cat([x[:1] @ w[0], x[1:] @ w[2]])
                gw = torch._grouped_mm(x.t(), y, offs=offs)
                ref_gw = torch.stack([x[:1].t() @ y[:1], torch.zeros_like(w[1]), x[1:].t() @ y[1:]])
                ok = torch.allclose(y.float(), ref.float(), atol=1e-2) and torch.allclose(
                    gw.float(), ref_gw.float(), atol=1e-2
                )
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _native[key] = ok
    return _native[key]


def _aligned(*tensors: torch.Tensor) -> bool:
    """The kernels want 16-byte-aligned base pointers and non-unit strides."""
    return all(
        t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride() if s != 1) for t in tensors
    )


def _mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: list[int], native: bool) -> torch.Tensor:
    """``[N, K] x [G, K, M] -> [N, M]``."""
    if native and _aligned(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.mm(x[start : start + n], w[g], out=out[start : start + n])
        start += n
    return out


def _wgrad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, counts: list[int], native: bool) -> torch.Tensor:
    """``[N, A]^T x [N, B] per group -> [G, A, B]`` (zero for empty groups)."""
    if native and _aligned(x, grad):
        return torch._grouped_mm(x.t(), grad, offs=offs)
    out = x.new_zeros(len(counts), x.shape[1], grad.shape[1])
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.mm(x[start : start + n].t(), grad[start : start + n], out=out[g])
        start += n
    return out


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs, counts, native):
        ctx.save_for_backward(x, w, offs)
        ctx.counts, ctx.native = counts, native
        return _mm(x, w, offs, counts, native)

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        gx = _mm(grad, w.transpose(1, 2), offs, ctx.counts, ctx.native) if ctx.needs_input_grad[0] else None
        # computed as [G, M, K] (grad^T x) and returned transposed: callers pass w as a transposed view of an
        # [G, M, K] parameter, so the gradient lands in the parameter's own layout, with no copy into .grad
        gw = _wgrad(grad, x, offs, ctx.counts, ctx.native).transpose(1, 2) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int], offs: torch.Tensor | None = None) -> torch.Tensor:
    """``y[rows of group g] = x[rows of group g] @ w[g]``: ``x [N, K]``, ``w [G, K, M]``, host ``counts`` per group."""
    native = native_available(x.device, x.dtype)
    if offs is None:
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    return _GroupedMM.apply(x.contiguous(), w, offs, counts, native)
