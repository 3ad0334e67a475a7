"""`npu-parallel generate` at tp 2: chat-rendered, sampled text equal to the unconverted model's under --seed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from .cli_runs import main_captured as cli
from .serving import add_tokenizer


@pytest.fixture
def src(checkpoints, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(checkpoints / "deepseek_v3", path)
    add_tokenizer(path)
    return path


def test_generate_cli_chat_sampled_at_tp2_equals_the_unconverted_model(capsys, src):
    flags = ["--max_new_tokens", "6", "--temperature", "0.9", "--top_p", "0.95", "--seed", "11"]
    code, out, err = cli(
        capsys, "generate", str(src), "--tp", "2", "--prompt", "hello world", "--chat", "--json", *flags
    )
    assert code == 0, err
    (got,) = json.loads(out)
    tok_ids = add_tokenizer(src.parent / "tok").apply_chat_template(
        [{"role": "user", "content": "hello world"}], add_generation_prompt=True, tokenize=True
    )
    ids = torch.tensor([list(tok_ids["input_ids"] if hasattr(tok_ids, "keys") else tok_ids)])
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    torch.manual_seed(11)
    with torch.no_grad():
        want = ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=True,
            temperature=0.9,
            top_p=0.95,
            pad_token_id=2,
        )
    assert got["ids"] == want[0, ids.shape[1] :].tolist()
    assert got["prompt"] == "hello world" and isinstance(got["text"], str)


def test_generate_cli_refuses_chat_without_a_template(capsys, checkpoints, tmp_path):
    path = tmp_path / "plain"
    shutil.copytree(checkpoints / "mixtral", path)
    add_tokenizer(path, chat_template=None)
    code, _, err = cli(capsys, "generate", str(path), "--prompt", "hi", "--chat")
    assert code == 2 and "has no chat template" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "generate", str(path), "--prompt", "hi", "--top_p", "0")
    assert code == 2 and "--top_p 0.0: must be in (0, 1]" in err
