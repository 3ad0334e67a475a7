"""The training command line with what users hand it: bad values and inputs (exit 2, one line, before the model
loads), reruns into used --save_dir/--log_dir, --text_field, non-UTF-8 data, non-finite steps (skipped, exit 3,
no non-finite checkpoint, strict-JSON metrics), and the cross-rank guards (tp batch check, finiteness flag)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from npu_parallel.tools.launch import launch

from .cli_runs import LITE, ROOT, TP_MOE, child_env, metrics, run_named, train_args
from .dist import RANK_ENV

PROG = "train_deepseek_v2_lite.py: error: "


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    words = "the quick brown fox jumps over the lazy dog " * 3
    (root / "content.jsonl").write_text("".join(json.dumps({"content": f"{i} {words}"}) + "\n" for i in range(20)))
    first = json.dumps({"text": "short"}).encode() + b"\n"
    (root / "latin1.jsonl").write_bytes(first + b'{"text": "caf\xe9"}\n')
    return {"root": root, "content": root / "content.jsonl", "latin1": root / "latin1.jsonl", "offset": len(first) + 13}


@pytest.fixture(scope="module")
def cli(checkpoints, files, tmp_path_factory):
    """Every in-process case below through the examples' main() in one interpreter: name -> result."""
    model = checkpoints / "deepseek_v2"  # max_position_embeddings 128
    root = tmp_path_factory.mktemp("cli_runs")
    save, log, foreign = root / "ckpt", root / "log", root / "foreign"
    (foreign / "step-7").mkdir(parents=True)
    (foreign / "step-7" / "notes.txt").write_text("not a checkpoint")
    inf_model = root / "inf_model"
    shutil.copytree(model, inf_model)
    weights = load_file(inf_model / "model.safetensors")
    weights["model.norm.weight"][0] = float("inf")
    save_file(weights, inf_model / "model.safetensors", metadata={"format": "pt"})
    cases = {
        # values, each against its rule
        "steps": (LITE, train_args(model, "--steps", "0")),
        "batch_size": (LITE, train_args(model, "--batch_size", "0")),
        "max_length": (LITE, train_args(model, "--max_length", "0")),
        "grad_accum": (LITE, train_args(model, "--grad_accum", "0")),
        "lr": (LITE, train_args(model, "--lr", "-1")),
        "warmup_steps": (LITE, train_args(model, "--warmup_steps", "3")),
        "stop_after": (LITE, train_args(model, "--stop_after", "3")),
        "save_every": (LITE, train_args(model, "--save_every", "-1")),
        "max_nonfinite_steps": (LITE, train_args(model, "--max_nonfinite_steps", "0")),
        "router_noise": (LITE, train_args(model, "--router_noise", "gauss")),
        "router_noise_eps": (LITE, train_args(model, "--router_noise", "jitter", "--router_noise_eps", "1.5")),
        "router_z_loss": (LITE, train_args(model, "--router_z_loss", "-1")),
        "capacity_impl": (LITE, train_args(model, "--capacity_factor", "1.25")),
        "min_capacity": (LITE, train_args(model, "--moe_impl", "static", "--min_capacity", "4")),
        "resume_and_overwrite": (LITE, train_args(model, "--resume", str(save), "--overwrite")),
        # what the values name
        "max_position": (LITE, train_args(model, "--max_length", "129")),
        "model_path": (LITE, train_args(model, "--model_path", str(root / "nope"))),
        "data": (LITE, train_args(model, "--data", str(root / "nope.jsonl"))),
        "resume": (LITE, train_args(model, "--resume", str(root / "nope"))),
        "tp_size": (LITE, train_args(model, "--tp_size", "2")),
        "text_field_missing": (LITE, train_args(model, "--data", str(files["content"]))),
        "tp_moe_model_path": (TP_MOE, ["--steps", "2"]),
        # honoured
        "text_field": (LITE, train_args(model, "--data", str(files["content"]), "--text_field", "content")),
        # a rerun into used folders
        "first": (LITE, train_args(model, "--save_dir", str(save), "--save_every", "1", "--log_dir", str(log))),
        "rerun": (LITE, train_args(model, "--save_dir", str(save), "--log_dir", str(log))),
        "rerun_log_dir": (LITE, train_args(model, "--log_dir", str(log))),
        "overwrite_foreign": (LITE, train_args(model, "--save_dir", str(foreign), "--overwrite")),
        "overwrite": (
            LITE,
            train_args(model, "--steps", "3", "--save_dir", str(save), "--log_dir", str(log), "--overwrite"),
        ),
        "lr_too_high": (LITE, train_args(model, "--lr", "1e40")),
        # a model holding an Inf weight: refused once loaded, before the first step
        "inf_weights": (
            LITE,
            train_args(model, "--model_path", str(inf_model), "--save_every", "1", "--save_dir", str(root / "inf")),
        ),
    }
    results = run_named(cases, root)
    return {"results": results, "save": save, "log": log, "foreign": foreign, "root": root}


BAD = {
    "steps": "--steps 0: must be at least 1",
    "batch_size": "--batch_size 0: must be at least 1",
    "max_length": "--max_length 0: must be at least 2",
    "grad_accum": "--grad_accum 0: must be at least 1",
    "lr": "--lr -1.0: must be above 0 and at most 1e+30",
    "lr_too_high": "--lr 1e+40: must be above 0 and at most 1e+30 (AdamW steps in float32)",
    "warmup_steps": "--warmup_steps 3: must be within [0, --steps 2]",
    "stop_after": "--stop_after 3: must be within [1, --steps 2]",
    "save_every": "--save_every -1: must be 0 or more",
    "max_nonfinite_steps": "--max_nonfinite_steps 0: must be at least 1",
    "router_noise": "--router_noise 'gauss': unknown; pass one of mixtral, jitter, rsample",
    "router_noise_eps": "--router_noise_eps 1.5: must lie in (0, 1)",
    "router_z_loss": "--router_z_loss -1.0: must be a finite number >= 0",
    "capacity_impl": "--capacity_factor with --moe_impl auto: only static and alltoall_static have a capacity",
    "min_capacity": "--min_capacity 4: a floor under the capacity, which is dropless without a factor",
    "resume_and_overwrite": "--resume and --overwrite together",
    "max_position": "--max_length 129: above the model's max_position_embeddings 128; pass at most 128",
    "model_path": "--model_path ",
    "data": "nope.jsonl: no such file",
    "resume": "nope: no manifest.json",
    "tp_size": "tp_size=2 must be a positive divisor of the world size 1",
    "text_field_missing": "content.jsonl:1: no 'text' field (it has 'content'); pass --text_field",
    "tp_moe_model_path": "--model_path is required",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_value_or_input_is_one_line_and_exit_2_before_the_model_loads(cli, name):
    r = cli["results"][name]
    assert r["code"] == 2
    last = r["stderr"].strip().splitlines()[-1]
    assert last.startswith(("train_deepseek_v2_lite.py: error: ", "train_tp_moe.py: error: ")), last
    assert BAD[name] in last
    assert "Traceback" not in r["stderr"]
    assert "loaded" not in r["stderr"] and "converted" not in r["stderr"]  # the model was never loaded


def test_text_field_is_honoured(cli):
    r = cli["results"]["text_field"]
    assert r["code"] == 0, r["stderr"][-2000:]
    assert "content.jsonl" in r["stderr"] and "== done: loss" in r["stdout"]


def test_one_distributed_state_per_run(cli):
    """The command line builds the run's ParallelState once and train() uses it (issue 26): one line per rank."""
    r = cli["results"]["text_field"]
    assert r["stderr"].count("initialised rank 0/1") == 1, r["stderr"][-2000:]


def test_rerun_into_used_save_and_log_dirs(cli):
    results, save, log = cli["results"], cli["save"], cli["log"]
    assert results["first"]["code"] == 0
    rerun = results["rerun"]["stderr"].strip().splitlines()[-1]
    assert results["rerun"]["code"] == 2
    assert rerun == (
        f"{PROG}--save_dir {save}: holds checkpoints of an earlier run (step-1, step-2); pass --resume "
        f"{save / 'step-2'} to continue it, --overwrite to replace them, or choose another --save_dir"
    )
    assert results["rerun_log_dir"]["code"] == 2
    assert results["rerun_log_dir"]["stderr"].strip().splitlines()[-1] == (
        f"{PROG}--log_dir {log}: metrics.jsonl holds an earlier run (steps 1-2); pass --resume to continue it, "
        f"--overwrite to replace it, or choose another --log_dir"
    )
    foreign = results["overwrite_foreign"]
    assert foreign["code"] == 2 and "step-7 is not an npu-parallel checkpoint" in foreign["stderr"].splitlines()[-1]
    assert (cli["foreign"] / "step-7" / "notes.txt").is_file()  # never removed
    # --overwrite: the earlier run's step-1/step-2 are gone, the folder holds only the new run
    assert results["overwrite"]["code"] == 0, results["overwrite"]["stderr"][-2000:]
    assert sorted(p.name for p in save.iterdir()) == ["step-3"]
    assert [r["step"] for r in metrics(log)] == [1, 2, 3]


def test_checkpoint_with_non_finite_weights_is_refused(cli):
    r = cli["results"]["inf_weights"]
    assert r["code"] == 2 and "Traceback" not in r["stderr"]
    last = r["stderr"].strip().splitlines()[-1]
    model = cli["root"] / "inf_model"
    assert last == f"{PROG}--model_path {model}: model.norm.weight holds NaN or Inf; restore the checkpoint's weights"
    assert "step " not in r["stdout"] and not (cli["root"] / "inf").exists()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)


