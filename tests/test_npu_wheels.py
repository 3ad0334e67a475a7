"""The ``npu`` MoE path against torch_npu's OWN schemas and meta kernels, per release, on CPU (meta tensors).

Each release's wheel comes from the package registry once (cached in the venv, tests/npu_wheels.py); its
``npu::`` schemas check our argument names, keywords and values, its meta kernels our shapes. The stand-in
(tests/npu_reference.py) keeps the numerics; here its per-release rules are tied to the wheels.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn

from npu_parallel.moe.dispatchers.npu import NpuDispatcher
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.moe.npu_ops import NpuOps

from . import npu_reference
from .npu_wheels import VERSIONS, binary_facts, registered, wheel

# 2.5.1's token kernels have no autograd: PyTorch's fallback warns (the tests assert what it leaves)
pytestmark = pytest.mark.filterwarnings("ignore:npu..npu_moe_token_.*autograd kernel was not registered")

H, I, T, K = 16, 8, 6, 2  # noqa: E741 (hidden, expert intermediate, tokens, top-k)
META = torch.device("meta")


@pytest.fixture(scope="session")
def wheels():
    """Every tested release's wheel, downloaded once per venv; a skip saying why when the registry is unreachable
    (a failure instead where NPU_WHEELS_REQUIRED=1, as in CI, which has registry access)."""
    try:
        return {v: wheel(v) for v in VERSIONS}
    except RuntimeError as exc:
        if os.environ.get("NPU_WHEELS_REQUIRED") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"torch_npu-{v}" for v in VERSIONS])
def release(request, wheels):
    with registered(request.param, wheels[request.param]) as rel:
        yield rel


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _stand_in_rules(version: str) -> npu_reference.Release:
    return npu_reference.RELEASES[".".join(version.split(".")[:3]).split(".post")[0]]


def _experts(num_experts: int, dtype=torch.bfloat16) -> LocalExperts:
    return LocalExperts(
        nn.Parameter(torch.empty(num_experts, 2 * I, H, device=META, dtype=dtype)),
        nn.Parameter(torch.empty(num_experts, H, I, device=META, dtype=dtype)),
        nn.SiLU(),
        num_experts=num_experts,
        expert_start=0,
    )


def _inputs(num_experts: int, k: int = K):
    x = torch.empty(T, H, device=META, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.zeros(T, k, device=META, dtype=torch.int64)
    weights = torch.empty(T, k, device=META, dtype=torch.float32, requires_grad=True)  # the routers' fp32
    return x, idx, weights


def test_every_kernel_we_call_has_a_schema_and_a_meta_kernel(release):
    for name in ("npu_moe_token_permute", "npu_moe_token_unpermute", "npu_grouped_matmul"):
        assert name in release.defined and name in release.meta, name


def test_forward_shapes_with_the_releases_schemas(release):
    """Every expert local: permute -> grouped matmul (m-axis, counts) -> unpermute, keywords as the schema names."""
    experts = _experts(4)
    x, idx, weights = _inputs(4)
    out = NpuDispatcher(ops=NpuOps(release.ops))(x, idx, weights, experts)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16 and out.device == META


def test_one_local_expert_never_calls_the_grouped_matmul(release, monkeypatch):
    """E/ep = 1: a length-1 group list with group_list_type=1 is forbidden, so the rows take a plain matmul."""
    calls = []
    gmm = release.ops.npu_grouped_matmul
    monkeypatch.setattr(release.ops, "npu_grouped_matmul", lambda *a, **k: calls.append(k) or gmm(*a, **k))
    x, idx, weights = _inputs(1, k=1)
    out = NpuDispatcher(ops=NpuOps(release.ops))(x, idx, weights, _experts(1))
    out.float().sum().backward()
    assert out.shape == (T, H) and calls == []


def test_weight_gradient_traces_only_where_the_meta_kernel_takes_group_type_2(release):
    """Our grouped-matmul backward groups the k axis (group_type=2): the meta kernels of <= 2.6 reject it, so a
    graph-mode step cannot trace it there (eager 2.6 runs it; 2.5.1 rejects it in eager too)."""
    experts = _experts(4)
    x, idx, weights = _inputs(4)
    out = NpuDispatcher(ops=NpuOps(release.ops))(x, idx, weights, experts)
    if _minor(release.version) <= (2, 6):
        with pytest.raises(RuntimeError, match=r"group_type only support -1 and 0"):
            out.float().sum().backward()
    else:  # the whole training backward traces on meta tensors
        out.float().sum().backward()
        assert experts.gate_up_proj.grad.shape == experts.gate_up_proj.shape
        assert experts.down_proj.grad.shape == experts.down_proj.shape
        assert x.grad.shape == x.shape and weights.grad.shape == weights.shape


def test_token_kernels_autograd_matches_the_stand_in(release):
    """2.5.1 ships no backward ops for permute/unpermute (so no autograd); 2.6+ do, with these shapes."""
    has_grad = {"npu_moe_token_permute_grad", "npu_moe_token_unpermute_grad"} <= release.defined
    assert has_grad == _stand_in_rules(release.version).token_autograd
    if not has_grad:
        return
    tokens = torch.empty(T, H, device=META, dtype=torch.bfloat16)
    permuted = torch.empty(T * K, H, device=META, dtype=torch.bfloat16)
    indices = torch.zeros(T, K, device=META, dtype=torch.int32)
    sorted_indices = torch.zeros(T * K, device=META, dtype=torch.int32)
    probs = torch.empty(T, K, device=META, dtype=torch.bfloat16)  # cast to the tokens' dtype, as combine does
    grad_permuted, grad_probs = torch.ops.npu.npu_moe_token_unpermute_grad(
        permuted, torch.empty(T, H, device=META, dtype=torch.bfloat16), sorted_indices, probs=probs
    )
    assert grad_permuted.shape == (T * K, H) and grad_probs.shape == (T, K) and grad_probs.dtype == torch.bfloat16
    grad_tokens = torch.ops.npu.npu_moe_token_permute_grad(tokens, grad_permuted, indices, sorted_indices)
    assert grad_tokens.shape == (T, H)


def test_backward_shapes_through_the_releases_grad_kernels(release):
    """Tokens and routing weights get gradients of their shapes and dtypes from the release's _grad meta kernels
    (2.6+); on 2.5.1 they get none. Expert weights frozen here: their gradient is the group_type=2 test's."""
    experts = _experts(4).requires_grad_(False)
    x, idx, weights = _inputs(4)
    out = NpuDispatcher(ops=NpuOps(release.ops))(x, idx, weights, experts)
    if not release.token_autograd:
        assert out.grad_fn.name() == "torch::autograd::WarnNotImplemented"  # PyTorch's autograd fallback
        out.float().sum().backward()
        assert x.grad is None and weights.grad is None  # no gradient for the tokens nor the router
        return
    out.float().sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16
    assert weights.grad.shape == weights.shape and weights.grad.dtype == torch.float32  # back through the cast


