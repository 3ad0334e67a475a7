"""The "npu" MoE dispatcher on torch_npu's fused kernels, run on CPU through the documented-semantics stand-in."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import npu_parallel.parallel.device as device
from npu_parallel.moe.dispatchers.grouped import GroupedDispatcher
from npu_parallel.moe.dispatchers.npu import PROBE_NAME, NpuDispatcher, kernels_work
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.moe.npu_ops import NpuOps, npu_ops
from npu_parallel.parallel.probe import probe_results, reset_probes
from npu_parallel.tools.audit import OpAudit

from .npu_reference import RELEASES, ReferenceNpuOps, fake_torch_npu


@pytest.fixture(autouse=True)
def _fresh_probes():
    reset_probes()  # each test sees its own fake torch_npu: the per-process verdict must not leak between them
    yield
    reset_probes()


H, I = 8, 6  # noqa: E741 (hidden, expert intermediate: the shape legend)


def _experts(num_experts: int, num_local: int, start: int, dtype=torch.float32, seed: int = 0) -> LocalExperts:
    g = torch.Generator().manual_seed(seed)
    return LocalExperts(
        nn.Parameter(torch.randn(num_local, 2 * I, H, generator=g).to(dtype)),
        nn.Parameter(torch.randn(num_local, H, I, generator=g).to(dtype)),
        nn.SiLU(),
        num_experts=num_experts,
        expert_start=start,
    )


def _routing(tokens: int, k: int, allowed: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token drawn from ``allowed``, softmax-ish float32 weights."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(allowed)
    idx = torch.stack([pool[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g).softmax(-1)
    return idx.to(torch.int64), weights


def _run(fn, x, idx, w, experts, grad):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(x, idx, w, experts)
    params = [experts.gate_up_proj, experts.down_proj]
    grads = torch.autograd.grad(out, [x, w, *params], grad)
    return out.detach(), grads


# (num_experts, num_local, expert_start, k, tokens, which experts the router may pick)
CASES = {
    "all_local": (8, 8, 0, 2, 16, None),
    "ep_middle": (8, 3, 2, 2, 16, None),
    "ep_last": (8, 2, 6, 3, 16, None),
    "ep_first_k1": (16, 4, 0, 1, 12, None),
    "one_token": (6, 2, 2, 2, 1, None),
    "empty_local_experts": (8, 4, 4, 2, 10, [0, 1, 2, 3, 4, 6]),  # local experts 5 and 7 get nothing
    "rank_gets_no_tokens": (8, 2, 4, 2, 9, [0, 1, 2, 3, 6, 7]),
    "all_local_empty_expert": (4, 4, 0, 2, 6, [0, 2, 3]),
    "one_local_expert": (8, 1, 3, 2, 10, None),  # E/ep = 1: a plain matmul (length-1 group lists are forbidden)
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_grouped_forward_and_gradients(case):
    e, e_local, start, k, t, allowed = CASES[case]
    experts = _experts(e, e_local, start)
    idx, w = _routing(t, k, allowed if allowed is not None else list(range(e)))
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(t, H, generator=torch.Generator().manual_seed(3))

    out, grads = _run(NpuDispatcher(ops=ReferenceNpuOps()), x, idx, w, experts, grad)
    ref, ref_grads = _run(GroupedDispatcher(), x, idx, w, experts, grad)

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for name, got, want in zip(("x", "weights", "gate_up_proj", "down_proj"), grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)
    if case == "rank_gets_no_tokens":
        assert out.abs().max() == 0 and all(g.abs().max() == 0 for g in grads)
    if allowed is not None:  # experts with no rows: exactly zero gradients (not the stand-in's NaN)
        for local in range(e_local):
            if start + local not in allowed:
                assert grads[2][local].abs().max() == 0 and grads[3][local].abs().max() == 0


@pytest.mark.parametrize("release", list(RELEASES))
def test_each_release_in_bfloat16(release):
    """2.6+: the grouped path's gradients; 2.5.1 (no autograd for permute/unpermute): none, and the probe says so."""
    experts = _experts(8, 4, 4, dtype=torch.bfloat16)
    idx, w = _routing(12, 2, list(range(8)))
    g = torch.Generator().manual_seed(5)
    x, grad = (torch.randn(12, H, generator=g).to(torch.bfloat16) for _ in range(2))
    ops = ReferenceNpuOps(release)
    if RELEASES[release].token_autograd:
        got = _run(NpuDispatcher(ops=ops), x, idx, w, experts, grad)
        ref = _run(GroupedDispatcher(), x, idx, w, experts, grad)
        for a, b in zip(got[1], ref[1], strict=True):  # bf16 sums in another order: relative norm
            assert (a.float() - b.float()).norm() <= 0.02 * b.float().norm()
    else:
        out = NpuDispatcher(ops=ops)(x.requires_grad_(True), idx, w.requires_grad_(True), experts)
        with pytest.raises(ValueError, match="group_type currently only support"):  # the expert weight gradient
            out.float().sum().backward()
        experts.requires_grad_(False)
        out = NpuDispatcher(ops=ops)(x, idx, w, experts)
        with pytest.warns(UserWarning, match="autograd kernel was not registered"):
            out.float().sum().backward()
        assert x.grad is None and w.grad is None  # what 2.5.1 does: no gradient for the tokens nor the router
        with pytest.raises(TypeError, match=r"torch_npu 2\.5\.1 takes"):  # fp32 tokens: bf16 only on 2.5.1
            NpuDispatcher(ops=ops)(x.float(), idx, w, _experts(8, 4, 4))
    assert kernels_work(NpuOps(fake_torch_npu(release)), "cpu") == RELEASES[release].token_autograd


