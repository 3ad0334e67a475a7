"""The ``"npu"`` expert dispatch: torch_npu's fused MoE kernels, with a pure-torch stand-in for CPU tests.

:func:`npu_moe` has the contract of :func:`npu_parallel.dispatch.grouped`: replicated tokens ``x [T, H]``,
global expert ``indices [T, k]`` and routing ``weights [T, k]`` in, this rank's partial output ``[T, H]``
out (the weighted sum over the slots routed to this rank's experts; slots of other ranks' experts add
zero). It issues no ``nonzero``, boolean mask, ``unique`` or integer sort of its own:

1. ``keys [T, k]``: each slot's local expert id, ``num_local`` (a sentinel that sorts last) for slots of
   other ranks' experts. Per-expert counts by ``scatter_add`` into a fixed ``[E_local + 1]`` buffer (a
   device tensor; ``bincount`` would size its output from the data).
2. ``npu_moe_token_permute(x, keys)``: ``[T*k, H]`` rows sorted by key (stably), local experts' rows
   first in expert order, the sentinel rows last; ``sorted_indices[slot]`` = the slot's row.
3. Two grouped matmuls (``npu_grouped_matmul``, one ``[E_local, K, N]`` weight tensor, the device counts
   as ``group_list`` with ``group_list_type=1``), the activation in between.
4. ``npu_moe_token_unpermute(h, sorted_indices, probs=weights)``: gathers each slot's row, scales it by
   its routing weight and sums the k slots of each token.

Host syncs: **none** when this rank holds every expert. Under expert parallelism **one** per call
(forward only; the backward has none): the number of local rows. The grouped-matmul doc requires the
group sizes to add up to exactly the rows of ``x`` ("当group_list_type为1时，数值的总和与x中tensor的第
一维相等"), so the sentinel rows must either be sliced off (the row count must reach the host) or be
computed as a group of their own (``(ep-1)/ep`` of the GEMM work wasted). We slice; the sentinel rows of
the expert output are zeros, padded back before the unpermute, which wants all ``T*k`` rows.

Kernel signatures relied on (Ascend/op-plugin, ``docs/zh/custom_APIs/torch_npu/``):

* ``torch_npu.npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False)
  -> (Tensor, Tensor)`` -- ``torch_npu-npu_moe_token_permute.md`` (commit 09fca6f6ccba). tokens 2-D
  float16/bfloat16/float32; indices 1-D or 2-D int32/int64, values in ``[0, 16777215)``;
  ``sortedIndicesFirst = argSort(flatten(indices))``, ``sorted_indices = argSort(sortedIndicesFirst)``
  (int32, ``[T*k]``), ``permuted_tokens[sorted_indices[i]] = tokens[i // topK]``; ``num_out_tokens``
  keeps the first rows; ``padded_mode=True`` "当前暂不支持". The doc's example (tokens 1..4, indices
  ``[[0,1],[1,0],[0,2],[2,0]]`` -> ``sorted_indices [0,4,5,1,2,6,7,3]``) shows the sort is stable.
* ``torch_npu.npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False,
  restore_shape=None) -> Tensor`` -- ``torch_npu-npu_moe_token_unpermute.md`` (commit 09fca6f6ccba).
  ``T[k] = T[S[k]]; T[k] *= P[i][j]; O[i] = sum_{k=i*topK}^{(i+1)*topK-1} T[k]``; permuted_tokens
  ``[tokens*topK, H]``; sorted_indices 1-D int32, a permutation of ``[0, tokens*topK)``; probs
  ``[tokens, topK]`` (topK = 1 without probs), topK <= 512 on A2/A3; padded_mode/restore_shape only
  False/None.
* ``torch_npu.npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
  antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
  activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=-1,
  group_list_type=0, act_type=0, output_dtype=None, tuning_config=None, ...) -> List[Tensor]`` --
  ``torch_npu-npu_grouped_matmul.md`` (commit 02ea47577ecc). x and weight are lists; ``y_i = x_i @
  weight_i``; ``group_list`` a 1-D int64 tensor (or a host ``List[int]``); ``group_list_type`` 0 =
  cumulative ends (non-negative, non-decreasing, last value == grouped dimension), 1 = per-group sizes
  (non-negative, sum == grouped dimension), 2 = ``[E, 2]`` pairs (int8 only); ``group_type`` -1 none,
  0 = m axis, 2 = k axis (1 unsupported on A2/A3); ``split_item`` 0/1 = one output per weight, 2/3 = a
  single output tensor. Single-tensor m-axis grouping: x ``[M, K]`` (not transposed), weight ``[E, K,
  N]`` (may be a transposed view), y ``[M, N]``, at most 1024 groups. Single-tensor k-axis grouping: x
  ``[K, M]`` "必须转置" (a transposed view, stride ``(1, K)``), weight ``[M, N]`` not transposed, y
  ``[E, K, N]``. float32 only with single-tensor x/weight/y.

Not used: ``npu_moe_init_routing_v2`` (``docs/context/torch_npu-npu_moe_init_routing_v2.md``) and
``npu_moe_finalize_routing``: documented for inference ("该接口支持推理场景下使用"), no backward, and the
v2 page contradicts itself (``expert_tokens_num_type`` "当前仅支持1和2" next to a default of 0,
``row_idx_type`` "当前仅支持-1和1" for a 0/1 flag). Its ``active_expert_range`` would drop the sentinel
rows without a sync, but a training path cannot rest on it.

Autograd: the permute/unpermute pages say "该接口支持推理、训练场景下使用" and torch_npu registers
their backward kernels (``npu_moe_token_permute_grad``, ``npu_moe_token_unpermute_grad``, the latter
returning the probs gradient too), so autograd flows through them. ``npu_grouped_matmul`` documents no
backward: :class:`_GroupedMatmul` supplies one from the same kernel, as ``grouped_gemm.py`` does
(dgrad: m-axis grouping with ``weight.transpose(1, 2)``; wgrad: k-axis grouping of ``x.t()`` with the
output gradient). The doc does not say what k-axis grouping writes for an empty group, so the weight
gradient of experts with no rows is zeroed explicitly.

All torch_npu calls go through an :class:`NpuOps` adapter (:func:`npu_ops`); :class:`ReferenceNpuOps`
implements the documented semantics of the same three methods in plain torch, strict about the
documented argument types, shapes and values, so a wrong argument in :func:`npu_moe` fails on CPU.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import _disable_current_modes

from npu_parallel.parallel import device as _device
from npu_parallel.moe.experts import LocalExperts

__all__ = ["NpuOps", "ReferenceNpuOps", "npu_ops", "npu_moe"]

_REQUIRED = ("npu_moe_token_permute", "npu_moe_token_unpermute", "npu_grouped_matmul")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_LIMIT = 16777215  # permute: element count and values below this
_MAX_TOPK = 512  # unpermute on Atlas A2/A3
_MAX_GROUPS = 1024  # grouped matmul, single-tensor m- or k-axis grouping


class NpuOps:
    """The torch_npu kernels :func:`npu_moe` uses, same names, argument names and semantics."""

    def __init__(self, module) -> None:
        self.module = module

    def npu_moe_token_permute(self, tokens, indices, num_out_tokens=None, padded_mode=False):
        return self.module.npu_moe_token_permute(tokens, indices, num_out_tokens=num_out_tokens,
                                                 padded_mode=padded_mode)

    def npu_moe_token_unpermute(self, permuted_tokens, sorted_indices, probs=None, padded_mode=False,
                                restore_shape=None):
        return self.module.npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=probs,
                                                   padded_mode=padded_mode, restore_shape=restore_shape)

    def npu_grouped_matmul(self, x, weight, *, group_list=None, split_item=0, group_type=-1, group_list_type=0):
        # only the arguments used here are forwarded: older torch_npu builds lack some later keywords
        return self.module.npu_grouped_matmul(x, weight, group_list=group_list, split_item=split_item,
                                              group_type=group_type, group_list_type=group_list_type)


def npu_ops() -> NpuOps:
    """The real kernels; a clear error when torch_npu is absent or too old to have them."""
    module = _device.torch_npu_module()
    if module is None:
        raise RuntimeError(
            "moe_impl='npu' needs torch_npu (Ascend's PyTorch plugin), which is not installed or failed to "
            "import. Install it matching your torch and CANN versions, e.g. `pip install -e .[npu]`, or use "
            "moe_impl='grouped'."
        )
    missing = [name for name in _REQUIRED if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"moe_impl='npu' needs torch_npu.{', torch_npu.'.join(missing)}, missing from torch_npu "
            f"{getattr(module, '__version__', '?')}; upgrade torch_npu (`pip install -e .[npu]`) or use "
            "moe_impl='grouped'."
        )
    return NpuOps(module)


# --- the implementation -----------------------------------------------------------------------------


class _GroupedMatmul(torch.autograd.Function):
    """``y[rows of group g] = x[rows of g] @ w[g]`` on ``npu_grouped_matmul``, with a backward of our own.

    ``x [M, K]`` (rows grouped by ``counts``, an int64 device tensor of per-group sizes summing to M),
    ``w [G, K, N]`` -> ``[M, N]``. Backward: ``dx`` by m-axis grouping with ``w.transpose(1, 2)``,
    ``dw [G, K, N]`` by k-axis grouping of ``x.t()`` (a transposed view, as the doc requires) with ``dy``.
    """

    @staticmethod
    def forward(ctx, ops, x, w, counts):
        ctx.ops = ops
        ctx.save_for_backward(x, w, counts)
        if x.shape[0] == 0:  # a rank with no local rows: the docs do not promise empty inputs work
            return x.new_zeros(0, w.shape[-1])
        return ops.npu_grouped_matmul([x], [w], group_list=counts, split_item=2, group_type=0,
                                      group_list_type=1)[0]

    @staticmethod
    def backward(ctx, grad):
        x, w, counts = ctx.saved_tensors
        ops, gx, gw = ctx.ops, None, None
        grad = grad.contiguous()
        if ctx.needs_input_grad[1]:
            gx = (torch.zeros_like(x) if x.shape[0] == 0 else
                  ops.npu_grouped_matmul([grad], [w.transpose(1, 2)], group_list=counts, split_item=2,
                                         group_type=0, group_list_type=1)[0])
        if ctx.needs_input_grad[2]:
            if x.shape[0] == 0:
                gw = torch.zeros_like(w)
            else:
                gw = ops.npu_grouped_matmul([x.t()], [grad], group_list=counts, split_item=3, group_type=2,
                                            group_list_type=1)[0]
                # what k-axis grouping writes for an empty group is undocumented: zero it (where, not *0: NaN)
                gw = torch.where((counts > 0).view(-1, 1, 1), gw, gw.new_zeros(()))
        return None, gx, gw, None


def _local_keys(indices: torch.Tensor, experts: LocalExperts) -> torch.Tensor:
    """Local expert number of each slot, ``num_local`` (a sentinel that sorts last) when remote."""
    local = indices - experts.expert_start
    inside = (local >= 0) & (local < experts.num_local)
    return torch.where(inside, local, torch.full_like(local, experts.num_local))


def npu_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts,
            ops: NpuOps | None = None) -> torch.Tensor:
    """This rank's partial MoE output ``[T, H]`` on torch_npu's fused kernels (contract of ``dispatch.grouped``).

    No host sync when the rank holds all experts, one (the local row count) under expert parallelism.
    """
    ops = npu_ops() if ops is None else ops
    t, k = indices.shape
    n_local, slots = experts.num_local, indices.numel()
    keys = _local_keys(indices, experts)
    permuted, sorted_indices = ops.npu_moe_token_permute(x, keys.to(torch.int32))
    flat = keys.reshape(-1)
    counts = flat.new_zeros(n_local + 1).scatter_add_(0, flat, torch.ones_like(flat))[:n_local]
    if experts.expert_start == 0 and n_local == experts.num_experts:
        rows = slots  # every slot is local: no sentinel rows, no sync
    else:
        rows = int(counts.sum())  # the one host sync: the grouped matmul wants sum(group_list) == rows of x
    xs = permuted[:rows]
    gate, up = _GroupedMatmul.apply(ops, xs, experts.gate_up_proj.transpose(1, 2), counts).chunk(2, dim=-1)
    h = _GroupedMatmul.apply(ops, experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2), counts)
    if rows < slots:  # the sentinel slots' rows: zeros, so other ranks' slots contribute nothing
        h = torch.cat([h, h.new_zeros(slots - rows, h.shape[-1])])
    # routing weights and the k-slot sum in the weights' dtype, as dispatch.grouped does
    out = ops.npu_moe_token_unpermute(h.to(weights.dtype), sorted_indices, probs=weights)
    return out.to(x.dtype)


# --- the pure-torch stand-in ------------------------------------------------------------------------


@contextlib.contextmanager
def _device_side() -> Iterator[None]:
    """Value checks a real kernel makes on the device: hidden from dispatch modes (an OpAudit), which
    would otherwise count the stand-in's reads as host syncs of the code under test."""
    with _disable_current_modes():
        yield


