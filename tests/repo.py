"""The project's files as a fresh clone holds them, and a content hash of any folder (test helpers)."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CLUTTER = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "dist", "runs", "checkpoints", "logs"}


@functools.cache
def repo_files() -> frozenset[str]:
    """Relative paths of the files a fresh clone holds: what git tracks plus untracked files it does not ignore."""
    if (ROOT / ".git").exists():
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return frozenset(f for f in out.split("\0") if f and (ROOT / f).is_file())
    found = set()  # an exported tree without .git: everything but what .gitignore and the tools leave behind
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _CLUTTER and not d.endswith(".egg-info")]
        found.update(Path(top, n).relative_to(ROOT).as_posix() for n in names if not n.endswith(".pyc"))
    return frozenset(found)


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative path."""
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }
