"""The load-balancing loss of every family (router gradients at tp 1, 2, 4 against the references), DeepSeek-V3's
bias update and its resume, and the expert-load metrics, warnings and heat map of a training run."""

import json
import logging

import pytest
import torch

from .common import seeded_ids
from .dist import run_ranks
from .test_train import BASE


@pytest.fixture(scope="module")
def router_grads(checkpoints):
    """One launch of 4 ranks: every case at tp 1 (dp 4), 2 (dp 2) and 4, op audit at tp 2."""
    return run_ranks(4, "tests.balance_worker:router_grads", str(checkpoints), [1, 2, 4], 2, timeout=600)


CASES = ["v2_seq", "v2_token", "v3_seq", "mixtral", "qwen3_moe"]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", CASES)
def test_router_gradient_includes_the_balance_loss_once(router_grads, case, tp):
    r = router_grads[f"{case}@tp{tp}"]
    # the aux term moves the router gradient far more than the tolerance: equality proves it is there, once
    assert r["aux_effect"] > 1e-3
    assert r["grad_diff"] <= 1e-6, r
    assert r["aux"] == pytest.approx(r["ref_aux"], rel=1e-5)
    assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_balance_loss_is_npu_safe(router_grads, case):
    r = router_grads[f"{case}@tp2"]
    assert r["banned_ops"] == []
    assert r["host_syncs_forward"] == r["host_syncs_forward_without_aux"]  # the loss adds no host sync
    assert r["aux_off"] is None  # aux_loss_coef=0 turns it off


def _converted(checkpoints, name: str, **kwargs):
    import npu_parallel

    from .models import load_reference

    return npu_parallel.convert_model(
        load_reference(name, checkpoints / name), npu_parallel.init_distributed(), **kwargs
    ).train()


def test_bias_update_rule(checkpoints):
    """b_i += rate * sign(mean load - load_i), per layer, from the load routed since the last read; none when the
    step was skipped; the counters restart after each read."""
    import npu_parallel
    from npu_parallel.moe.load import moe_blocks, read_load

    model = _converted(checkpoints, "deepseek_v3")
    state = npu_parallel.init_distributed()
    ids = seeded_ids(250, 2, 16, 0)
    gates = [b.gate for _, b in moe_blocks(model)]
    before = [g.e_score_correction_bias.clone() for g in gates]
    with torch.no_grad():
        model(input_ids=ids)
    reading = read_load(model, state, bias_update_rate=0.25, update=False)
    assert all(torch.equal(g.e_score_correction_bias, b) for g, b in zip(gates, before, strict=True))
    assert all(sum(row) == 32 * 3 for row in reading.load)  # every token-slot once: T * top_k
    assert read_load(model, state) is None  # nothing routed since
    with torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids)  # two micro-batches: their load adds up
    reading = read_load(model, state, bias_update_rate=0.25)
    for g, b, load in zip(gates, before, reading.load, strict=True):
        load = torch.tensor(load, dtype=torch.float32)
        assert load.sum() == 2 * 32 * 3
        expected = b + 0.25 * torch.sign(load.mean() - load)
        assert torch.equal(g.e_score_correction_bias, expected)
        assert not torch.equal(expected, b)


def test_coefficient_override_and_eval_mode(checkpoints):
    """aux_loss_coef replaces the config's; 0 turns the loss off; eval mode computes what transformers does."""
    ids = seeded_ids(250, 2, 16, 0)
    off = _converted(checkpoints, "deepseek_v2_remote", aux_loss_coef=0.0)
    assert off(input_ids=ids, labels=ids).aux_loss is None
    half = _converted(checkpoints, "mixtral", aux_loss_coef=0.5)
    out = half(input_ids=ids, labels=ids)
    ce = half.eval()(input_ids=ids, labels=ids, output_router_logits=False).loss
    assert out.loss.item() == pytest.approx(ce.item() + 0.5 * out.aux_loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="aux_loss_coef=-1"):
        _converted(checkpoints, "mixtral", aux_loss_coef=-1.0)


