"""Every verb of `npu-parallel` against a table of bad inputs: exit code 2, ONE stderr line, no traceback.

The command runs in this process (``main(argv)``) with logging set up as the console script sets it up
(root handlers removed for the call), so a log line printed before the error counts as a second line.
Also: ``--help`` of the command and of each verb answers without importing torch or transformers.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest

from npu_parallel.tools.cli import main

VERBS = ("env", "inspect", "convert", "merge", "audit", "verify")


@pytest.fixture(scope="module")
def bad(checkpoints, tmp_path_factory):
    """name -> path: a good tiny DeepSeek-V2, a truncated copy, a copy whose config is another model's,
    a converted (tp=2) copy, a Llama (no MoE block), a non-UTF-8 sample and a folder."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = checkpoints / "deepseek_v2"
    corrupt, mismatch = root / "corrupt", root / "mismatch"
    shutil.copytree(good, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(good, mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["moe_intermediate_size"] = 16
    (mismatch / "config.json").write_text(json.dumps(cfg))
    converted = root / "tp2"
    assert main(["convert", str(good), "--tp", "2", "--out", str(converted), "-q"]) == 0
    latin1 = root / "latin1.txt"
    latin1.write_bytes("café crème, naïve\n".encode("latin-1"))
    missing_rank = root / "tp2_missing"
    shutil.copytree(converted, missing_rank)
    (missing_rank / "rank-00001-of-00002.safetensors").unlink()
    return {
        "good": good,
        "corrupt": corrupt,
        "mismatch": mismatch,
        "converted": converted,
        "missing_rank": missing_rank,
        "llama": checkpoints / "llama",
        "latin1": latin1,
        "dir": root,
        "out": root / "out",
    }


def run_cli(capsys, argv: list[str]) -> tuple[int | str | None, str, str]:
    """main(argv) with the console script's logging (basicConfig on a bare root logger) into captured stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    conversion = logging.getLogger("npu_parallel.convert.conversion")
    conversion_level = conversion.level
    root.handlers = []
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        code = exc.code
    finally:
        root.handlers, root.level = handlers, level
        conversion.setLevel(conversion_level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# (verb and arguments with {placeholders} from the `bad` fixture, fragments the one stderr line must hold)
CASES = [
    ("env --tp 0", ["--tp 0: must be a positive integer"]),
    ("env --tp -1", ["--tp -1: must be a positive integer"]),
    ("env --tp 3", ["tp_size=3 must be a positive divisor of the world size 1"]),
    ("env --tp x", ["argument --tp: invalid int value: 'x'"]),
    ("inspect {dir}/nowhere", ["nowhere: not a directory"]),
    ("inspect {corrupt}", ["model.safetensors: not a readable safetensors file"]),
    ("inspect {corrupt} --routing", ["model.safetensors: not a readable safetensors file", "truncated"]),
    ("inspect {mismatch} --routing", ["has shape [8, 64, 64] but the config implies [8, 32, 64]"]),
    ("inspect {good} --routing --tokens 0", ["--tokens 0: must be a positive integer"]),
    ("inspect {good} --routing --tokens -5", ["--tokens -5: must be a positive integer"]),
    ("inspect {good} --routing --data {latin1}", ["--data {latin1}: not UTF-8 text (byte 3"]),
    ("inspect {good} --routing --data {dir}/none.txt", ["--data {dir}/none.txt: no such file"]),
    ("inspect {good} --routing --plot {dir}", ["--plot {dir}: is a directory"]),
    ("inspect {llama} --routing", ["no MoE block found"]),
    ("inspect {converted} --routing", ["config.json: missing"]),
    ("convert {good} --tp 0 --out {out}", ["--tp 0: must be a positive integer"]),
    ("convert {good} --tp 3 --out {out}", ["tp_size=3 must divide the attention heads"]),
    ("convert {good} --tp 2 --out {out} --dtype int4", ["--dtype 'int4' is not one of"]),
    ("convert {corrupt} --tp 2 --out {out}", ["model.safetensors: not a readable safetensors file"]),
    ("convert {mismatch} --tp 2 --out {out}", ["but the config implies [8, 32, 64]"]),
    ("convert {good} --tp 2 --out {good}/sub", ["is inside the source checkpoint"]),
    ("merge {good} --out {out}", ["no manifest.json"]),
    ("merge {converted} --out {out} --max_shard_gb 0", ["--max_shard_gb 0.0: must be a positive number of GB"]),
    ("merge {converted} --out {out} --max_shard_gb -1", ["--max_shard_gb -1.0: must be a positive number"]),
    ("merge {missing_rank} --out {out}", ["rank file rank-00001-of-00002.safetensors is missing"]),
    ("audit {corrupt} --unconverted", ["model.safetensors: not a readable safetensors file"]),
    ("audit {mismatch} --unconverted", ["but the config implies [8, 32, 64]"]),
    ("audit {mismatch}", ["but the config implies [8, 32, 64]"]),
    ("audit {corrupt} --tp 2", ["model.safetensors: not a readable safetensors file"]),
    ("audit {good} --batch 0", ["--batch 0: must be a positive integer"]),
    ("audit {good} --seq -1", ["--seq -1: must be a positive integer"]),
    ("audit {good} --tp 0", ["--tp 0: must be a positive integer"]),
    ("audit {good} --tp 3", ["tp_size=3 must divide the attention heads"]),
    ("audit {good} --unconverted --tp 2", ["--unconverted audits transformers' own single-process model"]),
    ("audit {good} --tp 2 --moe_impl fast", ["moe_impl='fast' is not an implementation"]),
    ("audit {good} --json /proc/npu-parallel/a.json", ["--json /proc/npu-parallel/a.json: cannot write there"]),
    ("verify {good} --batch 0", ["--batch 0: must be a positive integer"]),
    ("verify {good} --seq 0", ["--seq 0: must be a positive integer"]),
    ("verify {good} --tp 0", ["--tp '0': expected positive integers"]),
    ("verify {good} --tp 1,3", ["tp_size=3 must divide the attention heads"]),
    ("verify {good} --tp two", ["--tp 'two': expected comma-separated integers"]),
    ("verify {good} --dtype int8", ["--dtype 'int8' is not one of"]),
    ("verify {good} --atol -1", ["--atol -1.0: must be a number >= 0"]),
    ("verify {good} --min_agree 101", ["--min_agree 101.0: must be a percentage in [0, 100]"]),
    ("verify {good} --tp 1,2 --moe_impl fast", ["moe_impl='fast' is not an implementation"]),
    ("verify {corrupt} --tp 1,2", ["model.safetensors: not a readable safetensors file"]),
    ("verify {mismatch} --tp 2", ["but the config implies [8, 32, 64]"]),
    ("verify {good} --json {dir}", ["--json {dir}: is a directory"]),
    ("verify {good} --plot /proc/npu-parallel/v.png", ["--plot /proc/npu-parallel/v.png: cannot write there"]),
    ("frobnicate", ["argument COMMAND: invalid choice: 'frobnicate'"]),
]


def test_every_verb_is_in_the_table():
    assert {case.split()[0] for case, _ in CASES} >= set(VERBS)
    assert any("--routing" in case for case, _ in CASES)


@pytest.mark.parametrize("case, fragments", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(capsys, bad, case, fragments):
    argv = [part.format(**bad) for part in case.split()]
    code, out, err = run_cli(capsys, argv)
    lines = err.splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("npu-parallel"), lines[0]
    for fragment in fragments:
        assert fragment.format(**bad) in lines[0], (fragment, lines[0])
    assert out == ""
    assert not bad["out"].exists(), "a bad input left output behind"


HELP_PROBE = """
import sys, time
from npu_parallel.tools.cli import main
argv = sys.argv[1:]
try:
    main(argv)
except SystemExit as exc:
    assert exc.code == 0, exc.code
print(sorted(m for m in ("torch", "transformers", "safetensors", "numpy") if m in sys.modules))
"""


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_does_not_import_torch(verb):
    argv = ["--help"] if verb is None else [verb, "--help"]
    out = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, *argv], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "usage: npu-parallel" in out[0]
    assert out[-1] == "[]", f"npu-parallel {' '.join(argv)} imported {out[-1]}"


def _verb_parsers() -> dict[str, object]:
    """Every verb's parser, read from the command's own parser (never a copied list)."""
    import argparse

    from npu_parallel.tools.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **sub.choices}


REST_MARKUP = ("``", ":func:", ":mod:", ":class:", ":meth:", "**")


def test_help_is_plain_text():
    """``npu-parallel --help`` and every verb's: no reStructuredText left over from docstrings."""
    for verb, parser in _verb_parsers().items():
        text = parser.format_help()  # type: ignore[attr-defined]
        found = [m for m in REST_MARKUP if m in text]
        assert not found, f"npu-parallel {verb} --help shows {found}:\n{text}"


def test_one_flag_spelling_with_the_other_an_alias():
    """Help shows ``--moe_impl``; ``--moe-impl`` parses to the same value and is never shown."""
    import re

    parsers = _verb_parsers()
    for verb, parser in parsers.items():
        text = parser.format_help()  # type: ignore[attr-defined]
        hyphenated = [f for f in re.findall(r"--[a-z]+(?:-[a-z]+)+", text) if not f.startswith("--no-")]
        assert not hyphenated, f"npu-parallel {verb} --help shows hyphenated flags {hyphenated}"
    audit = parsers["audit"]
    for spelling in ("--moe_impl", "--moe-impl"):
        assert audit.parse_args(["x", spelling, "static"]).moe_impl == "static"  # type: ignore[attr-defined]
