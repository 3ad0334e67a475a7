"""Read the fenced blocks, inline commands and references of the docs; check a command line without running it.

Each fenced block in a doc is preceded (on the line before it, blank lines aside) by one tag, an HTML
comment that does not render, saying what tests/test_docs.py does with the block:

    <!-- cpu-test -->                run as written, from a fresh copy of the repository
    <!-- cpu-test: continues -->     Python, run in the same interpreter and namespace as the block before it
    <!-- flags-only: REASON -->      runs on a CPU but not in the suite (REASON: too long, a full-size checkpoint,
                                     ...): each command's program, script or module, sub-command and flags are
                                     checked against the real argument parsers, Makefile and files
    <!-- not-on-cpu: REASON -->      needs an NPU, a GPU, the network or a remote host: checked like flags-only
    <!-- output -->                  what a command prints: its ``$ `` lines are checked like flags-only

A block without a tag, or with another one, fails the test: a new block says which it is.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .repo import ROOT, repo_files

# the docs, in the order their cpu-test blocks run (README's first: later docs may use what it made)
DOCS = ("README.md", "TEST_GUIDE.md", "benchmarks/README.md") + tuple(
    sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
)

KINDS = ("cpu-test", "flags-only", "not-on-cpu", "output")
TAG = re.compile(r"<!--\s*([a-z-]+)\s*(?::\s*(.*?))?\s*-->")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)\s*$")  # indented too (a block inside a list item)
SHELL_LANGS = ("bash", "sh", "shell")
PYTHON_LANGS = ("python", "py")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: str | None  # one of KINDS, or None (untagged)
    note: str  # the tag's text after ':' (the reason; "continues" for cpu-test)
    tag_problem: str = ""  # a comment before the fence that is not a valid tag

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str, text: str | None = None) -> list[Block]:
    """The fenced blocks of ``doc`` (or of ``text``, named ``doc``) with their tags."""
    lines = ((ROOT / doc).read_text(encoding="utf-8") if text is None else text).splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), len(lines))
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        kind, note, problem = None, "", ""
        tag = TAG.fullmatch(prev)
        if tag and tag.group(1) in KINDS:
            kind, note = tag.group(1), (tag.group(2) or "").strip()
        elif prev.startswith("<!--"):
            problem = f"unknown tag {prev!r}"
        body = textwrap.dedent("\n".join(lines[start + 1 : end]))
        found.append(Block(doc, start + 1, lang, body, kind, note, problem))
        i = end + 1
    return found


def prose(doc: str, text: str | None = None) -> str:
    """``doc`` (or ``text``, named ``doc``) without its fenced blocks (and without HTML comments)."""
    text = (ROOT / doc).read_text(encoding="utf-8") if text is None else text
    out, inside = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if inside is None and m:
            inside = m.group(1)
        elif inside is not None and line.strip() == inside:
            inside = None
        elif inside is None:
            out.append(re.sub(r"<!--.*?-->", "", line))
    return "\n".join(out)


def inline_spans(doc: str) -> list[str]:
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose(doc))


# ------------------------------------------------------------------------------------------- commands


def command_lines(text: str, dollar_only: bool = False) -> list[str]:
    """Shell command lines of a block (continuations joined); with ``dollar_only`` only the ``$ `` lines."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    if dollar_only:
        return [line.strip()[2:] for line in lines if line.strip().startswith("$ ")]
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def split_command(line: str) -> list[list[str]]:
    """``a && b; c | d`` -> argv lists, comments dropped, leading VAR=value assignments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    argvs, argv = [], []
    for tok in lexer:
        if tok in (";", "&&", "&", "|", "||"):
            argvs.append(argv)
            argv = []
        else:
            argv.append(tok)
    argvs.append(argv)
    out = []
    for argv in argvs:
        while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


PLACEHOLDER_SCRIPT = "your_script.py"  # README "Use": the Python block above it, saved under that name
IGNORED = {"cd", "export", "rm", "mkdir", "ls", "cat", "echo", "command", "test", "source", "ruff", "mypy"}
PROGRAMS = ("npu-parallel", "torchrun", "python", "python3", "pytest", "make", "pip", "ruff", "mypy")


def program(argv0: str) -> str:
    """``.venv/bin/python`` and ``/abs/venv/bin/npu-parallel`` are python and npu-parallel."""
    return Path(argv0).name if Path(argv0).parent.name == "bin" else argv0


def is_command(argv: list[str]) -> bool:
    """Whether an inline span's words start with a program the docs tell users to run."""
    if len(argv) < 2 or argv[1] == "...":  # `npu-parallel`, `torchrun ...`: the program named in a sentence
        return False
    if any(word.endswith(":") for word in argv[:2]):  # `npu-parallel merge: ...`: an error message
        return False
    return program(argv[0]) in PROGRAMS or argv[0].endswith(".sh")