def test_cli_exit_codes_end_to_end(checkpoints, files, tmp_path):
    """Real processes: exit code 2 with one line from the example and from ``python -m npu_parallel.training.cli``
    (non-UTF-8 data: the file and the byte offset named), and exit 3 after non-finite steps."""
    model = checkpoints / "deepseek_v2"
    bad = _run([sys.executable, LITE, *train_args(model, "--steps", "0")], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"{PROG}--steps 0: must be at least 1; pass a positive integer"

    latin1 = _run(
        [sys.executable, "-m", "npu_parallel.training.cli", *train_args(model, "--data", str(files["latin1"]))], ROOT
    )
    assert latin1.returncode == 2 and "Traceback" not in latin1.stderr
    assert latin1.stderr.strip().splitlines()[-1] == (
        f"python -m npu_parallel.training.cli: error: --data {files['latin1']}: not UTF-8 at byte {files['offset']} "
        f"(line 2, byte 0xe9); convert the file to UTF-8 (e.g. iconv -f <its encoding> -t UTF-8)"
    )

    save, log = tmp_path / "ckpt", tmp_path / "log"
    nan = _run(
        [
            sys.executable,
            LITE,
            *train_args(model, "--steps", "8", "--lr", "1e9", "--warmup_steps", "1", "--max_nonfinite_steps", "2"),
            *("--save_dir", str(save), "--save_every", "1", "--log_dir", str(log)),
        ],
        tmp_path,
    )
    assert nan.returncode == 3, nan.stderr[-3000:]
    last = nan.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{PROG}steps ") and "not finite 2 times in a row" in last, last
    records = metrics(log)  # strict JSON: no bare NaN
    stop = records[-1]["step"]
    assert [r["skipped"] for r in records[-2:]] == [True, True]
    assert all(r["loss"] is None or r["grad_norm"] is None for r in records[-2:])
    assert not any(r["skipped"] for r in records[:-2])
    # a checkpoint after every step but the one that stopped the run, and none holds a non-finite value
    assert sorted(int(p.name[5:]) for p in save.iterdir()) == list(range(1, stop))
    weights = {p.name: load_file(p / "rank-00000-of-00001.safetensors") for p in save.iterdir()}
    assert all(torch.isfinite(t).all() for w in weights.values() for t in w.values())
    # the skipped step applied no update and held the LR schedule
    skipped = stop - 1
    before, after = weights[f"step-{skipped - 1}"], weights[f"step-{skipped}"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert records[-1]["lr"] == records[-2]["lr"]


def test_guards_agree_on_every_rank(checkpoints):
    """The tp batch check names the rank that differs, on both ranks; a NaN on one rank skips the step on all;
    a run going non-finite stops with the same error on every rank (no rank left waiting)."""
    ranks = launch("tests.train_worker:guards", 2, str(checkpoints / "deepseek_v2"), env=RANK_ENV, timeout=420)
    for r in ranks:
        assert r["same_ok"]
        assert r["differ_error"].startswith("step 1: the ranks of tensor-parallel group [0, 1] hold different input")
        assert "global ranks [1] differ from rank 0" in r["differ_error"]
        assert r["finite_when_one_rank_nan"] is False and r["finite_when_all_finite"] is True
        assert r["weights_finite"] is True and r["weights_finite_when_one_rank_inf"] is False
        assert "not finite 2 times in a row" in r["nonfinite_error"]
    assert ranks[0]["nonfinite_error"] == ranks[1]["nonfinite_error"]