def test_stand_in_rules_match_the_releases_library(release, wheels):
    """The eager rules only the compiled library states: autograd nodes for the token kernels, group_type=2."""
    facts = binary_facts(wheels[release.version])
    rules = _stand_in_rules(release.version)
    assert facts["permute_backward"] == facts["unpermute_backward"] == rules.token_autograd == release.token_autograd
    assert facts["eager_rejects_group_type_2"] == (2 not in rules.eager_group_types)


def test_argument_names_are_checked_by_the_schema(release):
    """A keyword the release does not have is refused: the schemas, not our adapter, decide."""
    x = torch.empty(4, H, device=META, dtype=torch.bfloat16)
    with pytest.raises((RuntimeError, TypeError), match=r"group_lists|unexpected keyword"):
        release.ops.npu_grouped_matmul([x], [x.t()], group_lists=None)


# -- the fused dense kernels and the fp32 weight-gradient kernel, called exactly as our wrappers call them ---------

B, N, S, DK, DV = 2, 4, 5, 192, 128  # MLA's Dk = 192 > Dv = 128


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device=META, dtype=dtype)


@pytest.fixture
def wrappers(release, monkeypatch):
    """The real wrappers routed through the release's ops. Their capability probes compare numerics, which meta
    tensors have none of: the probe is taken as passed (a failing probe is the twin, tested elsewhere)."""
    from npu_parallel.moe import npu_ops
    from npu_parallel.parallel import kernels

    monkeypatch.setattr(kernels, "probe", lambda *a, **k: True)
    monkeypatch.setattr(npu_ops, "probe", lambda *a, **k: True)
    with kernels.use_kernels(release.ops):
        yield kernels


