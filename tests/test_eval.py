"""Evaluation (issue 21 pt 7): ``npu-parallel eval`` at tp 1 and 2 (HF folder, base + --lora_adapter, a step-N
checkpoint) equals a per-example reference on the unconverted model; a run's --eval_every puts the eval loss in
metrics.jsonl, on the console and in loss.png; bad input exits 2 with one line."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npu_parallel.tools.cli import main

from .dist import RANK_ENV, run_ranks
from .eval_worker import make_adapter, per_example_reference

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 24
TOL = dict(rel=1e-5)


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
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["eval", *argv])
    return code, out.getvalue(), err.getvalue()


def _launched(*argv: str) -> dict:
    env = {**os.environ, **RANK_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "npu_parallel.tools.cli", "eval", *argv], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def _check(got: dict, ref: dict) -> None:
    assert set(got) == {"loss", "perplexity", "tokens", "examples"}
    assert got["tokens"] == ref["tokens"] and got["examples"] == ref["examples"]
    assert got["loss"] == pytest.approx(ref["loss"], **TOL)
    assert got["perplexity"] == pytest.approx(math.exp(ref["loss"]), **TOL)


@pytest.mark.parametrize("lora", [False, True], ids=["hf", "lora"])
def test_eval_at_tp_1_and_2_equals_the_per_example_reference(setup, lora):
    s = setup
    ref = per_example_reference(s["model"], s["data"], LENGTH, s["adapter"] if lora else None)
    extra = ["--lora_adapter", s["adapter"]] if lora else []
    args = [s["model"], "--data", s["data"], "--max_length", str(LENGTH), *extra]
    code, out, err = _cli(*args, "--tp", "1", "--batch_size", "3")  # batches of 3 rows: the loss stays the same
    assert code == 0, err
    _check(json.loads(out), ref)
    _check(_launched(*args, "--tp", "2"), ref)


def test_training_evaluates_every_n_steps_and_the_checkpoint_agrees(setup):
    s = setup
    run = s["root"] / "run"
    result = run_ranks(
        2,
        "tests.train_worker:run_train",
        dict(
            model_path=s["model"],
            tp_size=1,  # dp 2: each rank evaluates half the eval set
            batch_size=1,
            max_length=LENGTH,
            steps=3,
            lr=1e-3,
            warmup_steps=0,
            jit_warmup_steps=0,
            eval_every=2,
            eval_data=s["data"],
            save_dir=str(run / "ckpt"),
            log_dir=str(run / "log"),
        ),
    )
    records = [json.loads(x) for x in (run / "log" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [2, 3]  # every 2 steps and at the end
    ref = per_example_reference(s["model"], s["data"], LENGTH)
    assert evals[2]["eval_tokens"] == ref["tokens"] and evals[2]["eval_examples"] == ref["examples"]
    assert evals[2]["eval_loss"] != evals[3]["eval_loss"]
    assert evals[3]["eval_perplexity"] == pytest.approx(math.exp(evals[3]["eval_loss"]), **TOL)
    assert result["plot"] and Path(result["plot"]).is_file()
    # the step-3 checkpoint, evaluated on its own at tp 1: the run's last eval loss
    code, out, err = _cli(str(run / "ckpt" / "step-3"), "--data", s["data"], "--max_length", str(LENGTH))
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(evals[3]["eval_loss"], **TOL)


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
