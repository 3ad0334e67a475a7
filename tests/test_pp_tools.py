"""`npu-parallel verify --pp` and `audit --pp` (issue 22 pt 6): the stages' layers against transformers' unsplit
model, the op audit of one pipelined step per stage with its P2P sends, and bad pipeline layouts.

Every rank job runs in ONE launch of 2 ranks (tp 1 x pp 2, :func:`npu_parallel.tools.jobs.run_jobs`); the CLI tests
serve the verbs those results instead of launching again.
"""

from __future__ import annotations

import json
import re

import pytest

from npu_parallel.tools import cli
from npu_parallel.tools.audit_run import audit_summary, stage_lines
from npu_parallel.tools.jobs import run_jobs
from npu_parallel.tools.verify_report import evaluate, failures, format_table, tolerances_for

from .models import VARIANTS

MICRO = 4  # the audited 1F1B step's micro-batches
VERIFIED = [n for n in ("deepseek_v2", "qwen3_moe") if n in VARIANTS]


@pytest.fixture(scope="module")
def pp2(checkpoints):
    """verify (backward) of each model at pp 2, verify with a fault in layer 2 (stage 1), audit: one launch."""
    jobs = [{"task": "verify", "path": str(checkpoints / n), "kwargs": {"backward": True}} for n in VERIFIED]
    faulty = {"backward": True, "perturb": "0:2"}  # tp rank 0's routed experts of layer 2
    jobs.append({"task": "verify", "path": str(checkpoints / "deepseek_v2"), "kwargs": faulty})
    jobs.append({"task": "audit", "path": str(checkpoints / "deepseek_v2"), "kwargs": {"grad_accum": MICRO}})
    *verified, broken, audit = run_jobs(1, jobs, pp=2)
    return {"verify": dict(zip(VERIFIED, verified, strict=True)), "broken": broken, "audit": audit}


@pytest.mark.parametrize("name", VERIFIED)
def test_verify_pp2_every_stage_matches_the_unsplit_model(pp2, name):
    res = pp2["verify"][name]
    assert (res["tp"], res["pp"]) == (1, 2)
    assert evaluate({(1, 2): res}, tolerances_for("float32")) == [], format_table(res, tolerances_for("float32"))
    # every layer was run by one stage and compared, forward and backward (gradients gathered from both stages)
    stages = res["stages"]
    assert [s["stage"] for s in stages] == [0, 1] and stages[0]["layers"][0] == 0
    assert stages[0]["layers"][1] == stages[1]["layers"][0] and stages[1]["layers"][1] == len(res["layers"])
    assert {r["stage"] for r in res["layers"]} == {0, 1}
    for r in res["layers"]:
        assert r["attn_out"] is not None and r["mlp_out"] is not None and r["g_attn"] is not None, r
    assert all(r["router_agree"] == 100.0 for r in res["layers"] if r["kind"] == "moe")
    model = res["model"]
    assert model["logits"] < 1e-4 and model["loss"] < 1e-5
    assert model["g_embed"] is not None and model["g_lm_head"] is not None
    assert res["unmatched_params"] == []
    table = format_table(res, tolerances_for("float32"))
    assert table.splitlines()[0].startswith("tp=1 pp=2  ")
    assert re.match(
        r"stages \(1f1b, 2 micro-batches\): 0 = layers? 0.* \+ embedding \| 1 = .* \+ norm, head$",
        table.splitlines()[1],
    )


def test_verify_pp2_names_the_broken_layer_and_its_stage(pp2):
    res = pp2["broken"]
    found = failures(res, tolerances_for("float32"))
    assert found and found[0].startswith("tp=1 pp=2 layer 2 moe_out max diff"), found
    assert res["layers"][2]["stage"] == 1
    assert all(r["mlp_out"] < 1e-4 for r in res["layers"][:2])  # the layers before it still agree