@functools.cache
def project_files() -> frozenset[str]:
    """What a fresh clone holds (files and the folders above them)."""
    files = repo_files()
    return files | frozenset(p.as_posix() for f in files for p in Path(f).parents)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: action for action in parser._actions for opt in action.option_strings}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each verb's parser; ``train`` parses its own flags (tools/cli_train.build_train_parser)."""
    subs = dict(next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)))
    if "train" in subs:
        from npu_parallel.tools.cli_train import build_train_parser

        subs["train"] = build_train_parser()
    return subs


@functools.cache
def help_options(script: str) -> frozenset[str]:
    """The option strings ``python SCRIPT --help`` lists (the script's own parser, run in this process)."""
    out, saved_path, saved_argv = io.StringIO(), list(sys.path), sys.argv
    sys.argv = [str(ROOT / script), "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.path[:], sys.argv = saved_path, saved_argv
    listing = out.getvalue().split("\noptions:\n", 1)
    assert len(listing) == 2, f"{script} --help printed no 'options:' listing:\n{out.getvalue()[:2000]}"
    found = set()
    for line in listing[1].splitlines():
        m = re.match(r"\s{2}(-[^ ].*?)(?:\s{2,}|$)", line)
        if m:
            found.update(opt.split()[0] for opt in m.group(1).split(", "))
    return frozenset(found)


@functools.cache
def shell_script_options(script: str) -> frozenset[str]:
    out = subprocess.run(["bash", str(ROOT / script), "--help"], capture_output=True, text=True, timeout=60)
    return frozenset(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", out.stdout))


def cli_parser() -> argparse.ArgumentParser:
    from npu_parallel.tools.cli import build_parser

    return build_parser()


def torchrun_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def flags(args: list[str]) -> list[str]:
    """The option tokens among ``args`` (meta-syntax brackets stripped, ``--x=v`` -> ``--x``)."""
    out = []
    for tok in args:
        tok = tok.strip("[]")
        if re.fullmatch(r"--?[A-Za-z_][\w-]*(=.*)?", tok):
            out.append(tok.split("=", 1)[0])
    return out


def unknown(found: list[str], known) -> list[str]:
    return [f for f in found if f not in known]


def check_cli(args: list[str], what: str = "npu-parallel") -> list[str]:
    parser = cli_parser()
    words = [a for a in args if not a.startswith("-")]
    subs = subparsers(parser)
    if not words or words[0] not in subs:
        return [f"{what}: no sub-command {words[:1]} (known: {sorted(subs)})"]
    known = options(subs[words[0]]) | options(parser)
    bad = unknown(flags(args), known)
    return [f"{what} {words[0]}: unknown option(s) {bad}"] if bad else []


def check_module(module: str, args: list[str]) -> list[str]:
    if module == "npu_parallel":
        return check_cli(args, "python -m npu_parallel")
    if module == "torch.distributed.run":
        return check_torchrun(args)
    if module == "pytest":
        return check_pytest(args)
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return [] if found else [f"python -m {module}: no such module"]


def check_script(script: str, args: list[str]) -> list[str]:
    if script == PLACEHOLDER_SCRIPT:
        return []
    if script not in project_files():
        return [f"{script}: not in a fresh clone"]
    if script.endswith(".sh"):
        bad = unknown(flags(args), shell_script_options(script))
        return [f"{script}: unknown option(s) {bad} (not in its --help)"] if bad else []
    bad = unknown(flags(args), help_options(script))
    return [f"{script}: unknown option(s) {bad}"] if bad else []


def check_torchrun(args: list[str]) -> list[str]:
    known = options(torchrun_parser())
    i, module = 0, False
    while i < len(args) and args[i].startswith("-"):
        opt = args[i].split("=", 1)[0]
        if opt not in known:
            return [f"torchrun: unknown option {args[i]}"]
        module |= opt in ("-m", "--module")
        i += 1 if "=" in args[i] or known[opt].nargs == 0 else 2
    if i >= len(args):
        return []  # `torchrun --nproc_per_node 2` in a sentence: its options are checked, no script to check
    return check_module(args[i], args[i + 1 :]) if module else check_script(args[i], args[i + 1 :])


def check_pytest(args: list[str]) -> list[str]:
    tests = [a for a in args if a.startswith("tests")]
    return [f"pytest {a}: not in a fresh clone" for a in tests if a.split("::")[0] not in project_files()]


def check_python_code(code: str) -> list[str]:
    """``python -c CODE``: it compiles, and every name it imports exists."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return [f"python -c: {e}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            problems += [p for alias in node.names for p in resolve(f"{node.module}.{alias.name}")]
        elif isinstance(node, ast.Import):
            problems += [p for alias in node.names for p in resolve(alias.name)]
    return problems


def check_make(args: list[str]) -> list[str]:
    targets = [a for a in args if not a.startswith("-") and "=" not in a]
    problems = []
    for target in targets or ["all"]:
        run = subprocess.run(
            ["make", "-n", "-o", ".venv/.installed", target], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        if run.returncode:
            problems.append(f"make {target}: {run.stderr.strip()}")
            continue
        for line in command_lines(run.stdout):  # the recipe: the commands of ours it runs are checked too
            for argv in split_command(line):
                if program(argv[0]) in ("npu-parallel", "torchrun", "python", "pytest"):
                    problems += [f"make {target}: {p}" for p in check_argv(argv)]
    return problems


def check_pip(args: list[str]) -> list[str]:
    extras = set(re.findall(r'"(\w+)": \[', (ROOT / "setup.py").read_text()))
    problems = []
    for arg in args:
        m = re.fullmatch(r"\.\[([\w,]+)\]", arg)
        if m:
            missing = [e for e in m.group(1).split(",") if e not in extras]
            problems += [f"pip install .[{e}]: setup.py has no extra {e!r}" for e in missing]
    return problems


def check_argv(argv: list[str]) -> list[str]:
    """Problems with one command (no script, module, sub-command or option it names may be missing)."""
    prog, args = program(argv[0]), argv[1:]
    if prog in IGNORED:
        return []
    if prog == "npu-parallel":
        return check_cli(args)
    if prog == "torchrun":
        return check_torchrun(args)
    if prog in ("python", "python3"):
        if args[:1] == ["-m"] and len(args) > 1:
            return check_module(args[1], args[2:])
        if args[:1] == ["-c"] and len(args) > 1:
            return check_python_code(args[1])
        return check_script(args[0], args[1:]) if args else ["python: no script"]
    if prog == "pytest":
        return check_pytest(args)
    if prog == "make":
        return check_make(args)
    if prog == "pip":
        return check_pip(args)
    if prog.endswith(".sh"):
        return check_script(prog.removeprefix("./"), args)
    return [f"{' '.join(argv)}: a program tests/doc_blocks.py does not know how to check (teach it: check_argv)"]


def trailing_comment(line: str) -> str:
    """The ``# ...`` at the end of a shell line (outside quotes), or ''."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[i + 1 :]
    return ""


def check_line(line: str) -> list[str]:
    """Problems with a shell line; options its trailing comment names (``# --dtype bf16 casts``) count as its own."""
    try:
        argvs = split_command(line)
    except ValueError as e:
        return [f"{line!r}: {e}"]
    hinted = flags(re.split(r"[\s,;:()]+", trailing_comment(line)))
    if argvs and hinted:
        argvs[-1] = argvs[-1] + hinted
    return [p for argv in argvs for p in check_argv(argv)]


# ------------------------------------------------------------------------------------------ references


def resolve(dotted: str) -> list[str]:
    """``pkg.module.attr.attr`` exists: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for i, attr in enumerate(parts[n:], start=n):
            if not hasattr(obj, attr):
                return [f"{dotted}: {'.'.join(parts[:i])} has no attribute {attr!r}"]
            obj = getattr(obj, attr)
        return []
    return [f"{dotted}: no such module"]


PATH_REF = re.compile(
    r"(?<![\w/.~-])((?:examples|tests|benchmarks|npu_parallel|docs)/[\w./-]*[\w/])(?::([A-Za-z_]\w*))?"
)
DOTTED_REF = re.compile(r"(?<![\w/.-])((?:npu_parallel|tests)(?:\.[A-Za-z_]\w*)+)")
ROOT_FILE_REF = re.compile(r"(?<![\w/.-])([\w-]+\.sh)\b")
MD_LINK = re.compile(r"\]\(([^()\s]*)\)")  # [text](target): relative to the doc's folder, #anchor optional


def anchors(doc: str) -> set[str]:
    """The ``#anchors`` of ``doc``'s headings, as GitHub makes them (lowercase, punctuation dropped, spaces -> -)."""
    found = set()
    for line in prose(doc).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if m:
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return found


def link_problems(doc: str, text: str | None = None) -> list[str]:
    """Markdown links ``[text](path#anchor)`` in ``doc``'s prose (or ``text``) to a file or heading a clone lacks."""
    problems = []
    for m in MD_LINK.finditer(prose(doc, text)):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # https://..., mailto:
            continue
        path, _, anchor = target.partition("#")
        rel = os.path.normpath(str(Path(doc).parent / path)) if path else doc
        if rel not in project_files():
            problems.append(f"{doc}: ({target}): no such file or folder in a fresh clone")
        elif anchor and rel.endswith(".md") and anchor not in anchors(rel):
            problems.append(f"{doc}: ({target}): {rel} has no heading #{anchor}")
    return problems


def reference_problems(doc: str) -> list[str]:
    """Paths, ``path.py:name`` and dotted ``npu_parallel.x.y`` names in ``doc`` that a fresh clone lacks."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    problems = []
    for m in PATH_REF.finditer(text):
        path, name = m.group(1).rstrip("/"), m.group(2)
        if path not in project_files():
            problems.append(f"{doc}: {m.group(0)}: no such file or folder in a fresh clone")
        elif name and not re.search(rf"^(?:def|class) {name}\b|^{name}\s*[:=]", (ROOT / path).read_text(), re.M):
            problems.append(f"{doc}: {m.group(0)}: {path} defines no {name}")
    for m in DOTTED_REF.finditer(text):
        problems += [f"{doc}: {p}" for p in resolve(m.group(1).rstrip("."))]
    for m in ROOT_FILE_REF.finditer(text):
        if m.group(1) not in project_files():
            problems.append(f"{doc}: {m.group(1)}: not in a fresh clone")
    return problems + link_problems(doc)


def env_for_docs(clone: Path) -> dict[str, str]:
    """The environment a user following the docs has: the virtual environment active, the clone importable."""
    skip = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(clone),  # what `pip install -e .` in the clone gives
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    return env
