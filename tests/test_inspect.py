"""``inspect_checkpoint`` / ``format_report``: what a checkpoint holds, read from config and headers only."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from npu_parallel.checkpoint.inspect import compact_ranges, format_report, human_bytes, human_count, inspect_checkpoint
from npu_parallel.checkpoint.safetensors_io import CheckpointError

HEADS_OR_EXPERTS = r"attention heads|routed experts"


def persistent_buffers(model: torch.nn.Module) -> dict[str, int]:
    out = {}
    for mod_name, module in model.named_modules():
        for leaf, b in module._buffers.items():
            if b is not None and leaf not in module._non_persistent_buffers_set:
                out[f"{mod_name}.{leaf}"] = b.numel()
    return out


def test_deepseek_v2_report(checkpoints):
    path = checkpoints / "deepseek_v2"
    r = inspect_checkpoint(path)
    assert r["format"] == "huggingface"
    assert (r["architecture"], r["model_type"]) == ("DeepseekV2ForCausalLM", "deepseek_v2")
    assert r["num_layers"] == 3
    assert r["dense_layers"] == [0] and r["moe_layers"] == [1, 2]
    assert (r["experts"], r["top_k"], r["shared_experts"]) == (8, 3, 2)
    assert r["routing"]["topk_method"] == "greedy"
    assert r["attention"]["kind"] == "MLA" and r["attention"]["summary"] == "MLA, q_lora_rank=48"
    assert (r["attention"]["kv_lora_rank"], r["attention"]["num_heads"]) == (32, 8)
    assert (r["hidden_size"], r["vocab_size"], r["tie_word_embeddings"]) == (64, 250, False)
    assert r["bytes_on_disk"] == (path / "model.safetensors").stat().st_size
    assert r["dtypes"] == {"F32": r["params_total"]}
    assert r["plan"] == "DeepSeek-V2/V2-Lite/V3" and r["plan_error"] is None
    assert r["warnings"] == []

    # tp must divide 8 heads and 8 experts
    assert r["tp"]["valid"] == [1, 2, 4, 8]
    for bad in (3, 16):
        assert bad not in r["tp"]["valid"]
        assert re.search(HEADS_OR_EXPERTS, r["tp"]["invalid"][bad]), r["tp"]["invalid"][bad]
    assert "8 attention heads" in r["tp"]["invalid"][3]

    # per-rank estimate: everything at tp=1 (all F32), and shrinking with tp
    est = r["per_rank_bytes_estimate"]
    assert sorted(est) == [1, 2, 4, 8]
    assert est[1] == 4 * r["params_total"]
    assert est[1] > est[2] > est[4] > est[8] > 0
    json.dumps(r)  # JSON-serialisable


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3", "deepseek_v2_lite"])
def test_param_count_matches_transformers(checkpoints, name):
    """Header count == the model's parameters + its persistent buffers (DeepSeek-V3's e_score_correction_bias)."""
    r = inspect_checkpoint(checkpoints / name)
    model = AutoModelForCausalLM.from_pretrained(checkpoints / name, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    buffers = persistent_buffers(model)
    assert r["params_total"] == params + sum(buffers.values())
    # transformers 5 fuses experts in memory but saves per-expert keys: the same numbers either way
    state = model.state_dict()
    assert r["params_total"] == sum(v.numel() for v in state.values())
    assert r["params_experts"] == sum(v.numel() for k, v in state.items() if ".experts." in k)
    assert r["params_experts"] == 2 * 8 * 3 * 32 * 64  # 2 MoE layers x 8 experts x gate/up/down of 32 x 64
    if name == "deepseek_v3":
        assert set(buffers) == {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2)}
        assert r["params_total"] - params == 2 * 8
        assert r["routing"]["e_score_correction_bias"] is True
    else:
        assert buffers == {} and r["params_total"] == params


def test_lite_has_no_q_lora(checkpoints):
    r = inspect_checkpoint(checkpoints / "deepseek_v2_lite")
    assert r["attention"]["summary"] == "MLA without q LoRA (q_proj)"
    assert r["attention"]["q_lora_rank"] is None
    assert "MLA without q LoRA (q_proj)" in format_report(r)


def test_routing_fields(checkpoints):
    g = inspect_checkpoint(checkpoints / "deepseek_v2_group")["routing"]
    assert g == {
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.5,
    }
    v3 = inspect_checkpoint(checkpoints / "deepseek_v3")["routing"]
    assert (v3["n_group"], v3["topk_group"], v3["norm_topk_prob"], v3["routed_scaling_factor"]) == (4, 2, True, 2.5)
    remote = inspect_checkpoint(checkpoints / "deepseek_v2_remote")["routing"]
    assert remote["scoring_func"] == "softmax"


def test_format_report_key_facts(checkpoints):
    r = inspect_checkpoint(checkpoints / "deepseek_v3")
    text = format_report(r)
    for fact in (
        "DeepseekV3ForCausalLM",
        "deepseek_v3",
        "dense: 0; MoE: 1-2",
        "8 routed, top-3, 2 shared",
        "MLA, q_lora_rank=48",
        "kv_lora_rank=32",
        "8 heads",
        "e_score_correction_bias",
        f"{r['params_total']:,}",
        f"{r['bytes_on_disk']:,} bytes",
        "F32",
        "estimate",
        "tp=1",
        "tp=8",
        "8 attention heads",
    ):
        assert fact in text, fact
    assert text.splitlines()[-1].lstrip().startswith("tp=")  # the tp table comes last
    # the JSON form (string keys) renders the same
    assert format_report(json.loads(json.dumps(r))) == text


def test_moe_layer_freq_and_mismatch_warning(checkpoints, tmp_path):
    path = tmp_path / "freq"
    shutil.copytree(checkpoints / "deepseek_v2", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["moe_layer_freq"] = 2
    (path / "config.json").write_text(json.dumps(cfg))
    r = inspect_checkpoint(path)
    assert r["dense_layers"] == [0, 1] and r["moe_layers"] == [2]
    assert len(r["warnings"]) == 1 and "layers 1-2" in r["warnings"][0]
    assert "warning" in format_report(r)


def test_missing_config_is_a_checkpoint_error(checkpoints, tmp_path):
    path = tmp_path / "noconfig"
    shutil.copytree(checkpoints / "deepseek_v2", path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        inspect_checkpoint(path)


def test_truncated_safetensors_is_a_checkpoint_error(checkpoints, tmp_path):
    path = tmp_path / "truncated"
    shutil.copytree(checkpoints / "deepseek_v2", path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        inspect_checkpoint(path)


def test_index_with_missing_shard_is_a_checkpoint_error(checkpoints, tmp_path):
    path = tmp_path / "index"
    shutil.copytree(checkpoints / "deepseek_v2", path)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        inspect_checkpoint(path)


def test_sharded_index_checkpoint(checkpoints, tmp_path):
    """A model.safetensors.index.json checkpoint: counts over all shards; a truncated shard is named."""
    from safetensors.torch import load_file, save_file

    src = checkpoints / "deepseek_v2"
    path = tmp_path / "two_shards"
    path.mkdir()
    shutil.copy(src / "config.json", path)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, path / fname)
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    r = inspect_checkpoint(path)
    whole = inspect_checkpoint(src)
    assert r["params_total"] == whole["params_total"] and r["params_experts"] == whole["params_experts"]
    assert r["bytes_on_disk"] == sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert r["files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*truncated"):
        inspect_checkpoint(path)


def test_unsupported_architecture_reports_without_plan(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path)
    r = inspect_checkpoint(tmp_path)
    assert r["plan"] is None and "no parallel plan" in r["plan_error"] and "gpt2" in r["plan_error"]
    assert r["tp"] == {"valid": [], "invalid": {}} and r["per_rank_bytes_estimate"] == {}
    assert (r["architecture"], r["num_layers"], r["experts"], r["moe_layers"]) == ("GPT2LMHeadModel", 1, None, [])
    assert r["tie_word_embeddings"] is True
    assert r["params_total"] == sum(p.numel() for p in model.parameters())  # tied lm_head stored once
    text = format_report(r)
    assert "no parallel plan" in text and "GPT2LMHeadModel" in text and "all dense" in text


def test_sharded_checkpoint(checkpoints, tmp_path):
    """Our own format: the same facts from manifest.json, plus its tp."""
    from npu_parallel.checkpoint.load import load_pretrained
    from npu_parallel.checkpoint.save import save_sharded
    from npu_parallel.parallel.state import single_rank_state

    state = single_rank_state()
    out = save_sharded(load_pretrained(checkpoints / "deepseek_v3", state, progress=False), tmp_path / "sh", state)
    hf = inspect_checkpoint(checkpoints / "deepseek_v3")
    r = inspect_checkpoint(out)
    assert r["format"] == "npu_parallel.sharded" and r["sharded_tp"] == 1
    assert r["bytes_on_disk"] == (out / "rank-00000-of-00001.safetensors").stat().st_size
    same = (
        "architecture",
        "model_type",
        "num_layers",
        "dense_layers",
        "moe_layers",
        "experts",
        "top_k",
        "shared_experts",
        "routing",
        "attention",
        "hidden_size",
        "vocab_size",
        "tie_word_embeddings",
        "params_total",
        "params_experts",
        "dtypes",
        "plan",
        "tp",
    )
    assert {k: r[k] for k in same} == {k: hf[k] for k in same}
    # the manifest's real split agrees with the name rule the HF estimate uses
    assert r["per_rank_bytes_estimate"] == hf["per_rank_bytes_estimate"]
    assert "sharded checkpoint, tp=1" in format_report(r)


def test_units_and_ranges():
    assert human_count(15_706_484_224) == "15.7 B" and human_count(285_616) == "285.6 K" and human_count(12) == "12"
    assert human_bytes(31_413_678_480) == "31.4 GB" and human_bytes(512) == "512 B"
    assert compact_ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8" and compact_ranges([0]) == "0"
    assert compact_ranges([]) == "none"