def test_audit_pp2_no_banned_op_and_p2p_sends_per_step(pp2):
    ranks = pp2["audit"]
    by_stage = {r["stage"]["stage"]: r for r in ranks}
    assert sorted(by_stage) == [0, 1]
    line, banned = audit_summary(ranks)
    assert banned == 0 and line.endswith("-> CLEAN") and "pp=2" in line, line
    first, last = by_stage[0]["stage"], by_stage[1]["stage"]
    # 1F1B over m micro-batches at pp 2: m activation sends from stage 0, m gradient sends from stage 1
    assert (first["activation_sends"], first["gradient_sends"]) == (MICRO, 0)
    assert (last["activation_sends"], last["gradient_sends"]) == (0, MICRO)
    hidden = f"float32[2, 16, {VARIANTS['deepseek_v2'][2]['hidden_size']}]"
    assert first["p2p"][f"recv from 1 {hidden}"] == MICRO and last["p2p"][f"recv from 0 {hidden}"] == MICRO
    lines = stage_lines(ranks)
    assert len(lines) == 2 and lines[0].startswith("stage 0 (rank 0: layers 0-1 + embedding): 0 banned ops")
    assert f"{MICRO} activation sends, 0 gradient sends per 1f1b step of {MICRO} micro-batches" in lines[0]
    assert f"0 activation sends, {MICRO} gradient sends" in lines[1]
    assert re.search(rf"^send to 0 {re.escape(hidden)}\s+collective\s+{MICRO}\s", by_stage[1]["table"], re.M)


def test_verify_and_audit_cli_at_pp2(pp2, checkpoints, monkeypatch, capsys, tmp_path):
    """The verbs' wiring at --pp 2 (the launches they ask for, the report), served the fixture's results."""
    asked = []

    def served(tp, jobs, progress=None, pp=1, **kw):
        asked.append((tp, pp, jobs[0]["task"], jobs[0]["kwargs"].get("grad_accum")))
        if jobs[0]["task"] == "audit":
            return [pp2["audit"]]
        return [pp2["broken"] if jobs[0]["kwargs"].get("perturb") else pp2["verify"]["deepseek_v2"]]

    monkeypatch.setattr("npu_parallel.tools.verify.run_jobs", served)
    monkeypatch.setattr("npu_parallel.tools.audit_run.run_jobs", served)
    path, out_json = str(checkpoints / "deepseek_v2"), tmp_path / "v.json"
    assert cli.main(["verify", path, "--tp", "1", "--pp", "2", "--backward", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("PASSED: tp=1 pp=2: every layer"), out
    assert "stages (1f1b, 2 micro-batches)" in out
    assert set(json.loads(out_json.read_text())["results"]) == {"tp1_pp2"}
    assert cli.main(["verify", path, "--tp", "1", "--pp", "2", "--_perturb-expert", "0:2"]) == 1
    assert re.search(r"^FAILED: tp=1 pp=2 layer 2 moe_out", capsys.readouterr().out, re.M)
    assert cli.main(["audit", path, "--pp", "2", "--grad_accum", str(MICRO)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stage 0 (rank 0):\n") and "\nstage 1 (rank 1):\n" in out and "-> CLEAN" in out
    assert asked == [(1, 2, "verify", None), (1, 2, "verify", None), (1, 2, "audit", MICRO)]


def test_bad_pipeline_layouts_one_line_before_any_rank(checkpoints, monkeypatch, capsys):
    path = str(checkpoints / "deepseek_v2")  # 3 decoder layers

    def no_launch(*a, **k):
        raise AssertionError("a rank started")

    monkeypatch.setattr("npu_parallel.tools.jobs.launch", no_launch)
    cases = [
        (["verify", path, "--pp", "4"], "--pp 4: the model has 3 decoder layers and every pipeline stage needs"),
        (["audit", path, "--pp", "4"], "--pp 4: the model has 3 decoder layers"),
        (["verify", path, "--pp", "1,two"], "--pp '1,two': expected comma-separated integers"),
        (["audit", path, "--pp", "0"], "--pp 0: must be a positive integer"),
        (["audit", path, "--pp", "2", "--grad_accum", "1"], "--grad_accum 1: a 1F1B step at pp 2 needs at least 2"),
        (["audit", path, "--pp", "2", "--unconverted"], "use --pp 1"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    # inside torchrun: the world fixes the layout
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["verify", path, "--pp", "3"]) == 2
    assert "pp_size=3 must be a positive divisor of the world size 4" in capsys.readouterr().err
    assert cli.main(["audit", path, "--tp", "1", "--pp", "2"]) == 2
    assert "--pp 2 runs at tp 2 (world = tp x pp)" in capsys.readouterr().err