def test_load_warnings(caplog):
    """An expert idle for N steps in a row, a layer over the max / mean threshold: one warning each."""
    from npu_parallel.training.expert_load import LoadMonitor, layer_stats

    monitor = LoadMonitor(None, True, idle_steps=2, max_ratio=3.0)
    with caplog.at_level(logging.WARNING):
        for step, load in enumerate([[4, 0, 4, 4], [4, 0, 4, 4], [4, 0, 4, 4], [13, 1, 1, 1], [13, 1, 1, 1]], 1):
            monitor._warn(step, 0, 5, load, layer_stats(load, 0))
    idle = [r.getMessage() for r in caplog.records if "no token" in r.getMessage()]
    over = [r.getMessage() for r in caplog.records if "mean load" in r.getMessage()]
    assert idle == [
        "step 2: layer 5 expert 1 got no token for 2 steps in a row (--warn_idle_steps); the "
        "load-balancing loss (--aux_loss_coef) or DeepSeek-V3's --bias_update_rate may help"
    ]
    assert len(over) == 1 and over[0].startswith("step 4: layer 5 busiest expert has 3.2x the mean load")
    assert layer_stats([1, 3], 2) == {"min": 1, "max": 3, "mean": 2.0, "cv": 0.5, "dropped": 2}


def test_training_run_reports_load_and_resumes_the_bias(checkpoints, tmp_path):
    """One launch of 2 ranks: DeepSeek-V3 at tp 2 with the balance loss and the bias update; stopped at step 2 and
    resumed it continues bit for bit (the bias is saved); the same at tp 1 dp 2 counts both replicas' tokens;
    vocab-parallel loss and gradient checkpointing add the balance loss exactly as the plain run does."""
    pytest.importorskip("matplotlib")
    path = str(checkpoints / "deepseek_v3")
    run = dict(BASE, model_path=path, aux_loss_coef=0.1, bias_update_rate=0.05, warn_load_ratio=1.01)
    full, _, resumed, _, vp, gc = run_ranks(
        2,
        "tests.train_worker:run_many",
        [
            dict(run, log_dir=str(tmp_path / "full")),
            dict(run, save_dir=str(tmp_path / "ckpt"), stop_after=2),
            dict(run, save_dir=str(tmp_path / "ckpt"), resume=str(tmp_path / "ckpt" / "step-2")),
            dict(run, tp_size=1, steps=1, log_dir=str(tmp_path / "dp2")),
            dict(run, vocab_parallel_loss=True),
            dict(run, gradient_checkpointing=True),
        ],
    )
    assert resumed["losses"] == full["losses"][2:]  # bit for bit: the routing bias came back with the weights
    assert vp["losses"] == pytest.approx(full["losses"], abs=1e-5)
    assert gc["losses"] == pytest.approx(full["losses"], abs=1e-5)
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    tokens_x_k, experts = 32 * 3, 8
    for line in lines:
        assert line["aux_loss"] > 0
        assert [row["layer"] for row in line["expert_load"]] == [1, 2]  # layer 0 is dense
        for row in line["expert_load"]:
            assert set(row) == {"layer", "min", "max", "mean", "cv", "dropped"}
            assert row["mean"] == tokens_x_k / experts and row["min"] <= row["mean"] <= row["max"]
            assert row["dropped"] == 0 and row["cv"] >= 0
        assert line["load_max_over_mean"] == max(r["max"] / r["mean"] for r in line["expert_load"])
    dp_line = json.loads((tmp_path / "dp2" / "metrics.jsonl").read_text().splitlines()[0])
    assert dp_line["expert_load"][0]["mean"] == 2 * tokens_x_k / experts  # summed over the 2 dp ranks
    assert (tmp_path / "full" / "expert_load.png").stat().st_size > 1000
    assert full["load_plot"].endswith("expert_load.png")

    from safetensors import safe_open

    def biases(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys() if k.endswith("e_score_correction_bias")})
        return out

    start, saved = biases(checkpoints / "deepseek_v3"), biases(tmp_path / "ckpt" / "step-2")
    assert sorted(start) == sorted(saved) and len(start) == 2
    for key, b in start.items():
        moved = (saved[key] - b) / 0.05  # two steps of +-0.05 each: -2, 0 or 2 per expert
        assert torch.allclose(moved, moved.round(), atol=1e-4) and moved.abs().max() > 1


def test_static_dispatcher_drops_are_counted(checkpoints):
    """moe_impl="static" with a capacity factor: the slots it drops reach the load reading, summed per layer."""
    import npu_parallel
    from npu_parallel.moe.load import moe_blocks, read_load

    model = _converted(checkpoints, "deepseek_v2", moe_impl="static", capacity_factor=0.5)
    ids = seeded_ids(250, 2, 16, 0)
    with torch.no_grad():
        model(input_ids=ids)
    expected = [int(b.dispatcher.stats["dropped"]) for _, b in moe_blocks(model)]
    with torch.no_grad():
        model(input_ids=ids)
    reading = read_load(model, npu_parallel.init_distributed())
    assert reading.dropped == [2 * d for d in expected] and min(expected) > 0
