"""What convert and merge do to their output folder: --overwrite replaces only what npu-parallel provably wrote
and keeps what a user added; disk full and unwritable outputs are one line, exit code 2, no .partial left."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .cli_runs import main_captured as cli
from .repo import digest

REPO = Path(__file__).resolve().parents[1]


def refused(result, *fragments):
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _convert(capsys, src, out, tp=2, *extra):
    assert cli(capsys, "convert", str(src), "--tp", str(tp), "--out", str(out), "-q", *extra)[0] == 0


def _siblings(out: Path) -> list[str]:
    """Anything convert/merge left beside ``out`` (.partial, .old-*)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


# -- --overwrite -----------------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_with_someone_elses_manifest(capsys, src, tmp_path):
    """The issue's case: a folder holding a manifest.json of someone else's and thesis.txt."""
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"title": "my thesis", "chapters": 7}))
    (out / "thesis.txt").write_text("four years of work")
    before = digest(out)
    _convert(capsys, src, tmp_path / "tp")
    for argv in (("convert", str(src), "--tp", "2"), ("merge", str(tmp_path / "tp"))):
        refused(
            cli(capsys, *argv, "--out", str(out), "--overwrite"),
            "was not written by npu-parallel; refusing to replace it",
        )
    assert digest(out) == before


def test_overwrite_refuses_a_manifest_naming_files_it_never_writes(capsys, src, tmp_path):
    out = tmp_path / "o"
    _convert(capsys, src, out)
    (out / "thesis.txt").write_text("four years of work")
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["thesis.txt"] = {"sha256": "0" * 64, "bytes": 18}
    (out / "manifest.json").write_text(json.dumps(m))
    refused(
        cli(capsys, "convert", str(src), "--tp", "2", "--out", str(out), "--overwrite"),
        "it lists 'thesis.txt', which is not a file npu-parallel writes",
    )
    assert (out / "thesis.txt").read_text() == "four years of work"
    # a merged folder's marker naming a file outside the folder
    hf = tmp_path / "hf"
    m["files"].pop("thesis.txt")
    (out / "manifest.json").write_text(json.dumps(m))
    assert cli(capsys, "merge", str(out), "--out", str(hf), "-q")[0] == 0
    victim = tmp_path / "victim.tiktoken"
    victim.write_text("keep me")
    mark = json.loads((hf / "npu_parallel.json").read_text())
    mark["files"]["../victim.tiktoken"] = {"bytes": 7}
    (hf / "npu_parallel.json").write_text(json.dumps(mark))
    refused(cli(capsys, "merge", str(out), "--out", str(hf), "--overwrite"), "'../victim.tiktoken'")
    assert victim.read_text() == "keep me"


def test_overwrite_refuses_when_a_listed_file_changed(capsys, src, tmp_path):
    out = tmp_path / "o"
    _convert(capsys, src, out)
    with open(out / "rank-00001-of-00002.safetensors", "ab") as f:
        f.write(b"appended by someone")
    before = digest(out)
    refused(
        cli(capsys, "convert", str(src), "--tp", "4", "--out", str(out), "--overwrite"),
        "rank-00001-of-00002.safetensors, which it lists, is missing or changed",
    )
    assert digest(out) == before


def test_overwrite_replaces_only_its_own_files(capsys, src, tmp_path):
    out = tmp_path / "o"
    _convert(capsys, src, out, 2)
    (out / "notes.txt").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    _convert(capsys, src, out, 4, "--overwrite")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["eval", "manifest.json", "notes.txt"] + [f"rank-0000{r}-of-00004.safetensors" for r in range(4)]
    assert (out / "notes.txt").read_text() == "my notes" and (out / "eval" / "scores.json").is_file()
    assert _siblings(out) == []


def test_overwrite_refuses_to_replace_a_user_file_of_the_same_name(capsys, src, tmp_path):
    out = tmp_path / "o"
    _convert(capsys, src, out, 2)
    (out / "rank-00003-of-00004.safetensors").write_text("mine")
    before = digest(out)
    refused(
        cli(capsys, "convert", str(src), "--tp", "4", "--out", str(out), "--overwrite"),
        "rank-00003-of-00004.safetensors: was not written by npu-parallel and this run would replace it",
    )
    assert digest(out) == before


def test_remerge_keeps_files_the_user_added_unless_clean(capsys, src, tmp_path):
    tp, hf = tmp_path / "tp", tmp_path / "hf"
    _convert(capsys, src, tp)
    assert cli(capsys, "merge", str(tp), "--out", str(hf), "-q")[0] == 0
    (hf / "README.md").write_text("model card")
    (hf / "tokenizer.json").write_text('{"mine": true}')
    code, out, _ = cli(capsys, "merge", str(tp), "--out", str(hf), "--overwrite", "-q")
    assert code == 0 and "kept tokenizer.json" in out
    assert (hf / "README.md").read_text() == "model card" and (hf / "tokenizer.json").read_text() == '{"mine": true}'
    mark = json.loads((hf / "npu_parallel.json").read_text())
    assert "README.md" not in mark["files"] and "tokenizer.json" not in mark["files"]
    ours = {p.name for p in hf.iterdir()} - {"README.md", "tokenizer.json", "npu_parallel.json"}
    assert sorted(mark["files"]) == sorted(ours)
    assert _siblings(hf) == []
    assert cli(capsys, "merge", str(tp), "--out", str(hf), "--overwrite", "--clean", "-q")[0] == 0
    assert not (hf / "README.md").exists() and not (hf / "tokenizer.json").exists()


