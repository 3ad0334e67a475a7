"""examples/test_deepseek_moe.py, the seed's conversion smoke test, run as a user runs it: one process, then 2 ranks.

``make test-compat`` runs it under transformers 4.51 and 4.57 too (no DeepSeek-V2 class in 4.51: the tiny model is
then a DeepSeek-V3 of the same shape).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "test_deepseek_moe.py"


@pytest.mark.parametrize("ranks", [1, 2])
def test_conversion_smoke_test_passes(tmp_path, ranks):
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    argv = (launcher if ranks > 1 else [sys.executable]) + [str(EXAMPLE)]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "All tests passed!" in r.stdout and "TP conversion successful!" in r.stdout
    assert f"-> {64 // ranks} local experts" in r.stdout
