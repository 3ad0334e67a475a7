"""Chat fine-tuning end to end (issue 21): packed chat data trains through the real command-line path and its
losses do not depend on the layout (dp1/ga2 against dp2/ga1, packed rows with padding); ``npu-parallel eval`` on
chat data at tp 1 and 2, packed or one example per row, equals each example run alone on the unconverted model."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from npu_parallel.tools.cli import main
from npu_parallel.training.batch import IGNORE_INDEX
from npu_parallel.training.dataset import prepare

from .dist import run_ranks
from .sft_data_helpers import cfg, chat, write_jsonl
from .test_eval import _check, _launched
from .tokenizers_fixture import add_tokenizer

LENGTH = 48


@pytest.fixture(scope="module")
def setup(checkpoints, chat_tokenizers, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_sft")
    model = root / "model"
    shutil.copytree(checkpoints / "deepseek_v2", model)
    add_tokenizer(model, "deepseek", chat_tokenizers["deepseek"])
    train = write_jsonl(root / "train.jsonl", [chat(i) for i in range(16)])
    evals = write_jsonl(root / "eval.jsonl", [chat(100 + 7 * i) for i in range(5)])
    return {"root": root, "model": str(model), "train": str(train), "eval": str(evals)}


def per_example_reference(model_dir: str, data: str) -> dict:
    """Each eval example's ids and labels (the training code's template and assistant mask, proven against
    hand-written expectations in test_sft_data), run alone through the unconverted model."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    p = prepare(cfg(model_path=model_dir, eval_data=data, max_length=LENGTH), tok, with_train=False)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in p.eval:
            ids, labels = torch.tensor([p.docs[i].ids]), torch.tensor(p.docs[i].labels[1:])
            logits = ref(input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
    return {"loss": total / tokens, "tokens": tokens, "examples": len(p.eval)}


def _eval(*argv: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["eval", *argv])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


def test_eval_on_chat_data_equals_each_example_alone(setup):
    s = setup
    ref = per_example_reference(s["model"], s["eval"])
    args = [s["model"], "--data", s["eval"], "--max_length", str(LENGTH)]
    _check(_eval(*args, "--batch_size", "2"), ref)  # packed (the default for chat data)
    _check(_eval(*args, "--no-packing", "--batch_size", "3"), ref)  # one example per row, padded
    _check(_launched(*args, "--tp", "2"), ref)


def _run(s: dict, name: str, **over) -> dict:
    run = s["root"] / name
    return dict(
        model_path=s["model"],
        data=s["train"],
        eval_data=s["eval"],
        eval_every=1,
        tp_size=1,
        batch_size=2,
        max_length=LENGTH,
        steps=2,
        lr=1e-3,
        warmup_steps=0,
        jit_warmup_steps=0,
        aux_loss_coef=0.01,
        save_dir=str(run / "ckpt"),
        log_dir=str(run / "log"),
        **over,
    )


def test_packed_chat_training_does_not_depend_on_the_layout(setup):
    s = setup
    one = run_ranks(1, "tests.train_worker:run_train", _run(s, "dp1", grad_accum=2))
    two = run_ranks(2, "tests.train_worker:run_train", _run(s, "dp2", grad_accum=1))
    for a, b in zip(one["records"], two["records"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
        assert math.isfinite(a["loss"]) and not a["skipped"]
    assert one["records"][0]["eval_loss"] != one["records"][1]["eval_loss"]  # it trained
    # the run's step-2 checkpoint, evaluated on its own, gives the run's last eval loss
    got = _eval(str(s["root"] / "dp2" / "ckpt" / "step-2"), "--data", s["eval"], "--max_length", str(LENGTH))
    assert got["loss"] == pytest.approx(two["records"][-1]["eval_loss"], rel=1e-5)
