"""Evaluation (issue 21 pt 7): ``npu-parallel eval`` at tp 1 and 2 (HF folder, base + --lora_adapter, a step-N
checkpoint) equals a per-example reference on the unconverted model; a run's --eval_every puts the eval loss in
metrics.jsonl, on the console and in loss.png; bad input exits 2 with one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from .cli_runs import in_process, json_line, launched_json, metrics
from .dist import run_ranks
from .eval_worker import TOL, check_eval, eval_run, make_adapter, per_example_reference

LENGTH = 24


@pytest.fixture(scope="module")
def setup(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "eval.txt"
    text = [f"paragraph {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3) for i in range(7)]
    data.write_text("\n\n".join(text))
    model = str(checkpoints / "deepseek_v2")
    adapter = make_adapter(model, str(root / "adapter"))
    return {"root": root, "data": str(data), "model": model, "adapter": adapter}


def _cli(*argv: str) -> tuple[int, str, str]:
    return in_process("eval", *argv)


@pytest.mark.parametrize("lora", [False, True], ids=["hf", "lora"])
def test_eval_at_tp_1_and_2_equals_the_per_example_reference(setup, lora):
    s = setup
    ref = per_example_reference(s["model"], s["data"], LENGTH, s["adapter"] if lora else None)
    extra = ["--lora_adapter", s["adapter"]] if lora else []
    args = [s["model"], "--data", s["data"], "--max_length", str(LENGTH), *extra]
    check_eval(json_line("eval", *args, "--tp", "1", "--batch_size", "3"), ref)  # batches of 3: the same loss
    check_eval(launched_json("eval", *args, "--tp", "2"), ref)


def test_training_evaluates_every_n_steps_and_the_checkpoint_agrees(setup):
    s = setup
    run = s["root"] / "run"
    # dp 2: each rank evaluates half the eval set
    result = run_ranks(2, "tests.train_worker:run_train", eval_run(s["model"], s["data"], run, LENGTH, eval_every=2))
    records = metrics(run / "log")
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [2, 3]  # every 2 steps and at the end
    ref = per_example_reference(s["model"], s["data"], LENGTH)
    assert evals[2]["eval_tokens"] == ref["tokens"] and evals[2]["eval_examples"] == ref["examples"]
    assert evals[2]["eval_loss"] != evals[3]["eval_loss"]
    assert evals[3]["eval_perplexity"] == pytest.approx(math.exp(evals[3]["eval_loss"]), **TOL)
    assert result["plot"] and Path(result["plot"]).is_file()
    # the step-3 checkpoint, evaluated on its own at tp 1: the run's last eval loss
    got = json_line("eval", str(run / "ckpt" / "step-3"), "--data", s["data"], "--max_length", str(LENGTH))
    assert got["loss"] == pytest.approx(evals[3]["eval_loss"], **TOL)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{model}", "--data", "{root}/nope.txt"], "--data {root}/nope.txt: no such file"),
        (["{root}/nope", "--data", "{data}"], "MODEL {root}/nope: no such folder"),
        (["{model}", "--data", "{data}", "--tp", "3"], "tp"),
        (["{model}", "--data", "{data}", "--max_length", "1"], "--max_length 1: must be at least 2"),
        (["{model}", "--data", "{data}", "--lora_adapter", "{root}"], "no adapter_config.json"),
        (["{model}", "--data", "{data}", "--max_length", "100000"], "--max_length 100000: above the model's"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(setup, argv, message):
    fill = {k: setup[k] for k in ("model", "root", "data")}
    code, _, err = _cli(*[a.format(**fill) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("npu-parallel eval: error: ") and message.format(**fill) in lines[0], lines[0]
