"""Routing hooks (issue 24 points 1-2): record_routing and override_routing against the unconverted model, and
the OKR watermark example; every multi-rank case in one launch of 2 ranks (tests/routing_worker.py)."""

from __future__ import annotations

import math

import pytest
import torch

import npu_parallel

from . import routing_worker
from .dist import run_ranks
from .models import VARIANTS, load_reference

OBSERVE = [
    n
    for n in ("deepseek_v2", "deepseek_v2_group", "deepseek_v3", "qwen3_moe", "mixtral", "deepseek_moe_remote")
    if n in VARIANTS
]
OVERRIDE = [n for n in ("deepseek_v2_group", "deepseek_v3", "qwen3_moe") if n in VARIANTS]
OKR_ARGS = ["--epsilon", "3.0", "--prompts", "6", "--new_tokens", "32", "--decoys", "6"]
THRESHOLD = 4.0  # the example's default: a text is called watermarked above z = 4


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory):
    okr = tmp_path_factory.mktemp("okr")
    model = routing_worker.build_tiny_deepseek_moe(okr / "tiny-deepseek-moe")
    return run_ranks(
        2,
        "tests.routing_worker:run_all",
        str(checkpoints),
        OBSERVE,
        OVERRIDE,
        [str(model), str(okr / "out"), OKR_ARGS],
        timeout=900,
    )


def test_observe_equals_the_reference_routers(results):
    """tp 1, tp 2 and ep 2 (tp 1): each record's ids, weights and raw logits are those the unconverted model's own
    router modules return, whole and identical on both ranks; top-k of the recorded scores gives the ids."""
    rows = results["observe"]
    assert len(rows) == 3 * len(OBSERVE)
    for key, row in rows.items():
        assert row["ids_equal"], key
        assert row["weights_diff"] <= 1e-5, (key, row)
        assert row["logits_diff"] <= 1e-5, (key, row)
        assert row["scores_rank_ids"], key
        assert row["same_on_ranks"], key
        assert row["hook_removed"], key


def test_observe_in_training_and_generate(results):
    """tp 2, train mode: one record per forward (none from the backward), only the fields asked for; generate: one
    record per decoding step (the prompt, then one token a step with the KV cache where the family has one)."""
    for name in OBSERVE:
        row = results["observe"][f"{name} tp=2 ep=2"]
        assert row["train_records"] == 1 and row["train_ids_equal"] and row["train_other_fields"], name
        steps = row["generate_tokens_per_record"]
        assert len(steps) == 4 and steps[0] == 5, (name, steps)
        assert all(t in (1, 5 + i) for i, t in enumerate(steps[1:], 1)), (name, steps)


def test_forced_routing_equals_the_forced_reference(results):
    """tp 2: the k least-liked experts forced on both models (the reference's router module patched to return them
    with the family's weights; once with the caller's own weights): eval and train logits, loss, the router's
    gradient and the loss after one SGD step (every gradient) equal; the forcing really changes the logits."""
    rows = results["override"]
    assert len(rows) == len(OVERRIDE) + 1
    for key, row in rows.items():
        print(key, {k: f"{v:.3g}" for k, v in row.items()})
        assert row["forced_changes_logits"] > 1e-3, key
        assert row["eval_logits_diff"] <= 1e-4, (key, row)
        assert row["train_logits_diff"] <= 1e-4, (key, row)
        assert math.isclose(row["loss"], row["ref_loss"], rel_tol=1e-5, abs_tol=1e-6), (key, row)
        assert row["router_grad_norm"] > 0, key
        assert row["router_grad_diff"] <= 1e-5 + 1e-4 * row["router_grad_norm"], (key, row)
        assert math.isclose(row["loss_after_step"], row["ref_loss_after_step"], rel_tol=1e-4, abs_tol=1e-5), (key, row)


def test_ranks_agree_on_an_override(results):
    """An override drawing different experts per rank: broadcast from the tp group's first rank gives both ranks the
    same logits; agree="check" raises RoutingDisagreement on every rank (no hang)."""
    row = results["disagreement"]
    assert row["broadcast_same_logits"]
    assert row["check_raised"] and "different experts" in row["check_raised"]


