"""Issue 23 pt 4: the all-to-all dispatchers overlap the shared experts with their token traffic (the dispatch's
all-to-all with the shared experts' first half, the combine's with the second, the backward mirrored), and give
the very values of the plain path: logits, loss and gradients equal bit for bit, at ep 2 and ep 4 (world 4, gloo),
with the op audit's one host sync per MoE layer kept."""

from __future__ import annotations

import pytest

from .dist import run_ranks
from .registry import impls_taking

# (family, tp, ep, moe_impl): DeepSeek-V2's shared experts, Qwen2-MoE's gated shared expert; ep 2 (dp 2) and ep 4
CASES = [
    ("deepseek_v2", 1, 4, "alltoall"),
    ("qwen2_moe", 1, 4, "alltoall"),
    ("deepseek_v2", 1, 2, "alltoall"),
    ("qwen2_moe", 2, 4, "alltoall"),
    ("deepseek_v2", 1, 4, "alltoall_static"),
]


@pytest.fixture(scope="module")
def overlap_results(checkpoints):
    return run_ranks(4, "tests.overlap_worker:compare", str(checkpoints), CASES)


@pytest.mark.parametrize("name,tp,ep,impl", CASES)
def test_overlapped_equals_plain(overlap_results, name, tp, ep, impl):
    """Overlap on == off with torch.equal on every rank: train-mode logits and loss, every gradient, eval logits."""
    r = overlap_results[f"{name} tp={tp} ep={ep} {impl}"]
    assert r["overlap_shared_on"] is True and r["overlap_shared_off"] is False
    assert r["shared"] and r["grads"] > 0
    assert r["logits_equal"] and r["loss_equal"] and r["eval_logits_equal"]
    assert r["grads_equal"], r["grads_differing"]


@pytest.mark.parametrize("name,tp,ep,impl", CASES)
def test_overlap_is_taken_and_audit_kept(overlap_results, name, tp, ep, impl):
    """The overlapped run starts both token all-to-alls of each MoE layer asynchronously, forward and backward (the
    plain run none); the same all-to-alls are issued; no banned op; host syncs per MoE layer as without overlap
    (one, the split sizes; none in the static variant; none in backward)."""
    r = overlap_results[f"{name} tp={tp} ep={ep} {impl}"]
    layers = r["moe_layers"]
    assert (r["async_forward_on"], r["async_backward_on"]) == (2 * layers, 2 * layers)
    assert (r["async_forward_off"], r["async_backward_off"]) == (0, 0)
    assert r["alltoall_forward_on"] == r["alltoall_forward_off"] == (2 if impl == "alltoall_static" else 3) * layers
    assert r["alltoall_backward_on"] == r["alltoall_backward_off"] == 2 * layers
    assert r["banned_ops"] == []
    assert r["host_syncs_per_moe_layer"] == [0 if impl == "alltoall_static" else 1] * layers
    assert r["host_syncs_backward_on"] == 0


@pytest.mark.parametrize("name,tp,ep,impl", CASES)
def test_backward_overlaps_too(overlap_results, name, tp, ep, impl):
    """Backward mirrors the forward: the combine's reverse all-to-all is started, the shared down projection's
    gradient computed, then waited on; the routed experts' gradient; the dispatch's reverse all-to-all started,
    the shared gate/up gradients computed while it travels, then waited on (the first MoE layer, the last reached)."""
    r = overlap_results[f"{name} tp={tp} ep={ep} {impl}"]
    assert r["halves"]
    want = ["launch", "down_proj", "wait", "experts", "launch", "up_proj", "gate_proj", "wait"]
    assert r["backward_order_on"] == want


def test_overlap_option(monkeypatch):
    """``overlap_shared``: on by default, off by the option or NPU_PARALLEL_OVERLAP_SHARED=0 (the option wins), shown
    in the repr when off, a non-bool refused at conversion; the dispatchers that move nothing do not take it."""
    from npu_parallel.moe.dispatchers import resolve_dispatcher

    monkeypatch.delenv("NPU_PARALLEL_OVERLAP_SHARED", raising=False)
    for impl in impls_taking("overlap_shared"):
        assert resolve_dispatcher(impl, "cpu").overlap_shared is True
        off = resolve_dispatcher(impl, "cpu", overlap_shared=False)
        assert off.overlap_shared is False and "overlap_shared=False" in repr(off)
        with pytest.raises(ValueError, match=r"overlap_shared='no': must be True or False"):
            resolve_dispatcher(impl, "cpu", overlap_shared="no")
    monkeypatch.setenv("NPU_PARALLEL_OVERLAP_SHARED", "0")
    assert resolve_dispatcher("alltoall", "cpu").overlap_shared is False
    assert resolve_dispatcher("alltoall", "cpu", overlap_shared=True).overlap_shared is True
    with pytest.raises(ValueError, match=r"overlap_shared=False needs moe_impl='alltoall'"):
        resolve_dispatcher("grouped", "cpu", overlap_shared=False)


def test_default_overlapped_is_dispatch_then_work():
    """The base class' overlapped entry points (every dispatcher that moves no tokens): the plain dispatch and
    combine, then the work, whose result comes back beside them."""
    import torch

    from npu_parallel.moe.dispatchers import resolve_dispatcher

    from .test_dispatchers import _experts

    x, idx, w, ex = torch.randn(6, 8), torch.randint(0, 4, (6, 2)), torch.rand(6, 2), _experts()
    d = resolve_dispatcher("grouped", "cpu")
    routed, a = d.dispatch_overlapped(x, idx, w, ex, lambda: "first")
    y, b = d.combine_overlapped(ex(routed.rows, routed.matmul), routed, lambda: "second")
    assert (a, b) == ("first", "second")
    assert torch.equal(y, d(x, idx, w, ex))
