"""LoRA in the training loop: adapter-only checkpoints, exact resume, merge to a PEFT folder or a merged HF folder."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from npu_parallel.tools.cli import main

from .common import seeded_ids
from .dist import run_ranks

BASE = dict(batch_size=1, max_length=32, steps=5, lr=1e-2, warmup_steps=1, jit_warmup_steps=1, seed=5, lora_r=4)


def test_lora_run_resumes_exactly_and_merges(checkpoints, tmp_path):
    path = str(checkpoints / "deepseek_v2")
    cfg = dict(BASE, model_path=path)
    ckpt = tmp_path / "ckpt"
    full, _, resumed = run_ranks(
        2,
        "tests.train_worker:run_many",
        [
            cfg,
            dict(cfg, stop_after=3, save_dir=str(ckpt), save_every=2),
            dict(cfg, resume=str(ckpt / "step-2"), save_dir=str(ckpt)),
        ],
    )
    assert resumed["steps"] == [3, 4, 5] and resumed["losses"] == full["losses"][2:]  # bit for bit
    manifest = json.loads((ckpt / "step-5" / "manifest.json").read_text())
    assert manifest["tensors"] and all(".lora." in name for name in manifest["tensors"])  # adapters only
    assert "experts.lora.gate_up_proj.lora_A" in " ".join(manifest["tensors"])

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(["merge", str(ckpt / "step-5"), "--out", str(adapter), "-q"]) == 0
    assert main(["merge", str(ckpt / "step-5"), "--out", str(merged), "--merge_lora", "-q"]) == 0
    ids = seeded_ids(250, 1, 12, 0)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(adapter))
    base = AutoModelForCausalLM.from_pretrained(path)
    folded = AutoModelForCausalLM.from_pretrained(str(merged))
    with torch.no_grad():
        want, plain, got = (m(input_ids=ids).logits for m in (peft, base, folded))
    assert (want - plain).abs().max() > 1e-4  # the trained adapters change the model
    assert (got - want).abs().max() < 1e-4  # folded weights vs x@A@B: fp32 rounding only

    cont = run_ranks(
        2, "tests.train_worker:run_train", dict(BASE, model_path=path, lora_r=0, lora_adapter=str(adapter))
    )
    assert all(map(torch.isfinite, torch.tensor(cont["losses"])))


def test_lora_mixed_precision_keeps_the_base_bf16_and_the_adapters_fp32(checkpoints):
    """--precision bf16 with LoRA: the frozen base is held in bf16 (no fp32 copy of what never updates), the
    adapters are the fp32 master weights, and the losses follow the fp32 run's step by step, under data_parallel
    at dp 1 (tp 2) and dp 2 (tp 1)."""
    cfg = dict(BASE, model_path=str(checkpoints / "deepseek_v2"), steps=4, lr=1e-3)
    jobs = [dict(cfg, tp_size=tp, precision=p) for tp in (2, 1) for p in ("fp32", "bf16")]
    fp32, mixed, fp32_dp, mixed_dp = run_ranks(2, "tests.train_worker:run_many", jobs)
    # the base in bf16, but for the modules transformers keeps in fp32 (DeepSeek-V2's router: _keep_in_fp32_modules)
    assert "torch.bfloat16" in mixed["param_dtypes"]["frozen"]
    assert fp32["param_dtypes"] == {"trainable": ["torch.float32"], "frozen": ["torch.float32"]}
    assert mixed_dp["state"]["dp"] == 2
    for want, got in ((fp32, mixed), (fp32_dp, mixed_dp)):
        assert got["param_dtypes"]["trainable"] == ["torch.float32"]
        gaps = (torch.tensor(got["losses"]) - torch.tensor(want["losses"])).abs()
        assert gaps.max() < 0.05, (want["losses"], got["losses"])  # bf16 rounding of ~5.5, not a different run
