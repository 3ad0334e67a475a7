"""Checkpoints across (tp, ep) layouts at world 4: written at one, loaded at another, exact resume at ep > tp."""

from __future__ import annotations

import pytest

from .dist import run_ranks

TOL = 1e-5


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_ckpt")
    return run_ranks(4, "tests.ep_checkpoint_worker:layouts", str(checkpoints / "deepseek_v3"), str(out))


def test_saved_at_one_layout_loads_at_another(results):
    loads = {k: v for k, v in results.items() if "->" in k or k.startswith("load_pretrained")}
    assert len(loads) == 11
    assert all(v < TOL for v in loads.values()), loads
    # one file per ep rank
    assert results["files"] == [f"rank-0000{r}-of-00004.safetensors" for r in range(4)]


def test_merge_of_an_ep_checkpoint(results):
    assert results["merged"] < TOL


def test_exact_resume_at_ep_above_tp(results):
    assert results["resume extra"] == {"step": 1}
    assert results["resume loss"] == results["resume expected"]
    assert "ep=4; resume with the same layout (now world=4, tp=2, ep=2)" in results["resume at another ep"]


def test_offline_convert_at_ep_is_inspected(checkpoints, tmp_path):
    """`npu-parallel convert --tp 1 --ep 4`: four rank files, the manifest says ep 4, inspect shows it."""
    from npu_parallel.checkpoint.inspect import format_report, inspect_checkpoint
    from npu_parallel.tools.cli import main

    out = tmp_path / "ep4"
    assert main(["convert", str(checkpoints / "deepseek_v3"), "--tp", "1", "--ep", "4", "--out", str(out), "-q"]) == 0
    report = inspect_checkpoint(out)
    assert (report["sharded_tp"], report["sharded_ep"], len(report["files"])) == (1, 4, 4)
    assert "tp=1, ep=4 (4 rank files)" in format_report(report)
    bad = ["convert", str(checkpoints / "deepseek_v3"), "--tp", "2", "--ep", "3", "--out", str(tmp_path / "x")]
    assert main(bad) == 2  # ep not a multiple of tp: one line, exit 2