def test_probe_catches_wrong_numerics():
    class Wrong(ReferenceNpuOps):
        def npu_moe_token_unpermute(self, permuted_tokens, sorted_indices, probs=None, **kw):
            return super().npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=probs.flip(-1), **kw)

    with pytest.warns(RuntimeWarning, match="differs from 'grouped'"):
        assert not kernels_work(Wrong(), "cpu")


def test_bfloat16_close_to_grouped():
    experts = _experts(8, 4, 4, dtype=torch.bfloat16)
    idx, w = _routing(12, 2, list(range(8)))
    x = torch.randn(12, H).to(torch.bfloat16)
    out = NpuDispatcher(ops=ReferenceNpuOps())(x, idx, w, experts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), GroupedDispatcher()(x, idx, w, experts).float(), atol=0.1, rtol=0.02)


# --- the stand-in against the documented examples and naive loops -----------------------------------


def test_permute_and_unpermute_documented_examples():
    ops = ReferenceNpuOps()
    tokens = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    indices = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0]], dtype=torch.int32)
    permuted, sorted_indices = ops.npu_moe_token_permute(tokens, indices)
    assert permuted[:, 0].tolist() == [1, 2, 3, 4, 1, 2, 3, 4]
    assert sorted_indices.dtype == torch.int32
    assert sorted_indices.tolist() == [0, 4, 5, 1, 2, 6, 7, 3]
    assert ops.npu_moe_token_permute(tokens, indices, num_out_tokens=4)[0][:, 0].tolist() == [1, 2, 3, 4]
    out = ops.npu_moe_token_unpermute(permuted, sorted_indices, probs=torch.full((4, 2), 0.5))
    torch.testing.assert_close(out, tokens)
    out1 = ops.npu_moe_token_unpermute(permuted[:4], torch.arange(4, dtype=torch.int32))
    torch.testing.assert_close(out1, tokens)


