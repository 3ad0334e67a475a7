"""SFT data served to training: best-fit packing, padding, the global batch fixed whatever dp and grad_accum are,
weighted mixtures, the eval set (every example once over the dp ranks), the file types and the bad-input errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from npu_parallel.training.dataset import build_datasets, build_eval_batches, build_train_stream, prepare
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.labels import Encoded
from npu_parallel.training.packing import best_fit, make_batch
from npu_parallel.training.sources import load_examples, parse_sources

from .sft_data_helpers import cfg, chat, layout, tokenizer, write_jsonl


def _data(tmp_path, n=24, name="chat.jsonl"):
    return write_jsonl(tmp_path / name, [chat(i) for i in range(n)])


def _docs(batch) -> list[tuple[int, ...]]:
    """Each document of a micro-batch as its token ids (what identifies an example)."""
    out = []
    for r, lengths in enumerate(batch.lengths):
        at = 0
        for n in lengths:
            out.append(tuple(batch.input_ids[r, at : at + n].tolist()))
            at += n
    return out


def test_best_fit_packs_longest_first_into_the_tightest_row():
    assert best_fit([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]  # 6+2, 5+3, 4
    with pytest.raises(ValueError, match="does not fit"):
        best_fit([9], 8)


def test_a_packed_row_restarts_positions_and_never_predicts_across_documents():
    a, b = Encoded([1, 5, 6], [-100, 5, 6]), Encoded([1, 7], [-100, 7])
    batch = make_batch([[a, b], [b]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 1, 7], [1, 7, 0, 0, 0]]
    assert batch.labels.tolist() == [[-100, 5, 6, -100, 7], [-100, 7, -100, -100, -100]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, -1, -1, -1]]
    assert batch.lengths == ((3, 2), (2,)) and batch.num_targets == 4


def test_packing_holds_every_example_once_per_epoch_in_rows_of_max_length(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "chatml")
    c = cfg(data=[str(_data(tmp_path))], max_length=64, batch_size=2)
    p = prepare(c, tok)
    stream = build_train_stream(c, tok, layout(), p)
    rows = stream._epoch(0)
    assert sorted(i for row in rows for i in row) == list(range(24))
    assert all(stream._tokens(r) <= 64 for r in rows) and len(rows) < 24
    batch = stream.next()
    assert batch.input_ids.shape[1] <= 64 and batch.packed
    for r, lengths in enumerate(batch.lengths):  # positions restart at each document
        want = torch.cat([torch.arange(n) for n in lengths])
        assert batch.position_ids[r, : len(want)].tolist() == want.tolist()
    assert 0 <= stream.padding_fraction < 0.25


def test_no_packing_pads_each_micro_batch_to_its_longest_example(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "chatml")
    c = cfg(data=[str(_data(tmp_path))], packing=False, batch_size=4)
    stream = build_train_stream(c, tok, layout())
    batch = stream.next()
    assert all(len(x) == 1 for x in batch.lengths)
    assert batch.input_ids.shape[1] == max(x[0] for x in batch.lengths)
    assert stream.padding_fraction > 0


@pytest.mark.parametrize("packing", [True, False])
def test_fixed_width_pads_every_micro_batch_to_max_length(chat_tokenizers, tmp_path, packing):
    """Pipeline stages send one shape: every micro-batch [B, max_length], the same documents as without it."""
    from npu_parallel.training.dataset import DataStream

    tok = tokenizer(chat_tokenizers, "chatml")
    c = cfg(data=[str(_data(tmp_path))], packing=packing, batch_size=2)
    p = prepare(c, tok)
    kw = dict(packing=packing, max_length=64, batch_size=2, grad_accum=2, dp_size=1, dp_rank=0)
    fixed, free = DataStream(p, fixed_width=True, **kw), DataStream(p, **kw)
    for _ in range(3):
        a, b = fixed.next(), free.next()
        assert a.input_ids.shape == (2, 64) and a.lengths == b.lengths and a.num_targets == b.num_targets
    assert fixed.padding_fraction >= free.padding_fraction


@pytest.mark.parametrize("packing", [True, False])
def test_the_global_batch_of_a_step_is_the_same_whatever_dp_and_grad_accum(chat_tokenizers, tmp_path, packing):
    tok = tokenizer(chat_tokenizers, "deepseek")
    data = [str(_data(tmp_path))]
    steps = {}
    for dp, ga in ((1, 4), (2, 2), (4, 1)):
        c = cfg(data=data, packing=packing, batch_size=1, grad_accum=ga, seed=3)
        p = prepare(c, tok)
        streams = [build_train_stream(c, tok, layout(dp, r), p) for r in range(dp)]
        steps[dp, ga] = [
            Counter(d for s in streams for b in s.next_step() for d in _docs(b))
            for _ in range(5)  # > an epoch
        ]
    assert steps[1, 4] == steps[2, 2] == steps[4, 1]
    assert steps[1, 4][0] != steps[1, 4][1]


def test_the_order_is_seeded_and_resumes_from_a_position(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "chatml")
    data = [str(_data(tmp_path))]
    a = build_train_stream(cfg(data=data, seed=1, grad_accum=2), tok, layout())
    b = build_train_stream(cfg(data=data, seed=1, grad_accum=2), tok, layout())
    other = build_train_stream(cfg(data=data, seed=2, grad_accum=2), tok, layout())
    first = [_docs(x) for x in a.next_step() + a.next_step()]
    assert first == [_docs(x) for x in b.next_step() + b.next_step()]
    assert first != [_docs(x) for x in other.next_step() + other.next_step()]
    b.position = 2  # resumed after one step
    assert [_docs(x) for x in b.next_step()] == first[2:]


def test_weighted_mixture_repeats_and_subsamples_sources(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "chatml")
    a, b = _data(tmp_path, 6, "a.jsonl"), _data(tmp_path, 10, "b.jsonl")
    c = cfg(data=[f"{a}:2", f"{b}:0.5"], packing=False)
    p = prepare(c, tok)
    stream = build_train_stream(c, tok, layout(), p)
    sources = Counter(p.source[row[0]] for row in stream._epoch(0))
    assert sources == {0: 12, 1: 5} and p.weights == [2.0, 0.5]
    again = build_train_stream(c, tok, layout(), prepare(c, tok))
    assert stream._epoch(0) == again._epoch(0)  # deterministic
    assert parse_sources(["x.jsonl", "my:dir/y.jsonl:3"])[1].path == "my:dir/y.jsonl"


def test_the_file_types_give_the_same_examples(chat_tokenizers, tmp_path):
    import datasets

    records = [chat(i) for i in range(5)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    want = load_examples(jsonl)[1]
    for path in (tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "saved"):
        fmt, examples, _ = load_examples(path)
        assert fmt.name == "messages" and examples == want, path
    assert load_examples(tmp_path / "d.parquet")[2][1].endswith("d.parquet: row 2")


def test_field_map_renames_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [{"dialog": [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Hello"}]}],
    )
    from npu_parallel.training.sources import parse_field_map

    fmt, examples, _ = load_examples(path, "auto", parse_field_map("messages=dialog,role=speaker,content=text"))
    assert fmt.name == "messages" and examples[0].messages[1] == {"role": "assistant", "content": "Hello"}


def test_truncation_policies_and_their_counts(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "chatml")
    long = {"messages": [{"role": "user", "content": "Hi " * 40}, {"role": "assistant", "content": "Hello"}]}
    cut = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello " * 40}]}
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [short, long, cut])
    p = prepare(cfg(data=[str(path)], max_length=32), tok)
    assert (p.stats.examples, p.stats.truncated, p.stats.unsupervised, len(p.docs)) == (3, 2, 1, 2)
    assert max(len(d.ids) for d in p.docs) == 32
    p = prepare(cfg(data=[str(path)], max_length=32, truncation="drop"), tok)
    assert (p.stats.dropped, p.stats.truncated, len(p.docs)) == (2, 0, 1)


@pytest.mark.parametrize("packing", [True, False])
def test_eval_split_holds_out_every_example_once_over_the_dp_ranks(chat_tokenizers, tmp_path, packing):
    tok = tokenizer(chat_tokenizers, "chatml")
    c = cfg(data=[str(_data(tmp_path, 30))], eval_split=0.3, packing=packing, batch_size=2, seed=5)
    p = prepare(c, tok)
    assert len(p.eval) == 9 and not set(p.eval) & set(p.train) and p.eval == prepare(c, tok).eval
    everything = [tuple(d.ids) for d in p.docs]
    for dp in (1, 2, 4):
        parts = [build_eval_batches(c, tok, layout(dp, r), p) for r in range(dp)]
        assert len({len(e.batches) for e in parts}) == 1  # every rank runs as many forwards
        seen = Counter(d for e in parts for b in e.batches if b.num_targets for d in _docs(b))
        assert seen == Counter(everything[i] for i in p.eval)
        assert sum(b.num_targets for e in parts for b in e.batches) == parts[0].targets
    train = Counter(d for _ in range(4) for b in build_train_stream(c, tok, layout(), p).next_step() for d in _docs(b))
    assert not set(train) & {everything[i] for i in p.eval}


def test_eval_data_file_and_an_empty_split_is_an_error(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "chatml")
    data, held = _data(tmp_path, 8), _data(tmp_path, 3, "eval.jsonl")
    stream, evals = build_datasets(cfg(data=[str(data)], eval_data=str(held)), tok, layout())
    assert evals is not None and evals.examples == 3 and len(stream.p.train) == 8
    with pytest.raises(ConfigError, match=r"--eval_split 0.01: holds out 0 of 8 examples, leaving no eval data"):
        prepare(cfg(data=[str(data)], eval_split=0.01), tok)


# -- bad input: one line naming the file, the line and the fields --------------------------------------------


def _error(tmp_path, chat_tokenizers, lines: list[bytes | str], **options) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    with pytest.raises(ConfigError) as info:
        prepare(cfg(data=[str(path)], **options), tokenizer(chat_tokenizers, "chatml"))
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(path), "F")


def test_bad_records_are_one_line_errors_naming_file_line_and_fields(chat_tokenizers, tmp_path):
    good = json.dumps(chat(1))
    err = _error(tmp_path, chat_tokenizers, [json.dumps({"question": "Hi", "reply": "Hello"})])
    assert err.startswith("--data F:1: no known format has these fields (fields: 'question', 'reply')")
    assert "--field_map" in err
    turns = [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}]
    err = _error(tmp_path, chat_tokenizers, [good, json.dumps({"messages": turns})])
    assert err.startswith("--data F:2: messages record roles out of order (assistant user)") and "'messages'" in err
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]
    err = _error(tmp_path, chat_tokenizers, [json.dumps({"messages": empty})])
    assert err.startswith("--data F:1: messages record assistant turn 1 is empty")
    err = _error(tmp_path, chat_tokenizers, [good, b'{"messages": "caf\xe9"}'])
    assert err.startswith("--data F: not UTF-8 at byte") and "(line 2" in err
    tool = [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]
    assert "role 'tool'" in _error(tmp_path, chat_tokenizers, [json.dumps({"messages": tool})])
    err = _error(tmp_path, chat_tokenizers, [json.dumps({"text": "Hi"})], format="alpaca")
    assert err.startswith("--data F:1: alpaca record has no 'instruction' field (fields: 'text')")


def test_chat_data_without_a_template_is_an_error(chat_tokenizers, tmp_path):
    tok = tokenizer(chat_tokenizers, "chatml")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        prepare(cfg(data=[str(_data(tmp_path, 2))]), tok)
    assert len(prepare(cfg(data=[str(_data(tmp_path, 2))], template="chatml"), tok).docs) == 2


@pytest.mark.parametrize("packing", [True, False])
def test_every_micro_batch_keeps_the_batch_conventions(chat_tokenizers, tmp_path, packing):
    """What batch_loss and the attention rely on (training/batch.py), over more than an epoch of micro-batches."""
    tok = tokenizer(chat_tokenizers, "deepseek")
    stream = build_train_stream(cfg(data=[str(_data(tmp_path))], packing=packing, batch_size=3), tok, layout())
    for _ in range(12):
        b = stream.next()
        for r, lengths in enumerate(b.lengths):
            at = 0
            for d, n in enumerate(lengths):
                assert b.labels[r, at] == -100  # never predicted from the document before
                assert b.position_ids[r, at : at + n].tolist() == list(range(n))
                assert set(b.document_ids[r, at : at + n].tolist()) == {d}
                trained = b.labels[r, at : at + n] != -100
                assert torch.equal(b.labels[r, at : at + n][trained], b.input_ids[r, at : at + n][trained])
                at += n
            assert (b.document_ids[r, at:] == -1).all() and (b.labels[r, at:] == -100).all()
        assert b.num_targets == int((b.labels[:, 1:] != -100).sum()) > 0
