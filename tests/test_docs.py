"""Every command and snippet in README.md, TEST_GUIDE.md, benchmarks/README.md and docs/*.md works as written.

Each fenced block carries a tag saying how it is tested (see tests/doc_blocks.py): ``cpu-test`` blocks run
here, from a fresh copy of the repository (what git tracks plus untracked files it does not ignore) with
the suite's virtual environment active and the copy on PYTHONPATH (what ``pip install -e .`` in a clone
gives); the others have every command's script, module, sub-command and flags checked without running.

The only words of a ``cpu-test`` block that are replaced are the documented placeholders in
PLACEHOLDERS; ``your_script.py`` (README, "Use": ``torchrun --nproc_per_node 4 your_script.py``) is the
Python block just before it, written to that file. Everything else, relative paths included, must exist
in a fresh clone or be made by an earlier command of the same doc.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from .doc_blocks import (
    DOCS,
    KINDS,
    PYTHON_LANGS,
    ROOT,
    SHELL_LANGS,
    blocks,
    check_line,
    command_lines,
    env_for_docs,
    flags,
    inline_spans,
    is_command,
    link_problems,
    options,
    project_files,
    reference_problems,
    split_command,
    subparsers,
)

# (pattern, replacement, why): the documented placeholders and what they become in a cpu-test shell block
PLACEHOLDERS = (
    (
        r"/models/DeepSeek-V2-Lite(?![\w-])",
        "{checkpoints}/deepseek_v2_lite",
        "a published checkpoint -> the tests' tiny DeepSeek-V2-Lite (same module tree; 8 heads, 8 experts: tp 8 works)",
    ),
    (r"(?<![\w.~-])/ckpt/", "{out}/ckpt/", "an output folder at the root -> the same name in a fresh folder"),
    (r"(?<![\w.~-])/models/", "{out}/models/", "idem, for the other /models/NAME folders (outputs: merge --out)"),
)

RUNNER = """
import json, sys
ns = None
for block in json.load(open(sys.argv[1])):
    if ns is None or not block["continues"]:
        ns = {"__name__": "__main__"}
    print(f"--- {block['where']}", flush=True)
    exec(compile(block["code"], block["where"], "exec"), ns)
"""


def _units():
    """The cpu-test blocks in run order: per doc its Python blocks in one interpreter, then each shell block."""
    units = []
    for doc in DOCS:
        tested = [b for b in blocks(doc) if b.kind == "cpu-test"]
        python = [b for b in tested if b.lang in PYTHON_LANGS]
        if python:
            units.append(pytest.param(python, id=f"{doc}:python:" + "+".join(str(b.line) for b in python)))
        units += [pytest.param([b], id=f"{b.where}:{b.lang}") for b in tested if b.lang in SHELL_LANGS]
    return units


def _tail(run: subprocess.CompletedProcess, n: int = 6000) -> str:
    return (run.stdout + run.stderr)[-n:]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone's files (modes kept); the cpu-test blocks of all docs run in it in doc order."""
    dst = tmp_path_factory.mktemp("clone")
    for rel in sorted(project_files()):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


# --------------------------------------------------------------------------------------------- tagging


def test_every_block_is_tagged():
    problems = []
    for doc in DOCS:
        previous = None
        for b in blocks(doc):
            if b.kind is None:
                problems.append(f"{b.where}: {b.tag_problem or 'no tag'}: put one of {KINDS} before the fence")
            elif b.kind in ("flags-only", "not-on-cpu") and not b.note:
                problems.append(f"{b.where}: <!-- {b.kind}: REASON --> needs its reason")
            elif b.kind == "cpu-test":
                if b.lang not in SHELL_LANGS + PYTHON_LANGS:
                    problems.append(f"{b.where}: a cpu-test block is ```bash or ```python, not {b.lang!r}")
                if b.note not in ("", "continues"):
                    problems.append(f"{b.where}: cpu-test takes no note but 'continues' (got {b.note!r})")
                if b.note == "continues" and (previous is None or previous.lang not in PYTHON_LANGS):
                    problems.append(f"{b.where}: 'continues' follows a cpu-test Python block")
                if b.lang in PYTHON_LANGS:
                    previous = b
    assert not problems, "\n".join(problems)