def test_every_fused_kernel_has_a_schema_and_a_meta_kernel(release):
    rules = _stand_in_rules(release.version)
    for name in ("npu_swiglu", "npu_rms_norm", "npu_rotary_mul", "npu_fusion_attention", "npu_grouped_matmul_add_"):
        assert name in release.defined, name
    for name in ("npu_swiglu", "npu_swiglu_backward", "npu_rms_norm", "npu_rms_norm_backward", "npu_rotary_mul",
                 "npu_rotary_mul_backward", "npu_fusion_attention", "npu_fusion_attention_grad"):  # fmt: skip
        assert name in release.meta, name
    assert ("npu_grouped_matmul_add_" in release.meta) == rules.gmm_add_meta


def test_swiglu_as_the_wrappers_call_it(release, wrappers):
    h = _t(T, 2 * I)
    out = wrappers.swiglu(h)  # npu_swiglu(h, dim=-1)
    pair = wrappers.swiglu_pair(_t(T, I), _t(T, I))  # npu_swiglu(cat, dim=-1)
    assert out.shape == pair.shape == (T, I) and out.dtype == torch.bfloat16
    grad = torch.ops.npu.npu_swiglu_backward(_t(T, I), h, dim=-1)
    assert grad.shape == h.shape and grad.dtype == h.dtype


def test_rms_norm_as_the_wrapper_calls_it(release, wrappers):
    x, w = _t(T, H), _t(H)
    out = wrappers.rms_norm(x, w, 1e-6)  # npu_rms_norm(x, w, epsilon=eps)[0]
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    _, rstd = torch.ops.npu.npu_rms_norm(x, w, epsilon=1e-6)
    assert rstd.shape == (T, 1) and rstd.dtype == torch.float32
    dx, dgamma = torch.ops.npu.npu_rms_norm_backward(_t(T, H), x, w, rstd)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dgamma.shape == w.shape
    assert dgamma.dtype == (_stand_in_rules(release.version).rms_dgamma_dtype or w.dtype)


