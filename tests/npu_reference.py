"""A pure-torch stand-in for torch_npu's MoE kernels, for CPU tests of the ``"npu"`` dispatcher.

:class:`ReferenceNpuOps` has the three methods of :class:`npu_parallel.moe.npu_ops.NpuOps` with the
documented semantics (docs/npu_kernels.md), strict about the documented argument types, shapes and values,
so a wrong argument in the dispatcher fails on CPU. ``ReferenceNpuOps(release)`` applies that torch_npu
release's rules (:data:`RELEASES`, read from its wheel's schemas, meta kernels and docs; the shapes themselves
are checked against the real schemas and meta kernels in tests/test_npu_wheels.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import types
import warnings
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import _disable_current_modes

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_LIMIT = 16777215  # permute: element count and values below this
_MAX_TOPK = 512  # unpermute on Atlas A2/A3
_MAX_GROUPS = 1024  # grouped matmul, single-tensor m- or k-axis grouping


@dataclasses.dataclass(frozen=True)
class Release:
    """What one torch_npu release's MoE kernels accept (its wheel: schema yaml, meta kernels, op docs)."""

    token_autograd: bool  # permute/unpermute have a backward (``npu_moe_token_*_grad`` in the schema)
    eager_group_types: tuple[int, ...]  # group_type values the eager grouped matmul takes
    token_dtypes: tuple[torch.dtype, ...]  # permute tokens / unpermute tokens and probs
    # the fused kernels' meta kernels (graph mode): npu_fusion_attention's output shaped like the value (Dv), not
    # the query (Dq); npu_grouped_matmul_add_ has one at all; npu_rms_norm_backward's dgamma dtype
    attention_meta_dv: bool = True
    gmm_add_meta: bool = True
    rms_dgamma_dtype: torch.dtype | None = torch.float32  # None: gamma's own dtype
    gmm_add_group_list_type: bool = True  # npu_grouped_matmul_add_ takes group_list_type (we never pass it)


RELEASES = {
    # 2.5.1: no _grad ops for permute/unpermute; "group_type currently only support -1 and 0"; docs: bf16 only;
    # npu_grouped_matmul_add_ has a schema but no meta kernel
    "2.5.1": Release(False, (-1, 0), (torch.bfloat16,), False, False, None, False),
    "2.6.0": Release(True, (-1, 0, 2), _FLOATS, False, True, None, False),
    "2.14.0": Release(True, (-1, 0, 2), _FLOATS),
}
NEWEST = "2.14.0"


