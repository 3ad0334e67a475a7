"""Pipeline parallelism: the mesh with pp outermost, the stage split, and seed 000's method at world 2 (TP=2/PP=1 and
TP=1/PP=2 give the unsplit model's loss, aux loss and loss after one SGD step; every schedule the same gradients)."""

from __future__ import annotations

import pytest

from npu_parallel.parallel.state import check_pp_size, check_tp_size, group_layout, pp_layout
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.pipeline import available_schedules, check_schedule, stage_indices
from npu_parallel.training.pipeline_split import balanced_split, layer_costs, parse_pp_layers, resolve_split

from .dist import run_ranks
from .models import VARIANTS
from .published import build_published

VARIANT_NAMES = [n for n in ("deepseek_v2", "qwen3_moe") if n in VARIANTS]
SCHEDULES = [s for s in ("1f1b", "gpipe", "interleaved_1f1b", "zbv", "dualpipev") if s in available_schedules()]


def test_mesh_pp_outermost():
    # world 8 = pp 2 x dp 2 x tp 2: stage s holds ranks 4s..4s+3; tp contiguous, dp strided by tp inside a stage
    tp, dp = group_layout(8, 2, pp_size=2)
    assert tp == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dp == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert pp_layout(8, 2) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_layout(8, 2) == group_layout(8, 2, pp_size=1)  # pp 1 changes nothing


def test_bad_layouts_name_the_fix():
    with pytest.raises(ValueError, match=r"pp_size=3 .*\(world = pp x dp x tp\).*\[1, 2, 4\]"):
        check_pp_size(3, 4)
    with pytest.raises(ValueError, match=r"tp_size=4 .* the 2 ranks of a stage"):
        check_tp_size(4, 4, pp_size=2)
    config = VARIANTS["deepseek_v2"][0](**VARIANTS["deepseek_v2"][2])
    with pytest.raises(ConfigError, match=r"4 pipeline stages .* 3 decoder layers"):
        resolve_split(config, 4)
    with pytest.raises(ConfigError, match=r"--pp_layers '1,1' sums to 2.*3 decoder layers"):
        parse_pp_layers("1,1", 3, 2)
    with pytest.raises(ConfigError, match="names 3 stages and the pipeline has 2"):
        parse_pp_layers("1,1,1", 3, 2)
    with pytest.raises(ConfigError, match=r"--grad_accum 1: the 1f1b schedule at pp 2 needs at least 2"):
        check_schedule("1f1b", 2, 1)
    with pytest.raises(ConfigError, match="is not a schedule"):
        check_schedule("zigzag", 2, 4)


def test_split_balances_cost():
    config = VARIANTS["deepseek_v2"][0](**VARIANTS["deepseek_v2"][2])
    layers, _, _ = layer_costs(config)
    assert layers[0].params != layers[1].params  # the dense first layer and the MoE layers cost differently
    assert layers[0].flops != layers[1].flops
    assert sum(resolve_split(config, 2).counts) == 3
    assert resolve_split(config, 2, "2,1").counts == (2, 1)
    # a heavy head pushes layers to the first stage (Megatron's uneven last stage)
    assert balanced_split([1.0] * 8, 2, first=0.0, last=3.0) == [5, 3]
    assert balanced_split([1.0] * 8, 4) == [2, 2, 2, 2]
    assert stage_indices("interleaved_1f1b", 2, 1, virtual=2) == [1, 3]
    assert stage_indices("dualpipev", 2, 0) == [0, 3]


@pytest.fixture(scope="module")
def world2(checkpoints, tmp_path_factory):
    paths = {n: str(checkpoints / n) for n in VARIANT_NAMES}
    if "deepseek_v3" in VARIANTS:  # MLA + MoE + MTP, in the published layout that keeps the MTP layer
        paths["deepseek_v3_mtp"] = str(build_published(tmp_path_factory.mktemp("pp_v3"))["plain"])
        paths["deepseek_v3_mtp_packed"] = paths["deepseek_v3_mtp"]  # packed rows: documents and padding
    if "qwen3_moe" in paths:
        paths["qwen3_moe_packed"] = paths["qwen3_moe"]  # the Switch loss over the real tokens of every stage
    return run_ranks(2, "tests.pipeline_worker:world", paths, [(2, 1), (1, 2)], SCHEDULES, timeout=600)


@pytest.fixture(scope="module")
def world4(checkpoints, tmp_path_factory):
    """Seed 000's method at world 4: TP=2/PP=2 and PP=2/DP=2 (the packed variants are covered at world 2)."""
    paths = {n: str(checkpoints / n) for n in VARIANT_NAMES}
    if "deepseek_v3" in VARIANTS:
        paths["deepseek_v3_mtp"] = str(build_published(tmp_path_factory.mktemp("pp4_v3"))["plain"])
    return run_ranks(4, "tests.pipeline_worker:world", paths, [(2, 2), (1, 2)], [], timeout=600)


@pytest.mark.parametrize("layout", ["tp2_pp2_dp1", "tp1_pp2_dp2"])
def test_world4_layout_equals_unsplit_model(world4, layout):
    _check_layout(world4, layout)


@pytest.mark.parametrize("layout", ["tp2_pp1_dp1", "tp1_pp2_dp1"])
def test_layout_equals_unsplit_model(world2, layout):
    _check_layout(world2, layout)


def _check_layout(world, layout):
    for name, row in world["layouts"].items():
        ref, got = row[f"ref_{layout}"], row[layout]
        assert got[0] == pytest.approx(ref[0], abs=2e-5), (name, "loss")
        assert got[1] == pytest.approx(ref[1], abs=2e-6), (name, "aux loss, summed over the stages once")
        assert got[2] == pytest.approx(ref[2], abs=5e-5), (name, "loss after one SGD step")
        assert ref[2] < ref[0] - 0.05, (name, "the SGD step changed the loss")
    assert world["layouts"]["qwen3_moe"]["ref"][1] > 0.01  # the Switch loss couples every stage's layers
    if "deepseek_v3_mtp" in world["layouts"]:
        assert world["layouts"]["deepseek_v3_mtp"]["ref"][0] > 0


def test_schedules_give_the_same_gradients(world2):
    sched = world2["schedules"]
    assert set(SCHEDULES) <= set(sched) and {"1f1b", "gpipe", "interleaved_1f1b"} <= set(sched)
    for name in SCHEDULES:
        assert sched[name]["params_with_grad"] == sched["params"], name  # every parameter trained, on one stage
        assert sched[name]["max_grad_diff"] < 1e-6, name
        assert sched[name]["loss"] == pytest.approx(sched["1f1b"]["loss"], abs=1e-6)