def test_a_folder_merged_before_the_marker_listed_its_files_is_recognised(capsys, src, tmp_path):
    tp, hf = tmp_path / "tp", tmp_path / "hf"
    _convert(capsys, src, tp)
    assert cli(capsys, "merge", str(tp), "--out", str(hf), "-q")[0] == 0
    old_marker = {"written_by": "npu-parallel merge", "source": str(tp), "source_tp": 2, "tensors": 1}
    (hf / "npu_parallel.json").write_text(json.dumps(old_marker))  # as npu_parallel 0.1.0 wrote it
    (hf / "special_tokens_map.json").write_text("{}")
    assert cli(capsys, "merge", str(tp), "--out", str(hf), "--overwrite", "-q")[0] == 0
    assert (hf / "special_tokens_map.json").read_text() == "{}"
    assert "files" in json.loads((hf / "npu_parallel.json").read_text())


def test_a_partial_folder_that_is_not_ours_is_never_deleted(capsys, src, tmp_path):
    out = tmp_path / "o"
    (tmp_path / "o.partial").mkdir()
    (tmp_path / "o.partial" / "thesis.txt").write_text("four years of work")
    refused(
        cli(capsys, "convert", str(src), "--tp", "2", "--out", str(out)),
        "o.partial: holds thesis.txt, which npu-parallel does not write",
    )
    assert (tmp_path / "o.partial" / "thesis.txt").read_text() == "four years of work"


# -- disk full, unwritable -------------------------------------------------------------------------------

FSIZE_LIMIT = 16 * 1024  # bytes: less than the first rank file or shard, more than any file Python needs to write


def _limit_file_size():
    """In the child: write() beyond FSIZE_LIMIT bytes fails with EFBIG (SIGXFSZ ignored), as a full disk fails
    with ENOSPC; a real short write at the system-call level, no root or tmpfs needed."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, hard))


def _run_limited(*argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "npu_parallel", *argv],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_file_size,
        timeout=300,
    )


def _error_line(err: str) -> str:
    """The one error line (log lines aside: INFO progress, the merge's 'no tokenizer' warning); no traceback."""
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_disk_full_is_one_line_exit_2_and_leaves_nothing(capsys, src, tmp_path, command):
    out = tmp_path / "out"
    argv = ["convert", str(src), "--tp", "2", "--out", str(out), "-q"]
    if command == "merge":
        _convert(capsys, src, tmp_path / "tp")
        argv = ["merge", str(tmp_path / "tp"), "--out", str(out), "-q"]
    r = _run_limited(*argv)
    assert r.returncode == 2, r.stderr
    line = _error_line(r.stderr)
    assert line.startswith(f"npu-parallel {command}: error: {out}: disk full writing {out}.partial/")
    assert "[Errno 27] File too large" in line and "choose another --out" in line
    assert not out.exists() and _siblings(out) == []


def test_disk_full_while_replacing_keeps_the_previous_output(capsys, src, tmp_path):
    tp, hf = tmp_path / "tp", tmp_path / "hf"
    _convert(capsys, src, tp)
    assert cli(capsys, "merge", str(tp), "--out", str(hf), "-q")[0] == 0
    (hf / "README.md").write_text("model card")
    before = digest(hf)
    r = _run_limited("merge", str(tp), "--out", str(hf), "--overwrite", "-q")
    assert r.returncode == 2 and "disk full writing" in _error_line(r.stderr)
    assert digest(hf) == before and _siblings(hf) == []


def _unwritable_targets(tmp_path: Path) -> dict[str, Path]:
    """Real refusals by the kernel. Root (as in CI) writes into a mode-0o555 folder anyway, so that one is
    used only when not root; for root too: a path under /sys (sysfs refuses mkdir: EPERM, or EROFS where it is
    mounted read-only), under /proc (ENOENT) and below a regular file standing where a folder should be (ENOTDIR)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    targets = {
        "sysfs": Path("/sys/npu-parallel-test/out"),
        "proc": Path("/proc/npu-parallel-test/out"),
        "file-parent": blocker / "out",
    }
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o555)
        targets["mode-555"] = ro / "out"
    return targets


def test_unwritable_output_is_one_line_exit_2(capsys, src, tmp_path):
    _convert(capsys, src, tmp_path / "tp")
    for name, out in _unwritable_targets(tmp_path).items():
        for argv in (("convert", str(src), "--tp", "2"), ("merge", str(tmp_path / "tp"))):
            line = refused(cli(capsys, *argv, "--out", str(out)), f"{out}: cannot write", "choose another --out")
            if name in ("mode-555", "sysfs"):
                assert "read-only or not permitted" in line
            assert not out.exists()