@pytest.mark.parametrize("k", [1, 3])
def test_permute_unpermute_against_naive_loop(k):
    ops = ReferenceNpuOps()
    t, experts = 11, 5
    tokens = torch.randn(t, H)
    indices = torch.randint(0, experts, (t, k))  # repeats allowed: ties must keep slot order
    probs = torch.rand(t, k)
    permuted, sorted_indices = ops.npu_moe_token_permute(tokens, indices)
    # naive: slots in expert order, ties by flat slot number; each slot's row number
    slots = sorted(range(t * k), key=lambda s: (int(indices.view(-1)[s]), s))
    for row, s in enumerate(slots):
        assert int(sorted_indices[s]) == row
        torch.testing.assert_close(permuted[row], tokens[s // k])
    out = ops.npu_moe_token_unpermute(permuted, sorted_indices, probs=probs)
    naive = torch.stack(
        [sum(probs[i, j] * permuted[int(sorted_indices[i * k + j])] for j in range(k)) for i in range(t)]
    )
    torch.testing.assert_close(out, naive)


def _naive_groups(sizes):
    start = 0
    for n in sizes:
        yield slice(start, start + n)
        start += n


@pytest.mark.parametrize("group_list_type", [0, 1])
@pytest.mark.parametrize("transposed_weight", [False, True])
def test_grouped_matmul_m_axis_against_naive_loop(group_list_type, transposed_weight):
    ops = ReferenceNpuOps()
    sizes = [3, 0, 5, 1, 0]
    x = torch.randn(sum(sizes), 4)
    w = torch.randn(len(sizes), 7, 4).transpose(1, 2) if transposed_weight else torch.randn(len(sizes), 4, 7)
    counts = torch.tensor(sizes)
    group_list = counts.cumsum(0) if group_list_type == 0 else counts
    y = ops.npu_grouped_matmul(
        [x], [w], group_list=group_list, split_item=2, group_type=0, group_list_type=group_list_type
    )
    assert isinstance(y, list) and len(y) == 1
    naive = torch.cat([x[s] @ w[g] for g, s in enumerate(_naive_groups(sizes))])
    torch.testing.assert_close(y[0], naive)
    # the same with one weight tensor per group
    y_multi = ops.npu_grouped_matmul(
        [x], list(w.unbind(0)), group_list=group_list, split_item=3, group_type=0, group_list_type=group_list_type
    )
    torch.testing.assert_close(y_multi[0], naive)


def test_grouped_matmul_k_axis_against_naive_loop():
    ops = ReferenceNpuOps()
    sizes = [2, 0, 4]
    x, dy = torch.randn(sum(sizes), 5), torch.randn(sum(sizes), 3)
    gw = ops.npu_grouped_matmul(
        [x.t()], [dy], group_list=torch.tensor(sizes), split_item=3, group_type=2, group_list_type=1
    )[0]
    assert gw.shape == (3, 5, 3)
    for g, s in enumerate(_naive_groups(sizes)):
        if sizes[g]:
            torch.testing.assert_close(gw[g], x[s].t() @ dy[s])
        else:  # undocumented for an empty group: the stand-in poisons it
            assert torch.isnan(gw[g]).all()


def test_grouped_matmul_ungrouped_lists():
    ops = ReferenceNpuOps()
    xs, ws = [torch.randn(2, 3), torch.randn(4, 5)], [torch.randn(3, 6), torch.randn(5, 2)]
    ys = ops.npu_grouped_matmul(xs, ws, split_item=0)
    assert len(ys) == 2
    for y, x, w in zip(ys, xs, ws, strict=True):
        torch.testing.assert_close(y, x @ w)


# --- strictness ---------------------------------------------------------------------------------------


def _gmm(ops, x, w, group_list, **kw):
    args = dict(group_list=group_list, split_item=2, group_type=0, group_list_type=1)
    args.update(kw)
    return ops.npu_grouped_matmul([x], [w], **args)


def test_wrong_group_list_type_is_caught():
    ops, x, w = ReferenceNpuOps(), torch.randn(6, 4), torch.randn(3, 4, 2)
    counts = torch.tensor([1, 2, 3])
    _gmm(ops, x, w, counts)  # right
    _gmm(ops, x, w, counts.cumsum(0), group_list_type=0)  # right
    with pytest.raises(ValueError, match="must be equal"):  # counts read as cumulative ends: last 3 != 6
        _gmm(ops, x, w, counts, group_list_type=0)
    with pytest.raises(ValueError, match="must be equal"):  # cumulative ends read as counts: sum 10 != 6
        _gmm(ops, x, w, counts.cumsum(0), group_list_type=1)
    with pytest.raises(ValueError, match="non-decreasing"):  # counts [3, 1, 2] read as cumulative
        _gmm(ops, x, w, torch.tensor([3, 1, 2]), group_list_type=0)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (dict(group_list=torch.tensor([1, 2, 3], dtype=torch.int32)), TypeError, "int64"),
        (dict(group_list=torch.tensor([1.0, 2.0, 3.0])), TypeError, "int64"),
        (dict(group_list=[1, 3, 6]), TypeError, "device tensor"),
        (dict(group_list=torch.tensor([4, -1, 3])), ValueError, "non-negative"),
        (dict(group_list=torch.tensor([2, 4])), ValueError, "groups"),  # 2 groups for 3 weights
        (dict(split_item=0), ValueError, "split_item"),
        (dict(group_type=1), ValueError, "group_type"),
        (dict(group_list_type=2), NotImplementedError, "int8"),
        (dict(weight=torch.randn(3, 2, 4)), ValueError, r"\[G, K, N\]"),  # [G, N, K]
        (dict(weight=torch.randn(3, 4, 2).double()), TypeError, "dtype"),
        (dict(weight=torch.randn(3, 4, 4)[:, :, :2]), ValueError, "strides"),
        (dict(x=torch.randn(4, 6).t()), ValueError, "row-major"),
    ],
)
def test_grouped_matmul_rejects_undocumented_arguments(bad, exc, match):
    ops = ReferenceNpuOps()
    x, w = bad.pop("x", torch.randn(6, 4)), bad.pop("weight", torch.randn(3, 4, 2))
    args = dict(group_list=torch.tensor([1, 2, 3]), split_item=2, group_type=0, group_list_type=1)
    args.update(bad)
    with pytest.raises(exc, match=match):
        ops.npu_grouped_matmul([x], [w], **args)


