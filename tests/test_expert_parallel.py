"""Expert parallelism over several tp groups (ep > tp, all-to-all dispatch) at world 4, against the unconverted
model with each dp rank on its own rows of the global batch; the group layout and its errors."""

from __future__ import annotations

import re

import pytest
import torch

from npu_parallel.checkpoint.materialize import empty_model
from npu_parallel.convert.conversion import apply_plan
from npu_parallel.convert.options import ConversionOptions
from npu_parallel.moe.dispatchers import implementation, implementations, resolve_dispatcher
from npu_parallel.moe.dispatchers.masked import MaskedDispatcher
from npu_parallel.parallel.state import Group, check_ep_size, check_local_world, group_layout
from npu_parallel.tools.launch import launch
from npu_parallel.tools.plan import read_config

from .dist import RANK_ENV, run_ranks

NAMES = ["deepseek_v2", "deepseek_v3", "qwen3_moe"]
# (tp, ep, moe_impl): ep = tp keeps today's dispatch; the static all-to-all once, at the layout with both
LAYOUTS = [(1, 4, "auto"), (2, 4, "auto"), (1, 2, "auto"), (2, 2, "auto"), (2, 4, "alltoall_static")]
TOL = 1e-5


@pytest.fixture(scope="module")
def ep_results(checkpoints):
    return run_ranks(4, "tests.ep_worker:compare", str(checkpoints), NAMES, LAYOUTS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tp,ep,impl", LAYOUTS)
def test_ep_matches_reference(ep_results, name, tp, ep, impl):
    """Logits, loss, and the loss after one SGD step through npu_parallel.data_parallel (FSDP2: experts sharded over
    edp = world / ep ranks, their gradient summed there and divided by dp) against the unconverted model."""
    r = ep_results[f"{name} tp={tp} ep={ep} {impl}"]
    assert r["local_experts"] == 8 // ep
    assert r["expert_mesh"] == 4 // ep  # edp; at ep = tp that is the dp mesh
    assert r["dispatcher"] == (impl if impl != "auto" else ("alltoall" if ep > tp else "grouped"))
    assert r["logits_max_diff"] < TOL
    assert abs(r["loss"] - r["ref_loss"]) < TOL
    assert abs(r["loss_after_step"] - r["ref_loss_after_step"]) < TOL


@pytest.mark.parametrize("tp,ep,impl", [lay for lay in LAYOUTS if lay[1] > lay[0]])
def test_alltoall_op_audit(ep_results, tp, ep, impl):
    """No banned op; one host sync per MoE layer (the split sizes), none in the static variant nor in backward;
    three all-to-alls per MoE layer (counts, tokens out, outputs back), two without the counts."""
    for name in NAMES:
        r = ep_results[f"{name} tp={tp} ep={ep} {impl}"]
        assert r["banned_ops"] == []
        static = impl == "alltoall_static"
        assert r["host_syncs_per_moe_layer"] == [0 if static else 1] * 2
        assert r["host_syncs_forward_total"] == (0 if static else 2)
        assert r["host_syncs_backward_total"] == 0
        assert r["alltoall_forward"] == (2 if static else 3) * 2


def test_ep_group_layout():
    # world 8, tp 2, ep 4: ep groups of two whole tp groups; edp joins the ranks holding the same experts
    tp, dp = group_layout(8, 2)
    ep, edp = group_layout(8, 4)
    assert tp == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ep == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert edp == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dp == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for group in ep:
        assert all(set(t) <= set(group) or not set(t) & set(group) for t in tp)


@pytest.mark.parametrize(
    "ep,tp,world,valid",
    [(3, 1, 4, "[1, 2, 4]"), (2, 4, 8, "[4, 8]"), (16, 2, 8, "[2, 4, 8]"), (0, 1, 4, "[1, 2, 4]")],
)
def test_bad_ep_size_names_valid_sizes(ep, tp, world, valid):
    with pytest.raises(ValueError, match=rf"ep_size={ep}.*use one of {re.escape(valid)}"):
        check_ep_size(ep, tp, world)


def test_tp_never_spans_nodes():
    check_local_world(4, 8)
    check_local_world(2, None)
    with pytest.raises(ValueError, match=r"tp_size=4 does not divide the 2 ranks per node .*use one of \[1, 2\]"):
        check_local_world(4, 2)


def test_two_node_launch(checkpoints):
    """Two torchrun processes (--nnodes 2 --node_rank 0/1, two ranks each) on loopback: tp groups stay inside a
    node, the ep group spans both; a tp group across nodes is refused with the sizes that work."""
    r = launch("tests.multinode_worker:two_nodes", 4, str(checkpoints / "deepseek_v3"), nodes=2, env=RANK_ENV)[0]
    assert "tp_size=4 does not divide the 2 ranks per node (LOCAL_WORLD_SIZE)" in r["spanning"]
    assert r["max_diff"] < 1e-5
    nodes = [(node, local) for node, local, _, _ in r["ranks"]]
    assert nodes == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert [tuple(tp) for _, _, tp, _ in r["ranks"]] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert all(tuple(ep) == (0, 1, 2, 3) for _, _, _, ep in r["ranks"])
    assert r["meshes"] == ((2, 2), 2, (1, 4), 4)  # DeviceMesh views: (dp, tp) and (edp, ep)


@pytest.mark.parametrize("impl", [n for n in implementations() if implementation(n).cross_group])
def test_alltoall_on_one_rank_is_the_reference(impl):
    """Groups of one rank: the all-to-all dispatchers compute what the masked reference computes, gradients too."""
    from .test_dispatchers import _experts

    x = torch.randn(6, 8, requires_grad=True)
    idx, w = torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    ex = _experts()
    out = resolve_dispatcher(impl, "cpu")(x, idx, w, ex)
    (gx,) = torch.autograd.grad(out.sum(), x)
    ref = MaskedDispatcher()(x, idx, w, ex)
    (ref_gx,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, ref_gx)


def test_conversion_refuses_what_ep_cannot_do(checkpoints):
    """Before any collective: a dispatcher that cannot move tokens, and an ep that does not divide the experts."""
    config = read_config(checkpoints / "deepseek_v3")  # 8 routed experts
    tp, ep = Group.offline(0, 2), Group.offline(0, 4)

    def convert(**kw):
        return apply_plan(empty_model(config, torch.float32, meta_buffers=True), tp, device_type="meta", **kw)

    with pytest.raises(ValueError, match=r"moe_impl='grouped' computes only its tp group's tokens.*'alltoall'"):
        convert(options=ConversionOptions(moe_impl="grouped"), ep=ep)
    with pytest.raises(ValueError, match=r"ep_size=16 must divide the routed experts \(n_routed_experts\) = 8.*\[2, 4"):
        convert(ep=Group.offline(0, 16))
    info = convert(ep=ep)
    assert info.moe_impl == "alltoall"