def test_rotary_interleave_as_the_wrapper_calls_it(release, wrappers):
    """rotary_mode is in every release's schema (2.5.1 included): no release needs the keyword withheld."""
    x = _t(B, N, S, 64)
    out = wrappers.rotary_interleaved(x, _t(1, S, 32, dtype=torch.float32), _t(1, S, 32, dtype=torch.float32))
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    xf, r = _t(B, N, S, 64, dtype=torch.float32), _t(1, 1, S, 64, dtype=torch.float32)
    dx, dr1, dr2 = torch.ops.npu.npu_rotary_mul_backward(_t(B, N, S, 64, dtype=torch.float32), xf, r, r, "interleave")
    assert dx.shape == xf.shape and dr1.shape == dr2.shape == r.shape


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "bool-mask"])
def test_fusion_attention_as_the_wrapper_calls_it(release, wrappers, masked, monkeypatch):
    """Dk 192 > Dv 128 unpadded. The meta kernels of 2.5.1/2.6.0 shape the output like the query: the wrapper
    hands graph mode to SDPA there (None), and eager (the device kernel, checked by the probe) keeps the fused call."""
    q, k, v = _t(B, N, S, DK), _t(B, N, S, DK), _t(B, N, S, DV)
    mask = torch.ones(B, 1, S, S, device=META, dtype=torch.bool) if masked else None
    call = dict(scale=0.1, is_causal=not masked)
    meta_dv = _stand_in_rules(release.version).attention_meta_dv
    assert meta_dv == (_minor(release.version) >= wrappers.ATTENTION_META_DV)
    out = wrappers.fusion_attention(q, k, v, mask, **call)  # eager: the kernel is called on every release
    assert out.shape == (B, N, S, DV if meta_dv else DK) and out.dtype == torch.bfloat16
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = wrappers.fusion_attention(q, k, v, mask, **call)
    if meta_dv:
        assert traced.shape == (B, N, S, DV)
    else:
        assert traced is None  # SDPA instead of a mis-shaped [B, N, S, Dq] trace
    _, softmax_max, softmax_sum, *_ = torch.ops.npu.npu_fusion_attention(q, k, v, N, "BNSD", scale=0.1)
    dq, dk, dv, *_ = torch.ops.npu.npu_fusion_attention_grad(
        q, k, v, _t(B, N, S, DV), N, "BNSD", softmax_max=softmax_max, softmax_sum=softmax_sum,
        attention_in=_t(B, N, S, DV), scale_value=0.1, keep_prob=1.0,
    )  # fmt: skip
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_fusion_attention_tnd_as_the_wrapper_calls_it(release, wrappers):
    """A packed batch's TND call (convert/documents.py -> kernels._varlen_attention): [B*S, N, D] tokens,
    actual_seq_qlen/kvlen as host prefix sums, sparse_mode 3 with the 2048 x 2048 mask, MLA's Dk > Dv unpadded:
    the release's schema takes it and its meta kernel shapes the output [B, N, S, Dv] (like the value where
    the BNSD meta does, else like the query: graph mode then takes SDPA, as for BNSD)."""
    q, k, v = _t(B, N, S, DK), _t(B, N, S, DK), _t(B, N, S, DV)
    mask = torch.ones(B, 1, S, S, device=META, dtype=torch.bool)
    seq_lens = [2, S, S + 3, 2 * S]  # row 0: documents of 2 and 3 tokens; row 1: 3 tokens, then 2 of padding
    out = wrappers.fusion_attention(q, k, v, mask, scale=0.1, is_causal=False, seq_lens=seq_lens)
    meta_dv = _stand_in_rules(release.version).attention_meta_dv
    assert out.shape == (B, N, S, DV if meta_dv else DK) and out.dtype == torch.bfloat16
    tokens = torch.ops.npu.npu_fusion_attention(
        _t(B * S, N, DK), _t(B * S, N, DK), _t(B * S, N, DV), N, "TND", atten_mask=_t(2048, 2048, dtype=torch.bool),
        scale=0.1, sparse_mode=3, actual_seq_qlen=seq_lens, actual_seq_kvlen=seq_lens,
    )  # fmt: skip
    assert tokens[0].shape == (B * S, N, DV if meta_dv else DK)


def test_weight_gradient_into_main_grad_as_the_wrapper_calls_it(release, wrappers, monkeypatch):
    """accumulate_wgrad's npu_grouped_matmul_add_(main_grad, dy, x, ends, transpose_x=True, transpose_weight=False,
    group_type=2): no group_list_type (not in the 2.5/2.6 schema); 2.5.1 has no meta kernel, so graph mode takes
    the twin there."""
    from npu_parallel.moe import npu_ops

    rules = _stand_in_rules(release.version)
    ops, g = NpuOps(release.ops), 3
    main_grad, x, dy = _t(g, H, I, dtype=torch.float32), _t(T, I), _t(T, H)
    counts = torch.zeros(g, device=META, dtype=torch.int64)
    if rules.gmm_add_meta:
        assert npu_ops.accumulate_wgrad(ops, main_grad, x, dy, counts) is main_grad
    else:
        with pytest.raises(NotImplementedError, match="Meta kernel"):
            npu_ops.accumulate_wgrad(ops, main_grad, x, dy, counts)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not npu_ops.gmm_add_ok(ops, "meta")
    ends = counts.cumsum(0)
    refused = pytest.raises(RuntimeError, match=r"expected at most 7 argument")  # group_list_type: 2.14 only
    with contextlib.nullcontext() if rules.gmm_add_group_list_type else refused:
        torch.ops.npu.npu_grouped_matmul_add_(main_grad, dy, x, ends, transpose_x=True, transpose_weight=False,
                                              group_type=2, group_list_type=0)  # fmt: skip