def test_grouped_matmul_rejects_tensors_for_lists_and_untransposed_k_axis():
    ops, x, dy, counts = ReferenceNpuOps(), torch.randn(6, 4), torch.randn(6, 2), torch.tensor([2, 4])
    with pytest.raises(TypeError, match="lists"):
        ops.npu_grouped_matmul(
            x, torch.randn(2, 4, 2), group_list=counts, split_item=2, group_type=0, group_list_type=1
        )
    with pytest.raises(ValueError, match="transposed view"):  # x.t() made contiguous loses the transpose
        ops.npu_grouped_matmul(
            [x.t().contiguous()], [dy], group_list=counts, split_item=3, group_type=2, group_list_type=1
        )
    with pytest.raises(ValueError, match="must be equal"):
        ops.npu_grouped_matmul(
            [x.t()], [dy], group_list=torch.tensor([2, 3]), split_item=3, group_type=2, group_list_type=1
        )


def test_permute_and_unpermute_reject_undocumented_arguments():
    ops, tokens = ReferenceNpuOps(), torch.randn(4, 3)
    idx = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0]])
    with pytest.raises(TypeError, match="int32/int64"):
        ops.npu_moe_token_permute(tokens, idx.float())
    with pytest.raises(ValueError, match=r"\[0, 16777215\)"):
        ops.npu_moe_token_permute(tokens, idx - 1)
    with pytest.raises(ValueError, match="rows"):
        ops.npu_moe_token_permute(tokens, idx[:3])
    with pytest.raises(NotImplementedError, match="padded_mode"):
        ops.npu_moe_token_permute(tokens, idx, padded_mode=True)
    permuted, sorted_indices = ops.npu_moe_token_permute(tokens, idx)
    probs = torch.rand(4, 2)
    with pytest.raises(TypeError, match="int32"):
        ops.npu_moe_token_unpermute(permuted, sorted_indices.long(), probs=probs)
    with pytest.raises(ValueError, match="permutation"):
        ops.npu_moe_token_unpermute(permuted, torch.zeros(8, dtype=torch.int32), probs=probs)
    with pytest.raises(TypeError, match="dtype"):
        ops.npu_moe_token_unpermute(permuted, sorted_indices, probs=probs.double())
    with pytest.raises(ValueError, match="cover"):
        ops.npu_moe_token_unpermute(permuted, sorted_indices, probs=torch.rand(2, 2))


