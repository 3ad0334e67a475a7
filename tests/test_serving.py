"""A merged folder serves as it is: an FP8 V3-style checkpoint and an SFT-like run merge into folders that reload
with AutoModelForCausalLM and AutoTokenizer, render their chat template, stop on its end of turn and carry no
quantization_config; `inspect --serving` flags a folder missing those; `merge --lora_adapter` equals PEFT's
merge_and_unload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.checkpoint.save import save_sharded

from .cli_runs import main_captured as cli
from .published import build_published
from .serving import CHATML, add_tokenizer

MESSAGES = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]


def _stored_keys(folder: Path) -> set[str]:
    return set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])


def _stored_dtypes(folder: Path) -> set[str]:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out


def _serves(capsys, folder: Path) -> str:
    code, out, _ = cli(capsys, "inspect", "--serving", str(folder))
    assert code == 0 and "ready to serve" in out, out
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return build_published(tmp_path_factory.mktemp("published"))


def test_merged_fp8_v3_folder_serves(capsys, published, tmp_path):
    src, tp, hf = tmp_path / "src", tmp_path / "tp", tmp_path / "hf"
    shutil.copytree(published["fp8"], src)
    tok = add_tokenizer(src)
    assert cli(capsys, "convert", str(src), "--tp", "2", "--out", str(tp), "-q")[0] == 0
    code, out, _ = cli(capsys, "merge", str(tp), "--out", str(hf), "-q")
    assert code == 0 and "serving" not in out, out  # merge's own serving check found nothing
    config = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in config
    # the dequantized weights are bf16 (the rest as the checkpoint stored it): config.json names the main dtype
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16" and "BF16" in _stored_dtypes(hf)
    n = config["num_hidden_layers"]
    assert config["num_nextn_predict_layers"] == 1 and f"model.layers.{n}.eh_proj.weight" in _stored_keys(hf)
    gen = json.loads((hf / "generation_config.json").read_text())
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert gen["eos_token_id"] == [tok.eos_token_id, end] and gen["pad_token_id"] == tok.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(hf)  # dtype from config.json: bfloat16
    plain = AutoModelForCausalLM.from_pretrained(published["plain"], dtype=torch.bfloat16)
    ids = torch.randint(5, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    merged_tok = AutoTokenizer.from_pretrained(hf)
    assert merged_tok.apply_chat_template(MESSAGES, tokenize=False) == tok.apply_chat_template(MESSAGES, tokenize=False)
    assert "<|im_end|>" in merged_tok.apply_chat_template(MESSAGES, tokenize=False)
    _serves(capsys, hf)


def test_merged_sft_run_carries_its_training_template_and_dtype(capsys, checkpoints, tmp_path):
    src, run, hf = tmp_path / "base", tmp_path / "step-10", tmp_path / "hf"
    shutil.copytree(checkpoints / "mixtral", src)
    add_tokenizer(src, chat_template=None)  # a base model: no chat template of its own
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    state = npu_parallel.init_distributed()
    extra = {"config": {"template": str(template)}, "precision": {"compute": "bfloat16"}}
    save_sharded(load_pretrained(src, state, progress=False), run, state, extra=extra)  # what a run's step writes
    code, out, _ = cli(capsys, "merge", str(run), "--out", str(hf), "-q")
    assert code == 0 and "serving" not in out, out
    config = json.loads((hf / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16" and _stored_dtypes(hf) == {"BF16"}
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.chat_template == CHATML
    text = tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user hello world<|im_end|><|im_start|>assistant"
    gen = json.loads((hf / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    mark = json.loads((hf / "npu_parallel.json").read_text())
    assert mark["serving"]["chat_template"] == "training"
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.dtype == torch.bfloat16 and model.generation_config.pad_token_id is not None
    _serves(capsys, hf)
    # the base folder itself: no chat template
    code, out, _ = cli(capsys, "inspect", "--serving", str(src))
    assert code == 1 and "no chat template" in out


def test_inspect_serving_flags_what_vllm_would_miss(capsys, checkpoints, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(checkpoints / "mixtral", folder)
    add_tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mixtral_custom.MixtralForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    code, out, _ = cli(capsys, "inspect", "--serving", str(folder))
    assert code == 1
    for says in (
        "quantization_config ('fp8') but no tensor is quantized",
        "names no torch_dtype",
        "modeling_mixtral_custom.py, not in the folder",
        "closes a turn with '<|im_end|>'",
    ):
        assert says in out, (says, out)
    code, out, _ = cli(capsys, "inspect", "--serving", "--json", str(folder))
    findings = json.loads(out)
    assert code == 1 and {"level", "what", "fix"} <= set(findings[0])
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    code, out, _ = cli(capsys, "inspect", "--serving", str(folder))
    assert code == 1 and "no tokenizer loads" in out
    code, _, err = cli(capsys, "inspect", "--serving", str(tmp_path))
    assert code == 2 and "no readable config.json" in err


def test_merge_lora_adapter_equals_peft_merge_and_unload(capsys, checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    src, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(checkpoints / "deepseek_v3", src)
    add_tokenizer(src)
    torch.manual_seed(3)
    targets = ["q_a_proj", "q_b_proj", "kv_b_proj", "o_proj"]
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(src), LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    )
    peft_model.save_pretrained(adapter)
    want = peft_model.merge_and_unload().state_dict()
    tp = tmp_path / "tp"
    assert cli(capsys, "convert", str(src), "--tp", "2", "--out", str(tp), "-q")[0] == 0
    for base, out in ((src, tmp_path / "hf_from_hf"), (tp, tmp_path / "hf_from_tp")):
        code, _, err = cli(capsys, "merge", str(base), "--lora_adapter", str(adapter), "--out", str(out), "-q")
        assert code == 0, err
        got = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert set(got) == set(want)
        worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
        assert worst < 1e-6, worst
        assert any((got[k] != AutoModelForCausalLM.from_pretrained(src).state_dict()[k]).any() for k in want)
        assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    code, _, err = cli(capsys, "merge", str(tp), "--lora_adapter", str(tmp_path), "--out", str(tmp_path / "x"))
    assert code == 2 and "no adapter_config.json" in err
