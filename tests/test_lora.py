"""LoRA on converted models against PEFT on the unconverted ones: load, one SGD step, save, merge; tp 1, 2, 4."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from .dist import run_ranks

VARIANTS = ["deepseek_v2", "deepseek_v2_lite", "deepseek_v3", "qwen3_moe"]  # q LoRA, no q LoRA, V3, Qwen3-MoE
TOL = 2e-5


@pytest.fixture(scope="module")
def lora_results(checkpoints):
    # one world-4 launch: tp 1, 2 and 4 in turn; at tp 2 also the static and masked dispatchers (first variant)
    impls = {"2": ["auto", "static", "masked"]}
    return run_ranks(4, "tests.lora_worker:compare", str(checkpoints), VARIANTS, [1, 2, 4], impls, timeout=900)


CASES = [f"{tp}/auto/{v}" for tp in (1, 2, 4) for v in VARIANTS] + ["2/static/deepseek_v2", "2/masked/deepseek_v2"]


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
