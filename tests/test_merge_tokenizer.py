"""`merge` writes a folder AutoTokenizer and generate() work on: tokenizer files and generation_config.json come
from the source checkpoint the manifest names (convert and save_sharded record it) or from --tokenizer DIR."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.checkpoint.save import save_sharded

from .cli_runs import main_captured as cli

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a tiny model says hello to the fox"]
CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def add_tokenizer(folder: Path) -> None:
    """A real word-level tokenizer trained on a few strings, saved as transformers does, and a generation config."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT
    fast.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False, max_new_tokens=4).save_pretrained(folder)


@pytest.fixture
def src(checkpoints, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(checkpoints / "mixtral", path)
    add_tokenizer(path)
    return path


def _tokenizer_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "chat_template", "generation")))


def test_convert_merge_gives_a_folder_that_tokenizes_and_generates(capsys, caplog, src, tmp_path):
    tp, hf = tmp_path / "tp", tmp_path / "hf"
    assert cli(capsys, "convert", str(src), "--tp", "2", "--out", str(tp), "-q")[0] == 0
    assert json.loads((tp / "manifest.json").read_text())["source_path"] == str(src.resolve())
    with caplog.at_level(logging.WARNING):
        code, out, _ = cli(capsys, "merge", str(tp), "--out", str(hf), "-q")
    assert code == 0 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    copied = _tokenizer_names(src)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(copied)
    assert _tokenizer_names(hf) == copied
    assert all((hf / n).read_bytes() == (src / n).read_bytes() for n in copied if n != "generation_config.json")
    gen, src_gen = (json.loads((d / "generation_config.json").read_text()) for d in (hf, src))
    assert gen == {**src_gen, "pad_token_id": 2}  # merge adds the pad id serving engines want (eos: end of turn)
    assert f"from {src.resolve()}" in out and "tokenizer.json" in out
    mark = json.loads((hf / "npu_parallel.json").read_text())
    assert mark["tokenizer"]["files"] == copied and set(copied) <= set(mark["files"])

    tok, ref_tok = AutoTokenizer.from_pretrained(hf), AutoTokenizer.from_pretrained(src)
    enc = tok("hello world the fox", return_tensors="pt")
    assert enc["input_ids"].tolist() == ref_tok("hello world the fox", return_tensors="pt")["input_ids"].tolist()
    assert tok.chat_template == CHAT
    model, ref = AutoModelForCausalLM.from_pretrained(hf), AutoModelForCausalLM.from_pretrained(src)
    assert model.generation_config.max_new_tokens == 4
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        ref_gen = ref.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 3 and torch.equal(gen, ref_gen)
    assert isinstance(tok.decode(gen[0]), str)


def test_without_a_tokenizer_merge_warns_once_and_says_so(capsys, caplog, src, tmp_path):
    tp, hf = tmp_path / "tp", tmp_path / "hf"
    assert cli(capsys, "convert", str(src), "--tp", "2", "--out", str(tp), "-q")[0] == 0
    moved = src.rename(tmp_path / "moved")  # the source folder is gone (another machine, deleted...)
    with caplog.at_level(logging.WARNING):
        code, out, _ = cli(capsys, "merge", str(tp), "--out", str(hf), "-q")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert code == 0 and len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"no tokenizer: its source folder {src.resolve()} is gone")
    assert f"AutoTokenizer.from_pretrained({hf}) fails" in warnings[0] and "--tokenizer DIR" in warnings[0]
    assert "tokenizer: none" in out and _tokenizer_names(hf) == ["generation_config.json"]  # from config.json: eos, pad
    with pytest.raises((OSError, ValueError)):
        AutoTokenizer.from_pretrained(hf)
    # --tokenizer DIR: from anywhere
    assert cli(capsys, "merge", str(tp), "--out", str(hf), "--overwrite", "--tokenizer", str(moved), "-q")[0] == 0
    assert _tokenizer_names(hf) == _tokenizer_names(moved)
    assert AutoTokenizer.from_pretrained(hf)("hello")["input_ids"]


def test_a_source_folder_now_holding_another_model_is_not_used(capsys, caplog, src, tmp_path):
    tp, hf = tmp_path / "tp", tmp_path / "hf"
    assert cli(capsys, "convert", str(src), "--tp", "2", "--out", str(tp), "-q")[0] == 0
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, vocab_size=32000)))
    with caplog.at_level(logging.WARNING):
        assert cli(capsys, "merge", str(tp), "--out", str(hf), "-q")[0] == 0
    assert any("now holds another model (its vocab_size is 32000" in r.getMessage() for r in caplog.records)
    assert _tokenizer_names(hf) == ["generation_config.json"]  # from config.json: eos, pad


def test_bad_tokenizer_dir_is_refused(capsys, src, tmp_path):
    tp = tmp_path / "tp"
    assert cli(capsys, "convert", str(src), "--tp", "2", "--out", str(tp), "-q")[0] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, says in ((tmp_path / "nope", "no such folder"), (empty, "holds none of tokenizer.json")):
        code, _, err = cli(capsys, "merge", str(tp), "--out", str(tmp_path / "hf"), "--tokenizer", str(bad))
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"--tokenizer {bad}: {says}" in err
    assert not (tmp_path / "hf").exists()


def test_save_sharded_records_where_the_model_came_from(capsys, src, tmp_path):
    """load_pretrained -> save_sharded -> load_sharded -> save_sharded -> merge: the tokenizer still comes along."""
    state = npu_parallel.init_distributed()
    save_sharded(load_pretrained(src, state, progress=False), tmp_path / "a", state)
    save_sharded(load_sharded(tmp_path / "a", state), tmp_path / "b", state)
    for name in ("a", "b"):
        assert json.loads((tmp_path / name / "manifest.json").read_text())["source_path"] == str(src.resolve())
    assert cli(capsys, "merge", str(tmp_path / "b"), "--out", str(tmp_path / "hf"), "-q")[0] == 0
    assert _tokenizer_names(tmp_path / "hf") == _tokenizer_names(src)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("hello world")["input_ids"]
