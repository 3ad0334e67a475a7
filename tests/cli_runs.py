"""The command line from a test: the scripts, the child's environment, many training cases run in one child
interpreter (``tests.train_worker``), ``npu-parallel`` in this process or in a child (its ranks under torchrun),
and a run's metrics.jsonl read as strict JSON."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from .dist import RANK_ENV

ROOT = Path(__file__).resolve().parents[1]
LITE = str(ROOT / "examples" / "train_deepseek_v2_lite.py")
TP_MOE = str(ROOT / "examples" / "train_tp_moe.py")
CLI = str(ROOT / "npu_parallel" / "tools" / "cli.py")  # ``npu-parallel``'s main(), as a script for cli_cases


def child_env() -> dict[str, str]:
    """This environment with the ranks' settings, this checkout first on PYTHONPATH (the child imports tests)."""
    return {**os.environ, **RANK_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def train_args(model: Path | str, *extra: str) -> list[str]:
    """A short run's training flags (2 steps of 32 tokens, no JIT warmup), then ``extra`` (a later flag wins)."""
    base = ["--model_path", str(model), "--steps", "2", "--max_length", "32", "--lr", "1e-3", "--jit_warmup_steps", "0"]
    return [*base, *extra]


def run_cases(cases: list[dict], folder: Path, *, cwd: Path = ROOT, timeout: int = 600) -> list[dict]:
    """Each ``{"script": path, "argv": [...]}`` through the script's main() in one child interpreter started in
    ``cwd`` (cases.json and out.json in ``folder``): per case its exit code, stderr and stdout."""
    return run_child(cases, folder, cwd=cwd, timeout=timeout)[0]


def run_child(cases: list[dict], folder: Path, *, cwd: Path = ROOT, timeout: int = 600) -> tuple[list[dict], str]:
    """:func:`run_cases`, and the child's own stdout and stderr (what ranks it started printed there)."""
    cases_file, out_file = folder / "cases.json", folder / "out.json"
    cases_file.write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train_worker", str(cases_file), str(out_file)],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out_file.read_text()), proc.stdout + proc.stderr


def run_named(cases: dict[str, tuple[str, list[str]]], folder: Path, **kwargs) -> dict[str, dict]:
    """:func:`run_cases` of ``{name: (script, argv)}``: name -> result."""
    results = run_cases([{"script": s, "argv": a} for s, a in cases.values()], folder, **kwargs)
    return dict(zip(cases, results, strict=True))


def in_process(*argv: str) -> tuple[int, str, str]:
    """``npu-parallel ARGV`` through main() in this process: (exit code, stdout, stderr)."""
    from npu_parallel.tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def main_captured(capsys, *argv: str) -> tuple[int, str, str]:
    """``npu-parallel ARGV`` through main() in this process, its output taken from pytest's ``capsys``."""
    from npu_parallel.tools.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_line(*argv: str) -> dict:
    """``npu-parallel ARGV`` in this process, exit 0, its stdout one JSON object."""
    code, out, err = in_process(*argv)
    assert code == 0, err
    return json.loads(out)


def launched_json(*argv: str) -> dict:
    """``python -m npu_parallel.tools.cli ARGV`` in a child (the verb starts its ranks), exit 0, one JSON line out."""
    proc = subprocess.run(
        [sys.executable, "-m", "npu_parallel.tools.cli", *argv], env=child_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def strict_json(line: str):
    """``json.loads`` refusing NaN and Infinity (what metrics.jsonl must never hold)."""

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=no_constant)


def metrics(log_dir: Path) -> list[dict]:
    """Every record of ``log_dir/metrics.jsonl``, each line strict JSON."""
    return [strict_json(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
