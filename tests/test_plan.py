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
    assert sorted((lay.tp, lay.ep, lay.dp, lay.edp) for lay in layouts) == [
        (1, 1, 4, 4), (1, 2, 4, 2), (1, 4, 4, 1), (2, 2, 2, 2), (2, 4, 2, 1)
    ]  # fmt: skip
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