class _Tampered(ReferenceNpuOps):
    """The dispatcher's calls with one argument changed: each must make the stand-in raise."""

    def __init__(self, change):
        super().__init__()
        self.change = change

    def npu_grouped_matmul(self, x, weight, **kw):
        x, weight, kw = self.change(x, weight, kw)
        return super().npu_grouped_matmul(x, weight, **kw)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        # counts passed as cumulative ends: not non-decreasing, or the last end is not the row count
        (lambda x, w, kw: (x, w, {**kw, "group_list_type": 0}), ValueError, "non-decreasing|must be equal"),
        (lambda x, w, kw: (x, w, {**kw, "group_list": kw["group_list"].cumsum(0)}), ValueError, "must be equal"),
        (lambda x, w, kw: (x, w, {**kw, "group_list": kw["group_list"].int()}), TypeError, "int64"),
        (
            lambda x, w, kw: (x, [w[0].transpose(-1, -2)] if kw["group_type"] == 0 else w, kw),
            ValueError,
            r"\[G, K, N\]",
        ),
        (lambda x, w, kw: ([x[0].contiguous()] if kw["group_type"] == 2 else x, w, kw), ValueError, "transposed view"),
        (lambda x, w, kw: (x[0], w, kw), TypeError, "lists"),
    ],
    ids=["cumulative_type", "cumsum_as_counts", "int32", "weight_layout", "wgrad_x_contiguous", "tensor_not_list"],
)
def test_npu_dispatcher_with_a_wrong_kernel_argument_fails(change, exc, match):
    experts = _experts(8, 3, 2)
    idx, w = _routing(10, 2, list(range(8)))
    x = torch.randn(10, H, requires_grad=True)
    ops = _Tampered(lambda x_, w_, kw: (x_, w_, kw))
    NpuDispatcher(ops=ops)(x, idx, w, experts).sum().backward()  # untampered: runs
    with pytest.raises(exc, match=match):
        NpuDispatcher(ops=_Tampered(change))(x, idx, w, experts).sum().backward()


# --- the adapter --------------------------------------------------------------------------------------


def test_npu_ops_without_torch_npu_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(device, "torch_npu_module", lambda: None)
    with pytest.raises(RuntimeError, match=r"torch_npu.*pip install -e \.\[npu\]"):
        npu_ops()
    with pytest.raises(ValueError, match=r"moe_impl='npu' needs torch_npu \(pip install -e \.\[npu\]"):
        NpuDispatcher()  # ops default to npu_ops(): checked when the dispatcher is made, at conversion


def test_npu_ops_names_missing_kernels(monkeypatch):
    old = types.SimpleNamespace(__version__="2.1.0", npu_grouped_matmul=lambda *a, **k: None)
    monkeypatch.setattr(device, "torch_npu_module", lambda: old)
    with pytest.raises(RuntimeError, match=r"npu_moe_token_permute.*npu_moe_token_unpermute"):
        npu_ops()
    with pytest.raises(RuntimeError, match=r"npu_moe_token_permute.*npu_moe_token_unpermute"):
        NpuDispatcher()


def test_adapter_forwards_documented_argument_names(monkeypatch):
    fake = fake_torch_npu()
    monkeypatch.setattr(device, "torch_npu_module", lambda: fake)
    dispatcher = NpuDispatcher()  # the default ops: npu_ops() -> the fake module, proved by the probe first
    assert isinstance(dispatcher.ops, NpuOps)
    assert probe_results() == {PROBE_NAME: "ok"} and len(fake.calls) == 16  # 2 tiny layers, forward + backward
    fake.calls.clear()
    assert dispatcher.copy().ops is dispatcher.ops  # a block's copy shares the (stateless) kernels
    experts = _experts(8, 4, 4)
    idx, w = _routing(10, 2, list(range(8)))
    x = torch.randn(10, H, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"torch.float32 tokens: torch_npu documents .* bfloat16 only"):
        out = dispatcher(x, idx, w, experts)  # fp32 on the real kernels: undocumented, said once
    out.sum().backward()
    assert fake.calls == ["permute", "gmm0", "gmm0", "unpermute", "gmm0", "gmm2", "gmm0", "gmm2"]
    torch.testing.assert_close(out, NpuDispatcher(ops=ReferenceNpuOps())(x, idx, w, experts))


# --- op audit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, syncs", [("all_local", 0), ("ep_middle", 1), ("rank_gets_no_tokens", 1), ("empty_local_experts", 1)]
)
def test_no_banned_ops_and_host_syncs(case, syncs):
    e, e_local, start, k, t, allowed = CASES[case]
    experts = _experts(e, e_local, start)
    idx, w = _routing(t, k, allowed if allowed is not None else list(range(e)))
    x = torch.randn(t, H, requires_grad=True)
    w.requires_grad_(True)
    with OpAudit() as audit:
        NpuDispatcher(ops=ReferenceNpuOps())(x, idx, w, experts).sum().backward()
    assert not audit.banned(), audit.table()
    assert audit.host_syncs("forward") == syncs, audit.table()
    assert audit.host_syncs("backward") == 0, audit.table()