def test_blocks_and_tags_are_read_right():
    """The reader itself, on a doc of its own: fences, tags, what is untagged or mistagged."""
    text = (
        "x\n<!-- cpu-test -->\n```bash\necho 1\n```\n\n<!-- cpu-test: continues -->\n\n```python\nx = 1\n```\n"
        "```\nout\n```\n<!-- nope -->\n```\n$ npu-parallel env\n```\n- a list item:\n\n  ```bash\n  make demo\n  ```\n"
    )
    found = blocks("probe.md", text)
    assert [(b.line, b.lang, b.kind, b.note, b.text) for b in found] == [
        (3, "bash", "cpu-test", "", "echo 1"),
        (9, "python", "cpu-test", "continues", "x = 1"),
        (12, "", None, "", "out"),
        (16, "", None, "", "$ npu-parallel env"),
        (21, "bash", None, "", "make demo"),
    ]
    assert found[3].tag_problem == "unknown tag '<!-- nope -->'"
    assert split_command("A=1 B=2 npu-parallel env --json && cd x; make demo  # the demo") == [
        ["npu-parallel", "env", "--json"],
        ["cd", "x"],
        ["make", "demo"],
    ]


# ----------------------------------------------------------------------------- commands checked, not run


def test_commands_name_real_scripts_modules_and_flags():
    problems = []
    for doc in DOCS:
        for b in blocks(doc):
            if b.kind == "cpu-test" or b.kind is None:
                continue
            if b.lang in PYTHON_LANGS:
                try:
                    compile(b.text, b.where, "exec")
                except SyntaxError as e:
                    problems.append(f"{b.where}: {e}")
                continue
            for line in command_lines(b.text, dollar_only=b.kind == "output"):
                problems += [f"{b.where}: {p}" for p in check_line(line)]
        for span in inline_spans(doc):  # `npu-parallel ...`, `torchrun ...`, `make lint` in the prose
            try:
                argvs = split_command(span)
            except ValueError:
                continue
            if argvs and is_command(argvs[0]):
                problems += [f"{doc}: `{span}`: {p}" for p in check_line(span)]
    assert not problems, "\n".join(problems)


def test_checker_catches_what_rots():
    """The checks above fail on a renamed module, script, sub-command or flag (the ways these docs went stale)."""
    assert check_line("npu-parallel inspect PATH --json") == []
    assert check_line("torchrun --nproc_per_node 2 examples/train_deepseek_v2_lite.py --steps 3") == []
    assert check_line("npu-parallel verfy PATH")[0].startswith("npu-parallel: no sub-command ['verfy']")
    assert "unknown option(s) ['--tpp']" in check_line("npu-parallel audit PATH --tpp 2")[0]
    run = "torchrun --nproc_per_node 2 examples/train_tp_moe.py --step 3"  # argparse takes a prefix; the docs may not
    assert "unknown option(s) ['--step']" in check_line(run)[0]
    assert check_line("python examples/nope.py")[0] == "examples/nope.py: not in a fresh clone"
    assert check_line("python -m npu_parallel.verify --tp 2") == ["python -m npu_parallel.verify: no such module"]
    assert "has no attribute" in check_line('python -c "from npu_parallel.tools.tiny import build_tiny"')[0]
    assert "No rule to make target" in check_line("make demoo")[0]
    assert check_line("pip install -e .[nope]") == ["pip install .[nope]: setup.py has no extra 'nope'"]
    assert check_line("npu-parallel convert P --tp 8 --out O   # --dtype bf16 casts") == []
    assert "unknown option(s) ['--dtyp']" in check_line("npu-parallel convert P --tp 8 --out O   # --dtyp bf16")[0]
    doc = "docs/probe.md"  # links are relative to the doc's folder; an anchor must be one of the page's headings
    good = "[a](../README.md#use), [b](fine_tuning.md#the-training-script), [c](https://x.org/y.md)"
    assert link_problems(doc, good) == []
    assert link_problems(doc, "[d](README.md)") == [f"{doc}: (README.md): no such file or folder in a fresh clone"]
    assert link_problems(doc, "[e](lora.md#nope)") == [f"{doc}: (lora.md#nope): docs/lora.md has no heading #nope"]


