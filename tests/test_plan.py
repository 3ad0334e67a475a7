"""``npu-parallel plan`` against the memory of a real training step of the tiny models at world 4 on CPU."""

from __future__ import annotations

import pytest

from npu_parallel.tools.cli import main
from npu_parallel.tools.plan import parse_bytes, plan, read_config, total_parameters

from .dist import run_ranks

NAMES = ["deepseek_v3", "qwen3_moe"]
LAYOUTS = [(1, 4), (2, 4), (1, 2), (2, 2), (4, 4)]


@pytest.fixture(scope="module")
def measured(checkpoints):
    return run_ranks(4, "tests.plan_worker:measure", str(checkpoints), NAMES, LAYOUTS)


@pytest.mark.parametrize("name", NAMES)
def test_plan_matches_a_measured_step(measured, checkpoints, name):
    """Weights, gradients and optimizer bytes exactly; the whole card within 10 % (activations estimated)."""
    config = read_config(checkpoints / name)
    for tp, ep in LAYOUTS:
        m = measured[f"{name} {tp} {ep}"]
        layouts = plan(
            config, nodes=1, cards_per_node=4, card_bytes=10**9, dtype="float32", dp_mode="replicate",
            micro_batch=m["micro_batch"], seq=16,
        )  # fmt: skip
        lay = next(lay for lay in layouts if (lay.tp, lay.ep) == (tp, ep))
        assert (lay.weights, lay.grads, lay.optimizer, lay.master) == (m["weights"], m["grads"], m["optimizer"], 0)
        planned = lay.weights + lay.grads + lay.optimizer + lay.activations
        real = m["weights"] + m["grads"] + m["optimizer"] + m["activations"]
        assert abs(planned - real) <= 0.10 * real, (tp, ep, lay.activations, m["activations"])


def test_every_valid_layout_and_only_those(checkpoints):
    layouts = plan(read_config(checkpoints / "deepseek_v3"), nodes=2, cards_per_node=2, card_bytes=10**9)
    assert sorted((lay.tp, lay.ep, lay.dp, lay.edp, lay.pp) for lay in layouts) == [
        (1, 1, 2, 2, 2),
        (1, 1, 4, 4, 1),
        (1, 2, 2, 1, 2),
        (1, 2, 4, 2, 1),
        (1, 4, 4, 1, 1),
        (2, 2, 1, 1, 2),
        (2, 2, 2, 2, 1),
        (2, 4, 2, 1, 1),
    ]  # fmt: skip  (pp 4 > the 3 layers: not offered)
    assert all(lay.fits for lay in layouts)
    tiny = plan(read_config(checkpoints / "deepseek_v3"), nodes=1, cards_per_node=4, card_bytes=10**5)
    assert not any(lay.fits for lay in tiny)


def test_published_sizes():
    """The example configs are the published models: 15.7 B, 236 B and 671 B parameters."""
    for name, billions in [("deepseek_v2_lite", 15.7), ("deepseek_v2", 235.7), ("deepseek_v3", 671.0)]:
        assert round(total_parameters(read_config(f"examples/configs/{name}.json")) / 1e9, 1) == billions


def test_bad_input_is_one_line(capsys, tmp_path):
    assert main(["plan", str(tmp_path), "--nodes", "1"]) == 2
    assert "no config.json in this folder" in capsys.readouterr().err
    assert main(["plan", "examples/configs/deepseek_v2_lite.json", "--card_memory", "64XB"]) == 2
    assert "'64XB' is not a size; write e.g. 64GB or 32GiB" in capsys.readouterr().err
    assert main(["plan", "examples/configs/deepseek_v2_lite.json", "--nodes", "0"]) == 2
    assert parse_bytes("64GB") == 64 * 10**9 and parse_bytes("32GiB") == 32 * 2**30


def test_pipeline_stages_hold_the_model_once_and_the_schedule_in_flight(checkpoints):
    """Each stage's parameters (embedding first, head and MTP last) sum to the model's; 1F1B's first stage keeps
    min(m, p) micro-batches' activations, GPipe m; the bubble is (p - 1) / (m + p - 1)."""
    from npu_parallel.tools.plan import count_parameters
    from npu_parallel.tools.plan_pipeline import bubble, in_flight

    config = read_config(checkpoints / "deepseek_v3")
    counts = count_parameters(config, 1)
    stages = counts.stages(config, 3)
    assert [s.layers for s in stages] == [1, 1, 1] and [s.head for s in stages] == [False, False, True]
    assert sum(s.dense for s in stages) == counts.dense and sum(s.experts for s in stages) == counts.experts
    assert stages[0].dense_layers == 1 and stages[1].dense_layers == 0  # first_k_dense_replace = 1
    assert [in_flight("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight("gpipe", 3, 4, 8) == 8 and in_flight("1f1b", 0, 4, 2) == 2
    assert bubble(4, 8) == pytest.approx(3 / 11) and bubble(1, 8) == 0
    kw = dict(nodes=1, cards_per_node=2, card_bytes=10**9, dtype="float32", grad_accum=4, dp_mode="replicate")
    one, two = plan(config, pp_sizes=[1], **kw), plan(config, pp_sizes=[2], **kw)
    assert {(lay.tp, lay.pp) for lay in two} == {(1, 2)} and all(lay.bubble == pytest.approx(1 / 5) for lay in two)
    full = next(lay for lay in one if (lay.tp, lay.ep) == (1, 1))
    staged = next(lay for lay in two if lay.ep == 1)
    assert staged.weights < full.weights and "pp send/recv" in staged.comm


def test_v3_671b_on_910b_nodes_gets_a_pipeline_layout():
    """DeepSeek-V3 671B on 32 nodes of 8 x 64 GB without FSDP (DDP-style replicas, as MindSpeed's distributed
    optimizer aside): no layout without pp fits; the plan proposes one with pipeline stages (MindSpeed's published
    V3 SFT layout is TP2 PP16 EP8)."""
    config = read_config("examples/configs/deepseek_v3.json")
    kw = dict(nodes=32, cards_per_node=8, card_bytes=64 * 10**9, dp_mode="replicate", recompute=True)
    layouts = plan(config, **kw)
    assert layouts[0].fits and layouts[0].pp > 1
    assert not any(lay.fits for lay in layouts if lay.pp == 1)


def test_bad_pipeline_size_is_one_line(capsys):
    assert main(["plan", "examples/configs/deepseek_v2_lite.json", "--pp", "3"]) == 2
    assert "pp 3: must divide the 8 cards" in capsys.readouterr().err
