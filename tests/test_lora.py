"""LoRA on converted models against PEFT on the unconverted ones: load, one SGD step, save, merge; tp 1, 2, 4."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from .dist import run_ranks
from .registry import other_impls

VARIANTS = ["deepseek_v2", "deepseek_v2_lite", "deepseek_v3", "qwen3_moe"]  # q LoRA, no q LoRA, V3, Qwen3-MoE
TOL = 2e-5


@pytest.fixture(scope="module")
def lora_results(checkpoints, tmp_path_factory):
    # one world-4 launch: tp 1, 2 and 4 in turn; at tp 2 also the other portable dispatchers (first variant)
    impls = {"2": ["auto", *other_impls()]}
    work = str(tmp_path_factory.mktemp("lora"))
    return run_ranks(4, "tests.lora_worker:compare", str(checkpoints), VARIANTS, [1, 2, 4], impls, work, timeout=900)


CASES = [f"{tp}/auto/{v}" for tp in (1, 2, 4) for v in VARIANTS] + [f"2/{impl}/deepseek_v2" for impl in other_impls()]


@pytest.mark.parametrize("case", CASES)
def test_lora_matches_peft(lora_results, case):
    r = lora_results[case]
    assert r["trainable_only_lora"] and r["experts_adapted"], r
    assert r["logits"] < TOL, f"a PEFT adapter loaded into the converted model: logits differ {r}"
    assert r["loss"] < TOL, r
    assert r["loss_moved"] > 100 * TOL, f"the SGD step must change the loss for the comparison to mean anything {r}"
    assert r["after"] < TOL, f"one SGD step on the adapters: loss after differs from PEFT's {r}"
    assert r["keys_equal"] and r["stepped_adapter"] < TOL, f"saved adapter differs from PEFT's after the step {r}"
    assert r["reload_logits"] < TOL, f"save_lora's folder loaded by PeftModel.from_pretrained: logits differ {r}"
    assert r["merged"] < TOL, f"merge_lora differs from PEFT's merge_and_unload {r}"
    assert r["fresh_keys_equal"] and r["fresh_adapter"] == 0.0, f"a new adapter from a LoraConfig differs {r}"
    assert r["banned_ops"] == [], r["banned_ops"]
    # the dispatcher's own syncs only (grouped: one per MoE layer, static and masked: none)
    assert r["host_syncs_forward"] <= r["moe_layers"] * (case.split("/")[1] == "auto")


def test_lora_refuses_what_it_cannot_do(checkpoints, tmp_path):
    """Each unsupported request is a LoraError naming the value and the fix, before anything changes."""
    from peft import LoraConfig

    import npu_parallel
    from npu_parallel.convert.lora import LoraError

    from .models import load_reference

    state = npu_parallel.init_distributed()
    path = checkpoints / "deepseek_v2"
    bad = [
        (LoraConfig(r=4, target_modules=["embed_tokens"]), "only linear layers"),
        (LoraConfig(r=4, target_modules=["q_b_proj"], lora_dropout=0.1, target_parameters=PARAMS), "lora_dropout"),
        (LoraConfig(r=4, target_modules=["q_b_proj"], use_dora=True), "DoRA"),
        (LoraConfig(r=4, target_modules=["nothing_here"]), "match no weight"),
        (LoraConfig(r=4, target_modules=["o_proj"], target_parameters=["o_proj.weight"]), "targeted twice"),
        (str(tmp_path), "not a PEFT adapter folder"),
    ]
    for adapter, message in bad:
        model = npu_parallel.convert_model(load_reference("deepseek_v2", path), state)
        with pytest.raises(LoraError, match=message):
            npu_parallel.apply_lora(model, state, adapter)
    # an adapter folder of another model: the missing tensor is named
    other = tmp_path / "other"
    qwen = npu_parallel.convert_model(load_reference("qwen3_moe", checkpoints / "qwen3_moe"), state)
    npu_parallel.apply_lora(qwen, state, LoraConfig(r=4, target_modules=["q_proj"]))
    npu_parallel.save_lora(qwen, other, state)
    lite = checkpoints / "deepseek_v2_lite"  # q_proj of 8 heads x 32 dims, Qwen's 8 x 16
    model = npu_parallel.convert_model(load_reference("deepseek_v2_lite", lite), state)
    with pytest.raises(LoraError, match="shape"):
        npu_parallel.apply_lora(model, state, other)


PARAMS = ["mlp.experts.gate_up_proj"]
