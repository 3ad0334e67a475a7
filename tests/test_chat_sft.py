"""Chat fine-tuning end to end (issue 21): packed chat data trains through the real command-line path and its
losses do not depend on the layout (dp1/ga2 against dp2/ga1, packed rows with padding); ``npu-parallel eval`` on
chat data at tp 1 and 2, packed or one example per row, equals each example run alone on the unconverted model."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from npu_parallel.training.dataset import prepare

from .cli_runs import json_line, launched_json
from .dist import run_ranks
from .eval_worker import check_eval, eval_run, summed_reference
from .sft_data_helpers import cfg, chat, write_jsonl
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
    examples = ((torch.tensor([p.docs[i].ids]), torch.tensor(p.docs[i].labels[1:])) for i in p.eval)
    return summed_reference(ref, examples)


def _eval(*argv: str) -> dict:
    return json_line("eval", *argv)


def test_eval_on_chat_data_equals_each_example_alone(setup):
    s = setup
    ref = per_example_reference(s["model"], s["eval"])
    args = [s["model"], "--data", s["eval"], "--max_length", str(LENGTH)]
    check_eval(_eval(*args, "--batch_size", "2"), ref)  # packed (the default for chat data)
    check_eval(_eval(*args, "--no-packing", "--batch_size", "3"), ref)  # one example per row, padded
    check_eval(launched_json("eval", *args, "--tp", "2"), ref)


def _run(s: dict, name: str, **over) -> dict:
    more = dict(data=s["train"], batch_size=2, steps=2, aux_loss_coef=0.01, **over)
    return eval_run(s["model"], s["eval"], s["root"] / name, LENGTH, **more)


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
