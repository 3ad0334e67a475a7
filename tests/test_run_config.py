"""Run configs (issue 21 pt 8): ``npu-parallel train --config run.yaml`` with the command line overriding the file,
every mistake in the file one line and exit 2 at once, the resolved config.yaml written beside metrics.jsonl and
taken back by --config to repeat the run, ``--nproc_per_node`` starting torchrun, the example configs, and the
progress bar's tokens/s, loss and ETA."""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from npu_parallel.tools.cli import main
from npu_parallel.training.cli import build_parser, parse
from npu_parallel.training.metrics import MetricsLog, read_metrics
from npu_parallel.training.run_config import config_values, write_run_config

from .cli_runs import CLI, ROOT, run_child


def _parse(*argv: str):
    return parse(build_parser(prog="npu-parallel train"), list(argv))


def test_keys_values_and_command_line_overrides(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(
        "steps: 5\nmax-length: 64\nlr: 1e-5\ndata: [a.jsonl, b.jsonl:0.5]\ntp_size: null\npacking: false\n"
        "lora_alpha: 16\nfield_map: messages=conversation\n"
    )
    _, cfg = _parse("--config", str(run))
    assert (cfg.steps, cfg.max_length, cfg.lr, cfg.tp_size, cfg.packing) == (5, 64, 1e-5, None, False)
    assert cfg.data == ["a.jsonl", "b.jsonl:0.5"] and cfg.lora_alpha == 16.0 and cfg.warmup_steps == 2
    assert cfg.field_map == "messages=conversation"
    # the command line wins, --data replaces the file's list (it does not extend it), either flag spelling
    _, cfg = _parse("--config", str(run), "--steps", "2", "--data", "c.txt", "--max-length", "32", "--packing")
    assert (cfg.steps, cfg.data, cfg.max_length, cfg.packing) == (2, ["c.txt"], 32, True)
    run.write_text("data: one.jsonl\n")  # one string is a list of one
    assert _parse("--config", str(run))[1].data == ["one.jsonl"]


def test_resolved_config_reproduces_the_train_config(tmp_path):
    """config.yaml holds every TrainConfig field after the overrides; --config takes it back to the same config."""
    run = tmp_path / "run.yaml"
    run.write_text("steps: 7\nlr: 3.0e-4\ndata: [x.jsonl:2, y.parquet]\nrouter_noise: jitter\npacking: true\n")
    parser = build_parser(prog="npu-parallel train")
    args, cfg = parse(parser, ["--config", str(run), "--grad_accum", "3", "--timeout_s", "1800", "--no-packing"])
    out = write_run_config(tmp_path / "log", config_values(parser, args, cfg), parser.prog, ["--config", str(run)])
    text = out.read_text()
    assert text.startswith("# The resolved config of a run") and "# npu_parallel " in text and "torch " in text
    assert f"npu-parallel train --config {out} --log_dir NEW_DIR" in text
    assert set(yaml.safe_load(text)) == set(asdict(cfg))
    assert asdict(_parse("--config", str(out))[1]) == asdict(cfg)


BAD = {  # file text -> the end of the one line
    "stpes: 3\n": "unknown key 'stpes' (did you mean 'steps'?); every key is a flag of npu-parallel train without "
    "its dashes (see npu-parallel train --help)",
    "steps: 2.5\n": "steps: 2.5 is not an integer; write e.g. steps: 8",
    "lr: fast\n": "lr: 'fast' is not a number; write e.g. lr: 1.0e-5",
    "packing: 1\n": "packing: 1 is not true or false or null; write e.g. packing: true",
    "data: {a: 1}\n": "data: {'a': 1} is not a list of PATH[:WEIGHT] (or one string) or null",
    "steps: null\n": "steps: None is not an integer; write e.g. steps: 8",
    "nproc_per_node: 8\n": "key 'nproc_per_node': nproc_per_node is how many ranks start, not a run setting",
    "steps: 2\nsteps: 3\n": "steps given twice (lines 1 and 2); keep one",  # PyYAML alone keeps the last
    "max_length: 8\nmax-length: 9\n": "max_length given twice (as 'max_length' and 'max-length'); keep one",
    "- steps\n": "holds a list, not a mapping of flags to values",
    "steps: [\n": "not YAML (",
}


def test_bad_config_is_one_line_and_exit_2_at_once(tmp_path, capsys, monkeypatch):
    """Unknown key, wrong type, missing file, not YAML, not a mapping: one line, exit 2, before any process group
    (in milliseconds); under torchrun --nproc_per_node must be its ranks per node."""
    cases = {}
    for i, (text, expected) in enumerate(BAD.items()):
        (tmp_path / f"{i}.yaml").write_text(text)
        cases[f"{i}.yaml"] = (["--config", str(tmp_path / f"{i}.yaml")], expected)
    cases["missing"] = (["--config", str(tmp_path / "nope.yaml")], "nope.yaml: no such file")
    cases["folder"] = (["--config", str(tmp_path)], "is not a file")
    (tmp_path / "latin1.yaml").write_bytes(b"template: caf\xe9\n")
    cases["latin1"] = (["--config", str(tmp_path / "latin1.yaml")], "not UTF-8 text (byte 13); save it as UTF-8")
    cases["value"] = (["--steps", "0"], "--steps 0: must be at least 1")
    cases["launch_value"] = (["--steps", "0", "--nproc_per_node", "2"], "--steps 0: must be at least 1")
    grouped = dist.is_initialized()  # an earlier in-process test's group may be up: none may be started here
    for name, (argv, expected) in cases.items():
        t0 = time.perf_counter()
        code = main(["train", *argv])
        seconds = time.perf_counter() - t0
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (name, err)
        assert err[0].startswith("npu-parallel train: error: ") and expected in err[0], (name, err[0])
        assert seconds < 2 and dist.is_initialized() == grouped, name
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main(["train", "--nproc_per_node", "4", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "npu-parallel train: error: --nproc_per_node 4: this process is a torchrun rank with 2 ranks per node "
        "(LOCAL_WORLD_SIZE); drop --nproc_per_node or pass torchrun's"
    )


def test_example_configs_resolve():
    """Every examples/configs/*.yaml holds real flags only and resolves to a checked TrainConfig."""
    found = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
    assert {p.name for p in found} >= {"deepseek_v2_lite_sft_full.yaml", "deepseek_v2_lite_sft_lora.yaml"}
    for path in found:
        _, cfg = _parse("--config", str(path))
        assert cfg.max_length == 4096 and cfg.packing and cfg.format == "messages" and cfg.eval_split > 0, path
        assert 8 % cfg.tp_size == 0 and cfg.ep_size == 8 and cfg.precision == "bf16", path
        assert cfg.batch_size * cfg.grad_accum * 8 // cfg.tp_size == 16, path  # the same global batch, 16 rows
    assert _parse("--config", str(ROOT / "examples/configs/deepseek_v2_lite_sft_lora.yaml"))[1].lora_r == 16


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_tokens_per_second_loss_and_eta(monkeypatch, capsys):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    log = MetricsLog(None, True, total_steps=4)
    for step in (1, 2):
        log.step(
            {
                "step": step,
                "loss": 2.5,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 1234.0,
                "step_s": 2.0,
                "peak_mem_mb": 10.0,
            }
        )
    log.bar.refresh()
    bar = term.getvalue().split("\r")[-1]
    log.close()
    assert "2/4" in bar and "<" in bar and "loss 2.5000" in bar and "1234 tok/s" in bar, bar  # elapsed<remaining
    assert "| eta 00:04" in capsys.readouterr().out + term.getvalue()  # the step line, for logs too


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """One interpreter: a run from a YAML (steps 5 there, --steps 2 on the command line), its config.yaml run again
    in place, the same config.yaml on 2 ranks started by --nproc_per_node (torchrun), and 2 ranks refusing a
    --model_path that is not there."""
    root = tmp_path_factory.mktemp("run_config")
    words = "the quick brown fox jumps over the lazy dog " * 3
    (root / "text.jsonl").write_text("".join(json.dumps({"text": f"{i} {words}"}) + "\n" for i in range(20)))
    (root / "cfgs").mkdir()
    (root / "cfgs" / "tiny.yaml").write_text(
        f"model_path: {checkpoints / 'deepseek_v2'}\ndata: text.jsonl\nsteps: 5\nmax-length: 32\nlr: 1e-3\n"
        "jit_warmup_steps: 0\nlog_dir: runs/a\n"
    )
    first = ["train", "--config", "cfgs/tiny.yaml", "--steps", "2"]
    again = ["train", "--config", "runs/a/config.yaml", "--log_dir", "runs/b"]
    launched = ["train", "--config", "runs/a/config.yaml", "--log_dir", "runs/c", "--nproc_per_node", "2"]
    refused = [*launched[:-2], "--model_path", "nope", "--log_dir", "runs/d", "--nproc_per_node", "2"]
    cases = [{"script": CLI, "argv": argv} for argv in (first, again, launched, refused)]
    results, output = run_child(cases, root, cwd=root)
    names = ("first", "again", "launched", "refused")
    return {"root": root, "results": dict(zip(names, results, strict=True)), "output": output}


def _losses(log_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(log_dir / "metrics.jsonl")]


def test_train_from_config_writes_it_back_and_repeats(runs):
    root, results = runs["root"], runs["results"]
    for name in ("first", "again", "launched"):
        assert results[name]["code"] == 0, (name, results[name]["stderr"][-2000:], runs["output"][-2000:])
    # relative paths are relative to the working directory (not to cfgs/), as on the command line
    a = root / "runs" / "a"
    assert (a / "metrics.jsonl").is_file() and (a / "config.yaml").is_file() and not (root / "cfgs" / "runs").exists()
    written = yaml.safe_load((a / "config.yaml").read_text())
    assert written["steps"] == 2 and written["max_length"] == 32 and written["data"] == ["text.jsonl"]  # CLI won
    assert len(_losses(a)) == 2
    # its config.yaml repeats the run: the same losses, and the same resolved config but for log_dir
    assert _losses(root / "runs" / "b") == _losses(a)
    again = yaml.safe_load((root / "runs" / "b" / "config.yaml").read_text())
    assert {**again, "log_dir": "runs/a"} == written
    # --nproc_per_node 2: torchrun's 2 ranks (tp 2) give the same losses within fp32 tolerance
    c = root / "runs" / "c"
    assert "# ranks: world 2 (tp 2, ep 2, dp 1)" in (c / "config.yaml").read_text()
    assert _losses(c) == pytest.approx(_losses(a), abs=1e-4)
    # bad input the ranks find (after the launch): rank 0's exit code 2 and its one line, no torchrun traceback
    assert results["refused"]["code"] == 2
    assert "npu-parallel train: error: --model_path nope: not a directory" in runs["output"]
    assert "ChildFailedError" not in runs["output"] and "Traceback" not in runs["output"]
