"""A sharded checkpoint written by npu_parallel 0.1.0 (before the sub-package layout) still loads and merges.

tests/data/sharded_v0.1.0/tp2 was written by ``save_sharded`` at commit c9fc797 (tp=2, bf16, a tiny
DeepSeek-V2 with per-expert keys); expected.json holds the logits the unconverted bf16 model gave then.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import npu_parallel
from npu_parallel.parallel.state import single_rank_state
from npu_parallel.tools.cli import main

LEGACY = Path(__file__).parent / "data" / "sharded_v0.1.0"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
IDS = torch.tensor(EXPECTED["input_ids"])


def _check_logits(logits: torch.Tensor) -> None:
    # bf16 weights; the converted model sums experts in another order than transformers did: bf16 rounding
    assert logits.shape == (1, len(EXPECTED["input_ids"][0]), len(EXPECTED["logits_first_row"]))
    assert logits[0, 0].float().tolist() == pytest.approx(EXPECTED["logits_first_row"], abs=3e-2)
    assert logits.float().abs().sum().item() == pytest.approx(EXPECTED["logits_abs_sum"], rel=1e-2)


def test_legacy_checkpoint_loads_resharded_to_tp1():
    model = npu_parallel.load_sharded(LEGACY / "tp2", single_rank_state())  # checksums verified, 2 -> 1
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        _check_logits(model(input_ids=IDS).logits)


def test_legacy_checkpoint_merges_to_the_same_weights(tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(LEGACY / "tp2", src)  # merge must not need to write next to the committed data
    assert main(["merge", str(src), "--out", str(tmp_path / "hf"), "-q"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    loaded = npu_parallel.load_sharded(src, single_rank_state())
    ours, theirs = loaded.state_dict(), merged.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        _check_logits(merged(input_ids=IDS).logits)