def _host_ints(t: torch.Tensor) -> list[int]:
    with _device_side():
        return [int(v) for v in t.reshape(-1)]


def _require(cond: bool, msg: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(msg)


def _is_transposed_2d(t: torch.Tensor) -> bool:
    """The doc's "transposed": shape ``[a, b]`` with strides ``(1, a)``, a transposed contiguous tensor."""
    return t.dim() == 2 and t.stride(0) == 1 and (t.shape[1] <= 1 or t.stride(1) == t.shape[0])


class ReferenceNpuOps:
    """The documented semantics of the kernels in :class:`NpuOps`, in plain torch (CPU tests).

    Strict: raises ``TypeError``/``ValueError`` on documented type, shape and value violations (checked
    as the device would, without counting as host syncs), ``NotImplementedError`` on documented-but-
    unsupported modes. Where the doc leaves a result undefined (k-axis grouping's empty groups) the
    output is NaN, so a caller relying on it fails loudly.
    """

    # -- npu_moe_token_permute
    def npu_moe_token_permute(self, tokens, indices, num_out_tokens=None, padded_mode=False):
        _require(isinstance(tokens, torch.Tensor) and isinstance(indices, torch.Tensor),
                 "tokens and indices must be tensors", TypeError)
        _require(tokens.dim() == 2, f"tokens must be 2-D (num_tokens, hidden_size), got {tuple(tokens.shape)}")
        _require(tokens.dtype in _FLOATS, f"tokens dtype {tokens.dtype} not float16/bfloat16/float32", TypeError)
        _require(indices.dtype in (torch.int32, torch.int64), f"indices dtype {indices.dtype} not int32/int64",
                 TypeError)
        _require(indices.dim() in (1, 2), f"indices must be 1-D or 2-D, got {tuple(indices.shape)}")
        _require(indices.shape[0] == tokens.shape[0],
                 f"indices rows {indices.shape[0]} != tokens rows {tokens.shape[0]}")
        _require(num_out_tokens is None or (isinstance(num_out_tokens, int) and not isinstance(num_out_tokens, bool)),
                 "num_out_tokens must be None or an int", TypeError)
        _require(isinstance(padded_mode, bool), "padded_mode must be a bool", TypeError)
        if padded_mode:
            raise NotImplementedError("npu_moe_token_permute: padded_mode=True is not supported yet (doc)")
        _require(indices.numel() < _INDEX_LIMIT, f"indices has {indices.numel()} elements, limit {_INDEX_LIMIT}")
        topk = 1 if indices.dim() == 1 else indices.shape[1]
        flat = indices.reshape(-1)
        if flat.numel():
            with _device_side():
                lo, hi = int(flat.min()), int(flat.max())
            _require(0 <= lo and hi < _INDEX_LIMIT, f"indices values must lie in [0, {_INDEX_LIMIT}), got [{lo}, {hi}]")
        first = torch.sort(flat, stable=True).indices  # sortedIndicesFirst (stable: the doc's example)
        sorted_indices = torch.empty_like(first).scatter_(0, first, torch.arange(flat.numel()))  # argSort(first)
        permuted = tokens.index_select(0, torch.div(first, topk, rounding_mode="floor"))
        if num_out_tokens:  # None or 0 keeps every row; negative: a negative slice end
            permuted = permuted[:num_out_tokens]
        return permuted.contiguous(), sorted_indices.to(torch.int32)

    # -- npu_moe_token_unpermute
    def npu_moe_token_unpermute(self, permuted_tokens, sorted_indices, probs=None, padded_mode=False,
                                restore_shape=None):
        _require(isinstance(permuted_tokens, torch.Tensor) and isinstance(sorted_indices, torch.Tensor),
                 "permuted_tokens and sorted_indices must be tensors", TypeError)
        if padded_mode or restore_shape is not None:
            raise NotImplementedError("npu_moe_token_unpermute: only padded_mode=False, restore_shape=None (doc)")
        _require(permuted_tokens.dim() == 2, f"permuted_tokens must be 2-D, got {tuple(permuted_tokens.shape)}")
        _require(permuted_tokens.dtype in _FLOATS, f"permuted_tokens dtype {permuted_tokens.dtype} not a float",
                 TypeError)
        _require(sorted_indices.dtype == torch.int32, f"sorted_indices must be int32, got {sorted_indices.dtype}",
                 TypeError)
        n = permuted_tokens.shape[0]
        _require(sorted_indices.dim() == 1 and sorted_indices.numel() == n,
                 f"sorted_indices must be 1-D of {n} (= rows of permuted_tokens), got {tuple(sorted_indices.shape)}")
        topk = 1
        if probs is not None:
            _require(isinstance(probs, torch.Tensor) and probs.dim() == 2,
                     "probs must be a 2-D tensor (tokens_num, topK_num)")
            _require(probs.dtype in _FLOATS, f"probs dtype {probs.dtype} not a float", TypeError)
            # not spelled out by the doc; MindSpeed casts permuted_tokens to probs' dtype before the call
            _require(probs.dtype == permuted_tokens.dtype,
                     f"probs dtype {probs.dtype} != permuted_tokens dtype {permuted_tokens.dtype}", TypeError)
            topk = probs.shape[1]
            _require(probs.numel() == n, f"probs {tuple(probs.shape)} does not cover the {n} permuted rows")
            _require(topk <= _MAX_TOPK, f"topK {topk} > {_MAX_TOPK}")
        if n:
            with _device_side():
                ok = bool(torch.equal(torch.sort(sorted_indices.long()).values, torch.arange(n)))
            _require(ok, f"sorted_indices must be a permutation of [0, {n}) (no repeats, in range)")
        rows = permuted_tokens.index_select(0, sorted_indices.long())  # T[k] = T[S[k]]
        if probs is not None:
            rows = rows * probs.reshape(-1, 1)  # T[k] *= P[i][j]
        return rows.view(-1, topk, rows.shape[-1]).sum(dim=1)  # O[i] = sum of the topK rows of token i

    # -- npu_grouped_matmul
    def npu_grouped_matmul(self, x, weight, *, group_list=None, split_item=0, group_type=-1, group_list_type=0):
        _require(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)),
                 "x and weight must be lists of tensors (List[Tensor]), not tensors", TypeError)
        _require(len(x) >= 1 and len(weight) >= 1, "x and weight must be non-empty lists")
        _require(all(isinstance(t, torch.Tensor) for t in (*x, *weight)), "x and weight hold tensors", TypeError)
        dtypes = {t.dtype for t in (*x, *weight)}
        _require(len(dtypes) == 1 and dtypes <= set(_FLOATS),
                 f"non-quantized x/weight must share one float dtype, got {sorted(map(str, dtypes))}", TypeError)
        _require(split_item in (0, 1, 2, 3), f"split_item must be 0..3, got {split_item!r}")
        if group_type == -1:
            return self._gmm_ungrouped(x, weight, group_list, split_item)
        _require(group_type in (0, 2), f"group_type {group_type!r}: -1, 0 or 2 on A2/A3 (1 unsupported)")
        _require(split_item in (2, 3), f"grouped single-tensor x needs split_item 2 or 3, got {split_item}")
        _require(len(x) == 1, f"grouped x must be a single tensor (list of 1), got {len(x)}")
        sizes = self._group_sizes(group_list, group_list_type)
        if group_type == 0:
            return [self._gmm_m(x[0], weight, sizes)]
        return [self._gmm_k(x[0], weight, sizes)]

    @staticmethod
    def _group_sizes(group_list, group_list_type) -> list[int]:
        """Per-group sizes from a documented tensor group_list (checked as the doc requires)."""
        if isinstance(group_list, (list, tuple)):
            raise TypeError("ReferenceNpuOps takes group_list as a device tensor only (a host List[int] forces "
                            "a sync and caps groups at 128); got a Python list")
        _require(isinstance(group_list, torch.Tensor), "grouped matmul needs a group_list tensor", TypeError)
        _require(group_list.dtype == torch.int64, f"group_list dtype must be int64, got {group_list.dtype}",
                 TypeError)
        _require(group_list.dim() == 1 and group_list.numel() >= 1,
                 f"group_list must be 1-D and non-empty, got {tuple(group_list.shape)}")
        _require(group_list.numel() <= _MAX_GROUPS, f"{group_list.numel()} groups > {_MAX_GROUPS}")
        _require(group_list_type in (0, 1, 2), f"group_list_type must be 0, 1 or 2, got {group_list_type!r}")
        if group_list_type == 2:
            raise NotImplementedError("group_list_type=2 ([E, 2] pairs) is for int8 x/weight only (doc)")
        values = _host_ints(group_list)
        _require(min(values) >= 0, f"group_list must be non-negative, got {values}")
        if group_list_type == 1:
            return values
        _require(all(a <= b for a, b in zip(values, values[1:])),
                 f"group_list_type=0 wants cumulative ends (non-decreasing), got {values}")
        return [b - a for a, b in zip([0] + values[:-1], values)]

    @staticmethod
    def _check_weight_layout(w: torch.Tensor) -> None:
        """``[..., K, N]`` contiguous, or the transposed view of a contiguous ``[..., N, K]``."""
        k_, n_ = w.shape[-2], w.shape[-1]
        plain = w.stride(-1) == 1 and (k_ <= 1 or w.stride(-2) == n_)
        transposed = w.stride(-2) == 1 and (n_ <= 1 or w.stride(-1) == k_)
        _require(plain or transposed, f"weight strides {w.stride()} are neither ND nor a transposed view")
        if w.dim() == 3:
            _require(w.shape[0] <= 1 or w.stride(0) == k_ * n_, f"weight strides {w.stride()}: groups not packed")

    def _gmm_m(self, x: torch.Tensor, weight, sizes: list[int]) -> torch.Tensor:
        """m-axis grouping: x ``[M, K]`` rows split by ``sizes``; single ``[G, K, N]`` or G ``[K, N]`` weights."""
        _require(x.dim() == 2, f"x must be 2-D [M, K] for m-axis grouping, got {tuple(x.shape)}")
        _require(x.stride(-1) == 1 and (x.shape[0] <= 1 or x.stride(0) == x.shape[1]),
                 "x must be a plain row-major [M, K] tensor (the doc: x does not support transposition)")
        if len(weight) == 1:
            w = weight[0]
            _require(w.dim() == 3, f"single-tensor weight must be 3-D [G, K, N], got {tuple(w.shape)}")
            mats = list(w.unbind(0))
        else:
            _require(all(w.dim() == 2 for w in weight), "multi-tensor weight: each must be 2-D [K, N]")
            _require(len(weight) <= 128, "at most 128 weight tensors")
            mats = list(weight)
        for w in weight:
            self._check_weight_layout(w)
        _require(len(mats) == len(sizes), f"group_list has {len(sizes)} groups, weight has {len(mats)}")
        _require(all(m.shape[0] == x.shape[1] for m in mats),
                 f"weight K {[m.shape[0] for m in mats][:4]}... != x K {x.shape[1]} (weight must be [G, K, N])")
        _require(len({m.shape[1] for m in mats}) == 1, "every group's N must be equal")
        _require(sum(sizes) == x.shape[0],
                 f"group sizes add up to {sum(sizes)}, x has {x.shape[0]} rows (must be equal)")
        out = x.new_empty(x.shape[0], mats[0].shape[1])
        start = 0
        for m, n in zip(mats, sizes):
            if n:
                torch.mm(x[start:start + n], m, out=out[start:start + n])
            start += n
        return out

    def _gmm_k(self, x: torch.Tensor, weight, sizes: list[int]) -> torch.Tensor:
        """k-axis grouping: x ``[K, M]`` (transposed view), weight ``[M, N]``, y ``[G, K, N]``."""
        _require(x.dim() == 2 and _is_transposed_2d(x),
                 f"k-axis grouping needs x as a transposed view [K, M] (stride (1, K)), got shape "
                 f"{tuple(x.shape)} stride {x.stride()}")
        _require(len(weight) == 1, "k-axis grouping takes a single weight tensor")
        w = weight[0]
        _require(w.dim() == 2 and w.shape[0] == x.shape[1],
                 f"weight must be 2-D [M, N] with M = x.shape[1] = {x.shape[1]}, got {tuple(w.shape)}")
        _require(w.stride(-1) == 1 and (w.shape[0] <= 1 or w.stride(0) == w.shape[1]),
                 "k-axis grouping: weight must not be transposed")
        _require(sum(sizes) == x.shape[1],
                 f"group sizes add up to {sum(sizes)}, grouped axis (x.shape[1]) is {x.shape[1]} (must be equal)")
        out = x.new_full((len(sizes), x.shape[0], w.shape[1]), float("nan"))  # empty groups: undefined
        start = 0
        for g, n in enumerate(sizes):
            if n:
                torch.mm(x[:, start:start + n], w[start:start + n], out=out[g])
            start += n
        return out

    def _gmm_ungrouped(self, x, weight, group_list, split_item) -> list[torch.Tensor]:
        """group_type=-1: independent ``x_i @ weight_i`` (multi-multi-multi)."""
        _require(group_list is None, "group_type=-1 takes no group_list")
        _require(split_item in (0, 1), f"group_type=-1 (multi tensors) needs split_item 0 or 1, got {split_item}")
        _require(len(x) == len(weight), f"{len(x)} x tensors for {len(weight)} weights")
        _require(len(x) <= 128, "at most 128 tensors")
        out = []
        for xi, wi in zip(x, weight):
            _require(wi.dim() == 2 and 2 <= xi.dim() <= 6 and xi.shape[-1] == wi.shape[0],
                     f"x {tuple(xi.shape)} @ weight {tuple(wi.shape)}: weight must be 2-D [K, N]")
            self._check_weight_layout(wi)
            out.append(xi @ wi)
        return out