def test_flags_named_in_prose_exist():
    """``--flag`` spans in the prose (``--vocab_parallel_loss``, ``--resume DIR``) belong to one of our commands."""
    from torch.distributed.run import get_args_parser

    from npu_parallel.tools.cli import build_parser

    from .doc_blocks import help_options, shell_script_options

    cli = build_parser()
    known = set(options(cli)) | set(options(get_args_parser()))
    for sub in subparsers(cli).values():
        known |= set(options(sub))
    for script in sorted(f for f in project_files() if re.fullmatch(r"((examples|benchmarks)/)?[^/]+\.py", f)):
        if "__main__" in (ROOT / script).read_text():
            known |= help_options(script)
    known |= shell_script_options("sync_to_remote.sh") | shell_script_options("test_moe_on_remote.sh")
    problems = [
        f"{doc}: `{span}`: {flag} is no option of npu-parallel, torchrun, examples/, benchmarks/, the top-level "
        "or the remote scripts"
        for doc in DOCS
        for span in inline_spans(doc)
        if span.startswith("--")
        for flag in flags(re.split(r"[\s/|]+", span))
        if flag not in known
    ]
    assert not problems, "\n".join(problems)


def test_references_resolve():
    """Paths (``tests/dist.py:run_ranks``) exist in a fresh clone, dotted names (``npu_parallel.x.y``) import."""
    problems = [p for doc in DOCS for p in reference_problems(doc)]
    assert not problems, "\n".join(problems)


def test_annotated_plan_is_deepseeks():
    """README "Adding a model family" shows DeepSeek's plan, annotated: the real one, rule for rule."""
    from npu_parallel.convert.plans.deepseek import PLAN

    (block,) = [b for b in blocks("README.md") if "PLAN = Plan(" in b.text]
    ns: dict = {}
    exec(compile(block.text, block.where, "exec"), ns)
    assert ns["PLAN"] == PLAN


def test_documented_tp_error_is_the_real_one():
    """docs/parallel_layout.md: the ValueError shown for tp_size=3 on 6 ranks and an 8-head DeepSeek-V2 is raised."""
    from npu_parallel.convert.plans import plan_for

    from .models import VARIANTS

    (block,) = [b for b in blocks("docs/parallel_layout.md") if b.text.startswith("ValueError: tp_size=")]
    config_cls, _, kwargs = VARIANTS["deepseek_v2"]
    config = config_cls(**kwargs)
    with pytest.raises(ValueError) as raised:
        plan_for(config).check_tp(config, 3, world_size=6)
    assert f"ValueError: {raised.value}" == block.text


def test_docs_state_the_tp_batch_rule():
    """docs/fine_tuning.md says every tp rank must get the same batch, who guarantees it, what the first step checks."""
    section = (ROOT / "docs/fine_tuning.md").read_text().split("## The training script", 1)[1].split("\n## ", 1)[0]
    text = " ".join(section.split())
    for words in (
        "Every rank of a tensor-parallel group must be fed the same batch",
        "The built-in loop does it",
        "A custom loop must do it too",
        "the first step compares a hash of the input ids across the tp group and stops with an error naming the ranks"
        " that differ",
    ):
        assert words in text, words


# ------------------------------------------------------------------------------------- blocks that run


@pytest.mark.parametrize("unit", _units())
def test_cpu_blocks_run_as_written(unit, clone, checkpoints, tmp_path):
    env = env_for_docs(clone)
    if unit[0].lang in PYTHON_LANGS:
        spec = [{"where": b.where, "code": b.text, "continues": b.note == "continues"} for b in unit]
        (tmp_path / "blocks.json").write_text(json.dumps(spec))
        (tmp_path / "runner.py").write_text(RUNNER)
        cmd = [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")]
    else:
        (block,) = unit
        text = block.text
        for pattern, replacement, _why in PLACEHOLDERS:
            text = re.sub(pattern, replacement.format(checkpoints=checkpoints, out=tmp_path), text)
        if re.search(r"\byour_script\.py\b", text):
            before = [b for b in blocks(block.doc) if b.line < block.line and b.lang in PYTHON_LANGS]
            (clone / "your_script.py").write_text(before[-1].text + "\n")
        cmd = ["bash", "-e", "-o", "pipefail", "-c", text]
    run = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, f"{unit[0].where}: exit code {run.returncode}\n{_tail(run)}"
