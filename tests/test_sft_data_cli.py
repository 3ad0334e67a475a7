"""Chat data through the training command line: bad input is one line and exit 2 before the model loads (unknown
fields, roles out of order, an empty assistant turn, no template, non-UTF-8, an eval split that leaves no data),
and check_inputs builds the SFT stream and eval set for chat data."""

from __future__ import annotations

import json
import shutil

import pytest

from npu_parallel.training.config import TrainConfig, check_args, check_inputs
from npu_parallel.training.dataset import DataStream
from npu_parallel.training.errors import ConfigError

from .cli_runs import LITE, run_cases, train_args
from .sft_data_helpers import chat, layout, write_jsonl
from .tokenizers_fixture import add_tokenizer


@pytest.fixture(scope="module")
def chat_model(checkpoints, chat_tokenizers, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_cli")
    model, bare = root / "model", root / "no_template"
    shutil.copytree(checkpoints / "deepseek_v2", model)
    add_tokenizer(model, "deepseek", chat_tokenizers["deepseek"])
    shutil.copytree(model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    return {"root": root, "model": model, "bare": bare, "plain": checkpoints / "deepseek_v2"}


def _file(root, name, lines):
    path = root / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return str(path)


BAD = {
    "unknown_fields": "u.jsonl:1: no 'text' field (it has 'question', 'reply'); pass --text_field to name the field "
    "that holds the text, or give chat records (no known format has these fields",
    "roles": "r.jsonl:2: messages record roles out of order (user user assistant)",
    "empty_assistant": "e.jsonl:1: messages record assistant turn 1 is empty",
    "no_template": "no chat template: the tokenizer of --model_path has none; pass --template NAME",
    "no_tokenizer": "has no tokenizer (tokenizer.json or tokenizer.model); chat and instruction data need it",
    "non_utf8": "n.jsonl: not UTF-8 at byte",
    "eval_split": "--eval_split 0.01: holds out 0 of 8 examples, leaving no eval data",
    "format": "--format 'chats': unknown; pass one of auto, messages, sharegpt, alpaca, prompt_completion, text",
    "truncation": "--truncation 'cut': must be one of truncate, drop",
    "field_map": "--field_map turns=dialog: unknown field 'turns'",
    "weight": "--data x.jsonl:-1: weight -1 must be a finite number above 0",
}


@pytest.fixture(scope="module")
def results(chat_model):
    root, model = chat_model["root"], chat_model["model"]
    good = _file(root, "good.jsonl", [chat(i) for i in range(8)])
    user2 = {"messages": [{"role": "user", "content": "Hi"}] * 2 + [{"role": "assistant", "content": "Hello"}]}
    empty = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    files = {
        "unknown_fields": _file(root, "u.jsonl", [{"question": "Hi", "reply": "Hello"}]),
        "roles": _file(root, "r.jsonl", [chat(1), user2]),
        "empty_assistant": _file(root, "e.jsonl", [empty]),
        "non_utf8": _file(root, "n.jsonl", [chat(1), b'{"messages": "caf\xe9"}']),
    }
    cases = {name: train_args(model, "--data", path) for name, path in files.items()}
    cases["no_template"] = train_args(chat_model["bare"], "--data", good)
    cases["no_tokenizer"] = train_args(chat_model["plain"], "--data", good)
    cases["eval_split"] = train_args(model, "--data", good, "--eval_split", "0.01")
    cases["format"] = train_args(model, "--data", good, "--format", "chats")
    cases["truncation"] = train_args(model, "--data", good, "--truncation", "cut")
    cases["field_map"] = train_args(model, "--data", good, "--field_map", "turns=dialog")
    cases["weight"] = train_args(model, "--data", "x.jsonl:-1")
    results = run_cases([{"script": LITE, "argv": a} for a in cases.values()], root)
    return dict(zip(cases, results, strict=True))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_chat_data_is_one_line_and_exit_2_before_the_model_loads(results, name):
    r = results[name]
    assert r["code"] == 2, r["stderr"][-2000:]
    last = r["stderr"].strip().splitlines()[-1]
    assert last.startswith("train_deepseek_v2_lite.py: error: "), last
    assert BAD[name] in last, last
    assert "Traceback" not in r["stderr"] and "loaded" not in r["stderr"]


def test_check_inputs_builds_the_sft_stream_and_eval_set(chat_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(20)])
    cfg = TrainConfig(model_path=str(chat_model["model"]), data=[str(data)], max_length=64, eval_split=0.25)
    check_args(cfg)
    state = layout()
    state.world_size, state.tp_size, state.ep_size = 1, 1, 1
    inputs = check_inputs(cfg, state)
    assert isinstance(inputs.data, DataStream) and inputs.data.packing
    assert inputs.eval is not None and inputs.eval.examples == 5
    batch = inputs.data.next()
    assert batch.packed and batch.num_targets > 0 and batch.input_ids.max() < 250
    with pytest.raises(ConfigError, match="--train_on_prompt and --last_turn_only together"):
        check_args(TrainConfig(train_on_prompt=True, last_turn_only=True))


def test_text_data_keeps_the_window_path_and_eval_data_alone_builds_an_eval_set(chat_model, tmp_path):
    from npu_parallel.training.data import PackedData
    from npu_parallel.training.dataset import build_eval_batches

    from .sft_data_helpers import tokenizer

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Hi there " * 20} for _ in range(8)])
    held = write_jsonl(tmp_path / "eval.jsonl", [chat(i) for i in range(3)])
    cfg = TrainConfig(model_path=str(chat_model["model"]), data=[str(text)], max_length=32, eval_data=str(held))
    state = layout()
    state.world_size, state.tp_size, state.ep_size = 1, 1, 1
    inputs = check_inputs(cfg, state)
    assert isinstance(inputs.data, PackedData) and inputs.eval is not None and inputs.eval.examples == 3
    alone = TrainConfig(eval_data=str(held), max_length=32)  # what an eval-only command hands the data code
    tok = tokenizer({"deepseek": chat_model["model"]}, "deepseek")
    parts = [build_eval_batches(alone, tok, layout(2, r)) for r in range(2)]
    assert sum(e.batches[0].num_targets for e in parts if e is not None) > 0