def test_watermark_separates_and_is_layout_free(results):
    """The OKR example on a tiny DeepSeek-MoE: watermarked text detected (pooled z over the 6 texts above the
    threshold 4, mean per-text z above the plain texts'), plain text not (|pooled z| < 3); tp 1 and tp 2 generate
    the same tokens and report the same numbers."""
    tp1, tp2 = results["watermark"][1], results["watermark"][2]
    assert tp1["texts"] == tp2["texts"]
    wm, plain = tp1["watermarked"], tp1["plain"]
    print(f"OKR z: watermarked pooled {wm['z_pooled']:.2f} mean {wm['z_mean']:.2f}; plain pooled "
          f"{plain['z_pooled']:.2f} mean {plain['z_mean']:.2f}; choice share {tp1['choice_share']}")  # fmt: skip
    assert tp1["threshold_z"] == THRESHOLD
    assert wm["z_pooled"] > THRESHOLD and abs(plain["z_pooled"]) < 3.0
    assert wm["z_mean"] > plain["z_mean"] + 2.0
    assert wm["hit_rate"] > wm["chance"]
    assert 0.0 < tp1["choice_share"]["routing_decisions"] < 1.0
    assert math.isfinite(tp1["perplexity"]["cost"])
    assert [t["watermarked"] for t in tp1["texts"]] != [t["plain"] for t in tp1["texts"]]
    for kind in ("watermarked", "plain"):
        assert tp1[kind]["z"] == pytest.approx(tp2[kind]["z"], abs=1e-3)


def test_hooks_cost_nothing_and_check_their_input(checkpoints):
    """One process: no hook object without a context; bad layers, fields, ids and agree values are one clear error;
    an unconverted model is refused; a fn returning ids out of range raises."""
    state = npu_parallel.init_distributed(1)
    name = "deepseek_v3"
    model = npu_parallel.convert_model(load_reference(name, checkpoints / name), state).eval()
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert all(b.routing_hook is None for b in blocks)
    ids = torch.arange(10).view(1, 10)
    with pytest.raises(ValueError, match="not MoE layers"):
        with npu_parallel.record_routing(model, layers=[0]):
            pass
    with pytest.raises(ValueError, match="fields"):
        with npu_parallel.record_routing(model, fields=("logits",)):
            pass
    with pytest.raises(ValueError, match="agree"):
        with npu_parallel.override_routing(model, lambda *a: None, agree="vote"):
            pass
    with pytest.raises(ValueError, match="no converted MoE block"):
        with npu_parallel.record_routing(load_reference(name, checkpoints / name)):
            pass
    with pytest.raises(ValueError, match="integer expert ids"):
        with torch.no_grad(), npu_parallel.override_routing(model, lambda layer, x, raw, s: raw[:, :2]):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="outside"):
        with torch.no_grad(), npu_parallel.override_routing(model, lambda layer, x, raw, s: s.topk(3).indices + 100):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="already overridden"):
        with (
            npu_parallel.override_routing(model, lambda *a: None),
            npu_parallel.override_routing(model, lambda *a: None),
        ):
            pass
    assert all(b.routing_hook is None for b in blocks)  # every context removed its hook, errors included
    with torch.no_grad(), npu_parallel.record_routing(model, layers=[2], device=None) as rec:
        model(input_ids=ids)
        model(input_ids=ids[:, :4])
    assert sorted(rec.layers) == [2] and [r.ids.shape for r in rec.layers[2]] == [(10, 3), (4, 3)]


def test_watermark_on_deepseek_moe_16b(tmp_path):
    """The example on the published DeepSeek-MoE 16B (remote code, top-8 of 64, epsilon 2.0), as the seed runs it."""
    import os
    import subprocess
    import sys

    path = os.environ.get("DEEPSEEK_MOE_LOCAL_PATH")
    if not path:
        pytest.skip("DEEPSEEK_MOE_LOCAL_PATH is not set (a local deepseek-moe-16b folder; never downloaded)")
    from .repo import ROOT

    cmd = [sys.executable, str(ROOT / "examples" / "okr_watermark.py"), "--model", path, "--out", str(tmp_path)]
    cmd += ["--trust_remote_code", "--prompts", "2", "--new_tokens", "16", "--decoys", "4"]
    subprocess.run(cmd, check=True, timeout=3600)
    import json

    out = json.loads((tmp_path / "results.json").read_text())
    assert out["top_k"] == 8 and out["epsilon"] == 2.0
    assert 0.0 < out["choice_share"]["routing_decisions"] <= 1.0
    assert out["watermarked"]["z_pooled"] > out["plain"]["z_pooled"]
