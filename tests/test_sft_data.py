"""SFT data: formats, chat templates, assistant-only labels, packing, mixing and the errors of bad input (issue 21)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from npu_parallel.training.errors import ConfigError
from npu_parallel.training.formats import Conversation, RecordError
from npu_parallel.training.labels import Encoder
from npu_parallel.training.sources import load_examples
from npu_parallel.training.templates import builtin_templates, resolve_template

from .sft_data_helpers import encoder, show, tokenizer, write_jsonl
from .tokenizers_fixture import CHATML, WORDS


def test_the_chat_tokenizers_fit_the_tiny_models_and_keep_the_test_words_whole(chat_tokenizers):
    for kind, folder in chat_tokenizers.items():
        tok = AutoTokenizer.from_pretrained(folder)
        assert len(tok) <= 250 and tok.eos_token_id == 2 and tok.chat_template, kind
        for word in WORDS.split():
            assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, (kind, word)
            assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, (kind, word)
    assert AutoTokenizer.from_pretrained(chat_tokenizers["deepseek"])("Hi")["input_ids"][0] == 1  # encode adds BOS


# -- labels: each format's ids and labels against a hand-written expectation ---------------------------------

SYSTEM_TWO_TURNS = [
    {"role": "system", "content": "Be brief"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "What is 2+3"},
    {"role": "assistant", "content": "5"},
]
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# trained tokens in [brackets]: each answer and the EOS closing it; the header 'Assistant:' is not trained, and
# ' Hello' (the header's space merged into the answer's first word) is
DEEPSEEK_EXPECT = (
    f"{BOS}|Be| brief|\n\n|User|:| Hi|\n\n|Assistant|:|[ Hello]|[ there]|[{EOS}]|"
    f"User|:| What| is| |2|+|3|\n\n|Assistant|:|[ ]|[5]|[{EOS}]"
)
# chatml: answer and <|im_end|> trained; the newline after it and the next header not
CHATML_EXPECT = (
    "<|im_start|>|system|\n|Be| brief|<|im_end|>|\n|<|im_start|>|user|\n|Hi|<|im_end|>|\n|"
    "<|im_start|>|assistant|\n|[Hello]|[ there]|[<|im_end|>]|\n|<|im_start|>|user|\n|What| is| |2|+|3|<|im_end|>|\n|"
    "<|im_start|>|assistant|\n|[5]|[<|im_end|>]|\n"
)


def _expect_messages(chat_tokenizers, kind, expect, records, fmt, tmp_path, **options):
    tok = tokenizer(chat_tokenizers, kind)
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", records)
    found, examples, _ = load_examples(path)
    assert found.name == fmt  # detected from the first record
    enc = encoder(tok, **options)
    for example in examples:
        assert show(tok, enc.encode(example)) == expect


def test_messages_multi_turn_with_system_deepseek_and_chatml(chat_tokenizers, tmp_path):
    rec = [{"messages": SYSTEM_TWO_TURNS, "id": 7}]  # an extra field is ignored
    _expect_messages(chat_tokenizers, "deepseek", DEEPSEEK_EXPECT, rec, "messages", tmp_path)
    _expect_messages(chat_tokenizers, "chatml", CHATML_EXPECT, rec, "messages", tmp_path)


def test_sharegpt_gives_the_same_tokens_as_messages(chat_tokenizers, tmp_path):
    names = {"user": "human", "assistant": "gpt"}
    turns = [{"from": names[m["role"]], "value": m["content"]} for m in SYSTEM_TWO_TURNS[1:]]
    rec = [{"conversations": turns, "system": "Be brief"}]
    _expect_messages(chat_tokenizers, "deepseek", DEEPSEEK_EXPECT, rec, "sharegpt", tmp_path)
    rec = [{"conversations": [{"from": "system", "value": "Be brief"}, *turns]}]
    _expect_messages(chat_tokenizers, "chatml", CHATML_EXPECT, rec, "sharegpt", tmp_path)


def test_alpaca_with_system_history_and_input(chat_tokenizers, tmp_path):
    rec = [
        {
            "system": "Be brief",
            "history": [["Hi", "Hello there"]],
            "instruction": "What is",
            "input": "2+3",
            "output": "5",
        }
    ]
    expect = CHATML_EXPECT.replace("What| is| |2|+|3", "What| is|\n\n|2|+|3")  # instruction, blank line, input
    _expect_messages(chat_tokenizers, "chatml", expect, rec, "alpaca", tmp_path)


def test_prompt_completion_raw_and_conversational(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "deepseek")
    path = write_jsonl(
        tmp_path / "pc.jsonl",
        [
            {"prompt": "Q: Hi", "completion": " Hello"},
            {"prompt": SYSTEM_TWO_TURNS[:4], "completion": SYSTEM_TWO_TURNS[4:]},
        ],
    )
    fmt, examples, _ = load_examples(path)
    assert fmt.name == "prompt_completion"
    enc = encoder(tok)
    assert show(tok, enc.encode(examples[0])) == f"{BOS}|Q|:| Hi|[ Hello]|[{EOS}]"  # no template; EOS trained
    assert show(tok, enc.encode(examples[1])) == DEEPSEEK_EXPECT


def test_text_trains_every_token_and_the_eos_with_one_bos(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "deepseek")
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Hi there"}])
    fmt, examples, _ = load_examples(path)
    assert fmt.name == "text"
    assert show(tok, encoder(tok).encode(examples[0])) == f"{BOS}|[Hi]|[ there]|[{EOS}]"


def test_last_turn_only_and_train_on_prompt(chat_tokenizers):
    tok = tokenizer(chat_tokenizers, "chatml")
    last = encoder(tok, last_turn_only=True).encode(Conversation(SYSTEM_TWO_TURNS))
    assert show(tok, last) == CHATML_EXPECT.replace("[Hello]|[ there]|[<|im_end|>]", "Hello| there|<|im_end|>")
    everything = encoder(tok, train_on_prompt=True).encode(Conversation(SYSTEM_TWO_TURNS))
    assert everything.labels[0] == -100 and everything.labels[1:] == everything.ids[1:]


def test_no_double_bos_when_the_tokenizer_adds_one_and_the_template_renders_one(chat_tokenizers):
    tok = tokenizer(chat_tokenizers, "deepseek")
    enc = encoder(tok).encode(Conversation(SYSTEM_TWO_TURNS))
    assert enc.ids[0] == tok.bos_token_id and enc.ids.count(tok.bos_token_id) == 1
    no_bos = encoder(tok, "mixtral").encode(Conversation(SYSTEM_TWO_TURNS))
    assert no_bos.ids.count(tok.bos_token_id) == 1


def test_qwen3_reasoning_is_trained_inside_think_tags(chat_tokenizers):
    tok = tokenizer(chat_tokenizers, "chatml")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "ok"}]
    got = show(tok, encoder(tok, "qwen3").encode(Conversation(msgs)))
    assert got == (
        "<|im_start|>|user|\n|Hi|<|im_end|>|\n|<|im_start|>|assistant|\n|"
        "[<think>]|[\n]|[ok]|[\n]|[</think>]|[\n\n]|[Hello]|[<|im_end|>]|\n"
    )


def test_every_builtin_template_trains_each_answer_and_its_end_of_turn(chat_tokenizers):
    assert set(builtin_templates()) >= {"deepseek_v2", "deepseek_v3", "deepseek_moe", "chatml", "qwen3", "mixtral"}
    for name in builtin_templates():
        kind = "chatml" if name in ("chatml", "qwen", "qwen3") else "deepseek"
        tok = tokenizer(chat_tokenizers, kind)
        template = resolve_template(name, tok)
        enc = Encoder(tok, template).encode(Conversation(SYSTEM_TWO_TURNS))
        trained = [t for t, lab in zip(enc.ids, enc.labels, strict=True) if lab != -100]
        text = tok.decode(trained)
        assert "Hello there" in text and "5" in text and "Hi" not in text and "Be brief" not in text, name
        assert trained.count(template.end_of_turn_ids[0]) == 2 and trained[-1] == template.end_of_turn_ids[0], name
        assert enc.ids.count(tok.bos_token_id) <= 1, name


def test_template_from_a_jinja_file_and_the_template_errors(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "chatml")
    path = tmp_path / "mine.jinja"
    path.write_text(CHATML, encoding="utf-8")
    assert show(tok, encoder(tok, str(path)).encode(Conversation(SYSTEM_TWO_TURNS))) == CHATML_EXPECT
    with pytest.raises(ConfigError, match=r"not a built-in .* and not a \.jinja file"):
        resolve_template("nope", tok)
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"no chat template: .*pass --template NAME"):
        resolve_template(None, tok)
    with pytest.raises(ConfigError, match=r"no .<\|im_end\|>. token"):
        resolve_template("chatml", tokenizer(chat_tokenizers, "deepseek"))


def test_a_template_that_renders_history_differently_cannot_mark_spans(chat_tokenizers):
    tok = tokenizer(chat_tokenizers, "chatml")
    # drops earlier answers from the history (as Qwen3's drops earlier reasoning): spans cannot be found
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(RecordError, match=r"renders assistant turn .* differently"):
        encoder(tok).encode(Conversation(SYSTEM_TWO_TURNS))