class _NoAutograd(torch.autograd.Function):
    """A kernel with no autograd formula: PyTorch's fallback warns and gives its inputs no gradient."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        warnings.warn("autograd kernel was not registered to the Autograd key(s)", UserWarning, stacklevel=2)
        return (None,) * len(ctx.needs_input_grad)


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

    def __init__(self, release: str = NEWEST) -> None:
        self.release, self.rules = release, RELEASES[release]

    def _no_grad_on_old_releases(self, fn, *tensors):
        if self.rules.token_autograd:
            return fn(*tensors)
        return _NoAutograd.apply(fn, *tensors)

    # -- npu_moe_token_permute
    def npu_moe_token_permute(self, tokens, indices, num_out_tokens=None, padded_mode=False):
        self._check_permute(tokens, indices, num_out_tokens, padded_mode)
        return self._no_grad_on_old_releases(lambda t: self._permute(t, indices, num_out_tokens), tokens)

    def _check_permute(self, tokens, indices, num_out_tokens, padded_mode) -> None:
        _require(
            isinstance(tokens, torch.Tensor) and isinstance(indices, torch.Tensor),
            "tokens and indices must be tensors",
            TypeError,
        )
        _require(tokens.dim() == 2, f"tokens must be 2-D (num_tokens, hidden_size), got {tuple(tokens.shape)}")
        _require(
            tokens.dtype in self.rules.token_dtypes,
            f"tokens dtype {tokens.dtype}: torch_npu {self.release} takes {self.rules.token_dtypes}",
            TypeError,
        )
        _require(
            indices.dtype in (torch.int32, torch.int64), f"indices dtype {indices.dtype} not int32/int64", TypeError
        )
        _require(indices.dim() in (1, 2), f"indices must be 1-D or 2-D, got {tuple(indices.shape)}")
        _require(
            indices.shape[0] == tokens.shape[0], f"indices rows {indices.shape[0]} != tokens rows {tokens.shape[0]}"
        )
        _require(
            num_out_tokens is None or (isinstance(num_out_tokens, int) and not isinstance(num_out_tokens, bool)),
            "num_out_tokens must be None or an int",
            TypeError,
        )
        _require(isinstance(padded_mode, bool), "padded_mode must be a bool", TypeError)
        if padded_mode:
            raise NotImplementedError("npu_moe_token_permute: padded_mode=True is not supported yet (doc)")
        _require(indices.numel() < _INDEX_LIMIT, f"indices has {indices.numel()} elements, limit {_INDEX_LIMIT}")
        flat = indices.reshape(-1)
        if flat.numel():
            with _device_side():
                lo, hi = int(flat.min()), int(flat.max())
            _require(0 <= lo and hi < _INDEX_LIMIT, f"indices values must lie in [0, {_INDEX_LIMIT}), got [{lo}, {hi}]")

    @staticmethod
    def _permute(tokens, indices, num_out_tokens):
        topk = 1 if indices.dim() == 1 else indices.shape[1]
        flat = indices.reshape(-1)
        with _device_side():  # the kernel's own integer sort, not one of the caller's (the op audit bans those)
            first = torch.sort(flat, stable=True).indices  # sortedIndicesFirst (stable: the doc's example)
        sorted_indices = torch.empty_like(first).scatter_(0, first, torch.arange(flat.numel()))  # argSort(first)
        permuted = tokens.index_select(0, torch.div(first, topk, rounding_mode="floor"))
        if num_out_tokens:  # None or 0 keeps every row; negative: a negative slice end
            permuted = permuted[:num_out_tokens]
        return permuted.contiguous(), sorted_indices.to(torch.int32)

    # -- npu_moe_token_unpermute
    def npu_moe_token_unpermute(
        self, permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None
    ):
        _require(
            isinstance(permuted_tokens, torch.Tensor) and isinstance(sorted_indices, torch.Tensor),
            "permuted_tokens and sorted_indices must be tensors",
            TypeError,
        )
        if padded_mode or restore_shape is not None:
            raise NotImplementedError("npu_moe_token_unpermute: only padded_mode=False, restore_shape=None (doc)")
        _require(permuted_tokens.dim() == 2, f"permuted_tokens must be 2-D, got {tuple(permuted_tokens.shape)}")
        _require(
            permuted_tokens.dtype in self.rules.token_dtypes,
            f"permuted_tokens dtype {permuted_tokens.dtype}: torch_npu {self.release} takes {self.rules.token_dtypes}",
            TypeError,
        )
        _require(
            sorted_indices.dtype == torch.int32, f"sorted_indices must be int32, got {sorted_indices.dtype}", TypeError
        )
        n = permuted_tokens.shape[0]
        _require(
            sorted_indices.dim() == 1 and sorted_indices.numel() == n,
            f"sorted_indices must be 1-D of {n} (= rows of permuted_tokens), got {tuple(sorted_indices.shape)}",
        )
        topk = 1
        if probs is not None:
            _require(
                isinstance(probs, torch.Tensor) and probs.dim() == 2,
                "probs must be a 2-D tensor (tokens_num, topK_num)",
            )
            _require(probs.dtype in _FLOATS, f"probs dtype {probs.dtype} not a float", TypeError)
            # not spelled out by the doc; MindSpeed casts permuted_tokens to probs' dtype before the call
            _require(
                probs.dtype == permuted_tokens.dtype,
                f"probs dtype {probs.dtype} != permuted_tokens dtype {permuted_tokens.dtype}",
                TypeError,
            )
            topk = probs.shape[1]
            _require(probs.numel() == n, f"probs {tuple(probs.shape)} does not cover the {n} permuted rows")
            _require(topk <= _MAX_TOPK, f"topK {topk} > {_MAX_TOPK}")
        if n:
            with _device_side():
                ok = bool(torch.equal(torch.sort(sorted_indices.long()).values, torch.arange(n)))
            _require(ok, f"sorted_indices must be a permutation of [0, {n}) (no repeats, in range)")
        if probs is None:
            return self._no_grad_on_old_releases(lambda t: self._unpermute(t, sorted_indices, None, 1), permuted_tokens)
        return self._no_grad_on_old_releases(
            lambda t, p: self._unpermute(t, sorted_indices, p, topk), permuted_tokens, probs
        )

    @staticmethod
    def _unpermute(permuted_tokens, sorted_indices, probs, topk):
        rows = permuted_tokens.index_select(0, sorted_indices.long())  # T[k] = T[S[k]]
        if probs is not None:
            rows = rows * probs.reshape(-1, 1)  # T[k] *= P[i][j]
        return rows.view(-1, topk, rows.shape[-1]).sum(dim=1)  # O[i] = sum of the topK rows of token i

    # -- npu_grouped_matmul
    def npu_grouped_matmul(self, x, weight, *, group_list=None, split_item=0, group_type=-1, group_list_type=0):
        _require(
            isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)),
            "x and weight must be lists of tensors (List[Tensor]), not tensors",
            TypeError,
        )
        _require(len(x) >= 1 and len(weight) >= 1, "x and weight must be non-empty lists")
        _require(all(isinstance(t, torch.Tensor) for t in (*x, *weight)), "x and weight hold tensors", TypeError)
        dtypes = {t.dtype for t in (*x, *weight)}
        _require(
            len(dtypes) == 1 and dtypes <= set(_FLOATS),
            f"non-quantized x/weight must share one float dtype, got {sorted(map(str, dtypes))}",
            TypeError,
        )
        _require(split_item in (0, 1, 2, 3), f"split_item must be 0..3, got {split_item!r}")
        if group_type == -1:
            return self._gmm_ungrouped(x, weight, group_list, split_item)
        _require(group_type in (0, 2), f"group_type {group_type!r}: -1, 0 or 2 on A2/A3 (1 unsupported)")
        _require(
            group_type in self.rules.eager_group_types,
            f"group_type currently only support {self.rules.eager_group_types} (torch_npu {self.release})",
        )
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
            raise TypeError(
                "ReferenceNpuOps takes group_list as a device tensor only (a host List[int] forces "
                "a sync and caps groups at 128); got a Python list"
            )
        _require(isinstance(group_list, torch.Tensor), "grouped matmul needs a group_list tensor", TypeError)
        _require(group_list.dtype == torch.int64, f"group_list dtype must be int64, got {group_list.dtype}", TypeError)
        _require(
            group_list.dim() == 1 and group_list.numel() >= 1,
            f"group_list must be 1-D and non-empty, got {tuple(group_list.shape)}",
        )
        _require(group_list.numel() <= _MAX_GROUPS, f"{group_list.numel()} groups > {_MAX_GROUPS}")
        _require(group_list_type in (0, 1, 2), f"group_list_type must be 0, 1 or 2, got {group_list_type!r}")
        if group_list_type == 2:
            raise NotImplementedError("group_list_type=2 ([E, 2] pairs) is for int8 x/weight only (doc)")
        values = _host_ints(group_list)
        _require(min(values) >= 0, f"group_list must be non-negative, got {values}")
        if group_list_type == 1:
            _require(len(values) != 1, "group_list_type=1: group_list must not have length 1 (doc)")
            return values
        _require(
            all(a <= b for a, b in itertools.pairwise(values)),
            f"group_list_type=0 wants cumulative ends (non-decreasing), got {values}",
        )
        return [b - a for a, b in zip([0] + values[:-1], values, strict=True)]

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
        _require(
            x.stride(-1) == 1 and (x.shape[0] <= 1 or x.stride(0) == x.shape[1]),
            "x must be a plain row-major [M, K] tensor (the doc: x does not support transposition)",
        )
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
        _require(
            all(m.shape[0] == x.shape[1] for m in mats),
            f"weight K {[m.shape[0] for m in mats][:4]}... != x K {x.shape[1]} (weight must be [G, K, N])",
        )
        _require(len({m.shape[1] for m in mats}) == 1, "every group's N must be equal")
        _require(
            sum(sizes) == x.shape[0], f"group sizes add up to {sum(sizes)}, x has {x.shape[0]} rows (must be equal)"
        )
        out = x.new_empty(x.shape[0], mats[0].shape[1])
        start = 0
        for m, n in zip(mats, sizes, strict=True):
            if n:
                torch.mm(x[start : start + n], m, out=out[start : start + n])
            start += n
        return out

    def _gmm_k(self, x: torch.Tensor, weight, sizes: list[int]) -> torch.Tensor:
        """k-axis grouping: x ``[K, M]`` (transposed view), weight ``[M, N]``, y ``[G, K, N]``."""
        _require(
            x.dim() == 2 and _is_transposed_2d(x),
            f"k-axis grouping needs x as a transposed view [K, M] (stride (1, K)), got shape "
            f"{tuple(x.shape)} stride {x.stride()}",
        )
        _require(len(weight) == 1, "k-axis grouping takes a single weight tensor")
        w = weight[0]
        _require(
            w.dim() == 2 and w.shape[0] == x.shape[1],
            f"weight must be 2-D [M, N] with M = x.shape[1] = {x.shape[1]}, got {tuple(w.shape)}",
        )
        _require(
            w.stride(-1) == 1 and (w.shape[0] <= 1 or w.stride(0) == w.shape[1]),
            "k-axis grouping: weight must not be transposed",
        )
        _require(
            sum(sizes) == x.shape[1],
            f"group sizes add up to {sum(sizes)}, grouped axis (x.shape[1]) is {x.shape[1]} (must be equal)",
        )
        out = x.new_full((len(sizes), x.shape[0], w.shape[1]), float("nan"))  # empty groups: undefined
        start = 0
        for g, n in enumerate(sizes):
            if n:
                torch.mm(x[:, start : start + n], w[start : start + n], out=out[g])
            start += n
        return out

    def _gmm_ungrouped(self, x, weight, group_list, split_item) -> list[torch.Tensor]:
        """group_type=-1: independent ``x_i @ weight_i`` (multi-multi-multi)."""
        _require(group_list is None, "group_type=-1 takes no group_list")
        _require(split_item in (0, 1), f"group_type=-1 (multi tensors) needs split_item 0 or 1, got {split_item}")
        _require(len(x) == len(weight), f"{len(x)} x tensors for {len(weight)} weights")
        _require(len(x) <= 128, "at most 128 tensors")
        out = []
        for xi, wi in zip(x, weight, strict=True):
            _require(
                wi.dim() == 2 and 2 <= xi.dim() <= 6 and xi.shape[-1] == wi.shape[0],
                f"x {tuple(xi.shape)} @ weight {tuple(wi.shape)}: weight must be 2-D [K, N]",
            )
            self._check_weight_layout(wi)
            out.append(xi @ wi)
        return out


def fake_torch_npu(release: str = NEWEST) -> types.SimpleNamespace:
    """A torch_npu module whose kernels have the documented signatures and the stand-in's semantics."""
    ref, calls = ReferenceNpuOps(release), []

    def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
        calls.append("permute")
        return ref.npu_moe_token_permute(tokens, indices, num_out_tokens, padded_mode)

    def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
        calls.append("unpermute")
        return ref.npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs, padded_mode, restore_shape)

    def npu_grouped_matmul(
        x,
        weight,
        *,
        bias=None,
        scale=None,
        offset=None,
        antiquant_scale=None,
        antiquant_offset=None,
        per_token_scale=None,
        group_list=None,
        activation_input=None,
        activation_quant_scale=None,
        activation_quant_offset=None,
        split_item=0,
        group_type=-1,
        group_list_type=0,
        act_type=0,
        output_dtype=None,
        tuning_config=None,
    ):
        calls.append(f"gmm{group_type}")
        return ref.npu_grouped_matmul(
            x,
            weight,
            group_list=group_list,
            split_item=split_item,
            group_type=group_type,
            group_list_type=group_list_type,
        )

    return types.SimpleNamespace(
        npu_moe_token_permute=npu_moe_token_permute,
        npu_grouped_matmul=npu_grouped_matmul,
        npu_moe_token_unpermute=npu_moe_token_unpermute,
        calls=calls,
        __version__=f"{release}+stand-in",
    )


