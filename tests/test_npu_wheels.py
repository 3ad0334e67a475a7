"""The ``npu`` MoE path against torch_npu's OWN schemas and meta kernels, per release, on CPU (meta tensors).

Each release's wheel comes from the package registry once (cached in the venv, tests/npu_wheels.py); its
``npu::`` schemas check our argument names, keywords and values, its meta kernels our shapes. The stand-in
(tests/npu_reference.py) keeps the numerics; here its per-release rules are tied to the wheels.
"""

from __future__ import annotations

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