CANN_ERROR = "libhccl.so: cannot open shared object file: No such file or directory"


def plant_broken_torch_npu(site) -> None:
    """In folder ``site``: a torch_npu that fails to import as the real one does without CANN's environment,
    with the ``torch.backends`` entry point through which ``import torch`` loads it."""
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text(f"raise ImportError({CANN_ERROR!r})\n")
    info = site / "torch_npu-2.14.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.14.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")


# -- the fused dense kernels and the fp32 weight-gradient accumulation (npu_parallel/parallel/kernels.py) ------------


class ReferenceKernels(ReferenceNpuOps):
    """The documented semantics of ``npu_swiglu``, ``npu_rms_norm``, ``npu_rotary_mul``, ``npu_fusion_attention``
    and ``npu_grouped_matmul_add_`` (torch_npu 2.6 schemas, ``_op_plugin_docs.py``), strict like the MoE kernels;
    installed with ``npu_parallel.parallel.kernels.use_kernels`` they run the fused paths on CPU."""

    def npu_swiglu(self, input, dim=-1):
        _require(input.dtype in _FLOATS, f"npu_swiglu: dtype {input.dtype} not float16/bfloat16/float32", TypeError)
        _require(1 <= input.dim() <= 8 and input.numel() > 0, "npu_swiglu: 1-8 dims, not empty")
        _require(input.is_contiguous(), "npu_swiglu: non-contiguous input is not supported")
        _require(input.shape[dim] % 2 == 0, f"npu_swiglu: dim {dim} of {tuple(input.shape)} must be even")
        a, b = input.chunk(2, dim=dim)
        return torch.nn.functional.silu(a) * b

    def npu_rms_norm(self, input, gamma, epsilon=1e-06):
        _require(input.dtype in _FLOATS, f"npu_rms_norm: dtype {input.dtype} not a float", TypeError)
        _require(gamma.dtype == input.dtype, f"npu_rms_norm: gamma {gamma.dtype} != input {input.dtype}", TypeError)
        _require(
            tuple(input.shape[input.dim() - gamma.dim() :]) == tuple(gamma.shape),
            f"npu_rms_norm: gamma {tuple(gamma.shape)} is not the trailing shape of {tuple(input.shape)}",
        )
        dims = tuple(range(input.dim() - gamma.dim(), input.dim()))
        x = input.float()
        rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + epsilon)  # [..., 1]: float32, as the doc's output
        return (x * rstd).to(input.dtype) * gamma, rstd

    def npu_rotary_mul(self, input, r1, r2, rotary_mode="half"):
        _require(rotary_mode in ("half", "interleave"), f"npu_rotary_mul: rotary_mode {rotary_mode!r}")
        _require(all(t.dim() == 4 for t in (input, r1, r2)), "npu_rotary_mul: input, r1, r2 must be 4-D")
        _require(
            input.dtype in _FLOATS and r1.dtype == r2.dtype == input.dtype,
            f"npu_rotary_mul: dtypes {input.dtype}, {r1.dtype}, {r2.dtype}",
            TypeError,
        )
        _require(r1.shape == r2.shape, "npu_rotary_mul: r1 and r2 shapes differ")
        b, n, s, d = input.shape
        _require(d % 2 == 0 and d < 896, f"npu_rotary_mul: D={d} must be even and < 896")
        if rotary_mode == "interleave":
            _require(b * n < 1000, f"npu_rotary_mul(interleave): B*N = {b * n} must be < 1000")
            # BNSD input takes 11SD tables, BSND 1S1D, SBND S11D (the doc's jit_compile=False table)
            _require(
                tuple(r1.shape) in ((1, 1, s, d), (1, n, 1, d), (b, 1, 1, d)),
                f"npu_rotary_mul(interleave): r1 {tuple(r1.shape)} fits no layout of input {tuple(input.shape)}",
            )
            x1, x2 = input[..., ::2], input[..., 1::2]
            rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        else:
            x1, x2 = input.chunk(2, dim=-1)
            rotated = torch.cat((-x2, x1), dim=-1)
        return r1 * input + r2 * rotated

    def npu_fusion_attention(
        self, query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None, scale=1.0,
        keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0, prefix=None,
        actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
    ):  # fmt: skip
        if input_layout == "TND":
            return self._fusion_attention_tnd(
                query, key, value, head_num, atten_mask, scale, keep_prob, actual_seq_qlen, actual_seq_kvlen,
                sparse_mode,
            )  # fmt: skip
        if input_layout != "BNSD" or pse is not None or padding_mask is not None or prefix is not None:
            raise NotImplementedError("stand-in: BNSD or TND layout without pse/padding_mask/prefix only")
        _require(keep_prob == 1.0, "stand-in: no dropout (keep_prob must be 1)")
        _require(
            query.dtype in _FLOATS and key.dtype == value.dtype == query.dtype, "q/k/v dtypes must agree", TypeError
        )
        (b, n, sq, dq), (_, nkv, skv, dk), dv = query.shape, key.shape, value.shape[-1]
        _require(head_num == n, f"head_num {head_num} != query heads {n}")
        _require(key.shape[:3] == value.shape[:3], "key and value must agree but for D")
        _require(dq == dk and dk >= dv and dk <= 768, f"the doc wants Dq = Dk >= Dv, <= 768; got {dq}, {dk}, {dv}")
        _require(n % nkv == 0, f"query heads {n} not a multiple of key/value heads {nkv}")
        mask = None
        if atten_mask is not None:
            _require(atten_mask.dtype in (torch.bool, torch.uint8), "atten_mask must be bool/uint8", TypeError)
            if sparse_mode == 2:  # leftUpCausal: the compressed 2048x2048 upper triangle
                _require(tuple(atten_mask.shape) == (2048, 2048), "sparse_mode=2 wants the 2048x2048 mask")
                mask = torch.ones(sq, skv, dtype=torch.bool).triu(1)
            elif sparse_mode == 0:
                _require(
                    atten_mask.dim() == 2 or (atten_mask.dim() == 4 and atten_mask.shape[1] in (1, n)),
                    f"atten_mask shape {tuple(atten_mask.shape)}: BNSS, B1SS, 11SS or SS",
                )
                _require(tuple(atten_mask.shape[-2:]) == (sq, skv), "atten_mask must be [.., Sq, Skv]")
                mask = atten_mask.bool()
            else:
                raise NotImplementedError(f"stand-in: sparse_mode {sparse_mode}")
        k = key.repeat_interleave(n // nkv, dim=1)
        v = value.repeat_interleave(n // nkv, dim=1)
        scores = (query.float() @ k.float().transpose(-1, -2)) * scale  # [B, N, Sq, Skv]
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        out = (scores.softmax(-1) @ v.float()).to(query.dtype)  # [B, N, Sq, Dv]
        stats = scores.amax(-1, keepdim=True).expand(b, n, sq, 8).detach()  # softmax_max's documented [B, N, S, 8]
        return out, stats, stats, query.new_empty(0), 0, 0, 0

    def _fusion_attention_tnd(
        self, query, key, value, head_num, atten_mask, scale, keep_prob, actual_seq_qlen, actual_seq_kvlen,
        sparse_mode,
    ):  # fmt: skip
        """TND (varlen): ``[T, N, D]`` tokens, documents given as cumulative ends (the doc: ``actual_seq_qlen``
        and ``actual_seq_kvlen`` are prefix sums, host lists, the last one T); causal per document with
        sparse_mode 3 (rightDownCausal) and the compressed 2048 x 2048 mask."""
        _require(keep_prob == 1.0, "stand-in: no dropout (keep_prob must be 1)")
        _require(query.dim() == key.dim() == value.dim() == 3, "TND: query/key/value must be [T, N, D]")
        (t, n, dq), (_, nkv, dk), dv = query.shape, key.shape, value.shape[-1]
        _require(head_num == n, f"head_num {head_num} != query heads {n}")
        _require(dq == dk and dk >= dv and dk <= 768, f"the doc wants Dq = Dk >= Dv, <= 768; got {dq}, {dk}, {dv}")
        _require(isinstance(actual_seq_qlen, list | tuple) and actual_seq_qlen, "TND needs actual_seq_qlen (a list)")
        _require(list(actual_seq_qlen) == list(actual_seq_kvlen or []), "stand-in: actual_seq_kvlen = qlen only")
        ends = [int(e) for e in actual_seq_qlen]
        _require(all(a < b for a, b in itertools.pairwise([0, *ends])), f"ends must increase: {ends}")
        _require(ends[-1] == t, f"the last end {ends[-1]} must be the token count {t}")
        _require(sparse_mode == 3, f"stand-in: TND with sparse_mode 3 (rightDownCausal) only, got {sparse_mode}")
        _require(
            atten_mask is not None and tuple(atten_mask.shape) == (2048, 2048) and atten_mask.dtype == torch.bool,
            "sparse_mode=3 wants the 2048x2048 bool mask",
        )
        k = key.repeat_interleave(n // nkv, dim=1)
        v = value.repeat_interleave(n // nkv, dim=1)
        outs = []
        for a, b in itertools.pairwise([0, *ends]):
            qs, ks, vs = (x[a:b].transpose(0, 1).float() for x in (query, k, v))  # [N, len, D]
            scores = (qs @ ks.transpose(-1, -2)) * scale
            causal = torch.ones(b - a, b - a, dtype=torch.bool, device=query.device).triu(1)
            outs.append((scores.masked_fill(causal, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
        out = torch.cat(outs).to(query.dtype)  # [T, N, Dv]
        stats = query.new_zeros(t, n, 8, dtype=torch.float32)
        return out, stats, stats, query.new_empty(0), 0, 0, 0

    def npu_grouped_matmul_add_(self, y, x, weight, group_list, *, transpose_x=True, transpose_weight=False,
                                group_type=2):  # fmt: skip
        _require(transpose_x is True and transpose_weight is False, "only transpose_x=True, transpose_weight=False")
        _require(group_type == 2, f"group_type must be 2 (k-axis), got {group_type}")
        _require(y.dtype == torch.float32, f"y (self) must be float32, got {y.dtype}", TypeError)
        _require(
            x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype,
            f"x/weight must share float16 or bfloat16, got {x.dtype}/{weight.dtype}",
            TypeError,
        )
        _require(x.dim() == 2 and weight.dim() == 2 and x.shape[0] == weight.shape[0], "x [K, M], weight [K, N]")
        _require(group_list.dtype == torch.int64 and group_list.dim() == 1, "group_list: 1-D int64", TypeError)
        _require(group_list.numel() <= _MAX_GROUPS, f"{group_list.numel()} groups > {_MAX_GROUPS}")
        ends = _host_ints(group_list)
        _require(
            all(a <= b for a, b in itertools.pairwise([0, *ends])) and ends[-1] <= x.shape[0],
            f"group_list must be non-decreasing cumulative ends <= {x.shape[0]}, got {ends}",
        )
        _require(tuple(y.shape) == (len(ends), x.shape[1], weight.shape[1]), f"y [g, M, N], got {tuple(y.shape)}")
        with torch.no_grad():
            for g, (a, b) in enumerate(itertools.pairwise([0, *ends])):
                if b > a:
                    y[g] += x[a:b].float().t() @ weight[a:b].float()
        return y
