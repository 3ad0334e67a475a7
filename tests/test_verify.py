"""Verification tools: router discovery, `npu-parallel audit`, `npu-parallel verify`, `inspect --routing`.

Multi-rank cases launch torchrun themselves (one launch per tp size > 1); tp = 1 runs in this process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.convert.moe_blocks import NoMoEBlockError, find_moe_blocks
from npu_parallel.moe.router import router_outputs
from npu_parallel.parallel.state import single_rank_state
from npu_parallel.tools import cli
from npu_parallel.tools.audit_run import audit_summary
from npu_parallel.tools.jobs import run_jobs
from npu_parallel.tools.verify_report import Tolerances, evaluate, failures, format_table, tolerances_for

from .remote_deepseek import to_remote_layout


def _ref(path: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def tp2(checkpoints):
    """The tp=2 jobs of this file in ONE torchrun launch: verify v2 and v3 with backward, audit v2."""
    jobs = [
        {"task": "verify", "path": str(checkpoints / name), "kwargs": {"backward": True}}
        for name in ("deepseek_v2", "deepseek_v3")
    ]
    jobs.append({"task": "audit", "path": str(checkpoints / "deepseek_v2"), "kwargs": {}})
    v2, v3, audit = run_jobs(2, jobs)
    return {"deepseek_v2": v2, "deepseek_v3": v3, "audit": audit}


def _check_verify_result(res: dict) -> None:
    assert [r["kind"] for r in res["layers"]] == ["dense", "moe", "moe"]
    assert all(r["router_agree"] == 100.0 for r in res["layers"][1:])
    assert all(r["g_mlp"] is not None and r["g_mlp"] < 1e-4 for r in res["layers"])
    assert all(r["g_router"] is not None for r in res["layers"][1:])
    assert res["model"]["logits"] < 1e-4 and res["model"]["g_embed"] < 1e-4
    assert res["unmatched_params"] == []


# -- router discovery -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_find_moe_blocks_fused(checkpoints, name):
    model = _ref(checkpoints / name)
    blocks = find_moe_blocks(model)
    assert [b.path for b in blocks] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    b = blocks[0]
    assert (b.router_path, b.experts_path, b.shared_path) == (
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp.experts",
        "model.layers.1.mlp.shared_experts",
    )
    assert (b.layout, b.num_experts, b.num_local_experts, b.top_k, b.layer) == ("fused", 8, 8, 3, 1)
    assert b.router is model.model.layers[1].mlp.gate and b.shared is model.model.layers[1].mlp.shared_experts


def test_find_moe_blocks_converted_and_remote(checkpoints):
    conv = load_pretrained(checkpoints / "deepseek_v2", single_rank_state(), progress=False)
    blocks = find_moe_blocks(conv)
    assert [(b.layer, b.layout, b.num_experts, type(b.router).__name__) for b in blocks] == [
        (1, "fused", 8, "DeepseekV2TopkRouter"),
        (2, "fused", 8, "DeepseekV2TopkRouter"),
    ]

    remote = to_remote_layout(_ref(checkpoints / "deepseek_v2_remote"))
    blocks = find_moe_blocks(remote)
    assert [(b.layer, b.layout, b.num_experts, b.top_k, type(b.router).__name__) for b in blocks] == [
        (1, "modulelist", 8, 3, "MoEGate"),
        (2, "modulelist", 8, 3, "MoEGate"),
    ]
    remote.train()
    indices, weights, aux = router_outputs(blocks[0].router(torch.randn(2, 5, 64)))
    assert indices.shape == weights.shape == (10, 3) and not indices.is_floating_point() and aux.numel() == 1


class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(8, 4), nn.Linear(4, 8), nn.Linear(8, 4)


class _SparseBlock(nn.Module):
    """transformers 4.x Mixtral: block_sparse_moe with an nn.Linear gate and a ModuleList of experts."""

    def __init__(self):
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList(_Expert() for _ in range(4))


def test_find_moe_blocks_mixtral_4x_tree():
    """The Mixtral plan's block_sparse_moe rule finds transformers 4.x's layout (nn.Linear gate, ModuleList)."""
    from transformers import MixtralConfig

    model = nn.Module()
    model.config = MixtralConfig(num_local_experts=4, num_experts_per_tok=2)
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    for _ in range(2):
        layer = nn.Module()
        layer.self_attn = nn.Linear(8, 8)
        layer.block_sparse_moe = _SparseBlock()
        model.model.layers.append(layer)
    blocks = find_moe_blocks(model)
    assert [(b.path, b.router_path, b.layout, b.num_experts, b.top_k, b.shared) for b in blocks] == [
        (f"model.layers.{i}.block_sparse_moe", f"model.layers.{i}.block_sparse_moe.gate", "modulelist", 4, 2, None)
        for i in range(2)
    ]
    assert router_outputs(torch.zeros(3, 4)) == (None, None, None)  # a plain linear gate: logits only


def test_find_moe_blocks_explains_when_none(checkpoints):
    llama = _ref(checkpoints / "llama")
    assert find_moe_blocks(llama, required=False) == []
    with pytest.raises(
        NoMoEBlockError,
        match=r"^no MoE block found in LlamaForCausalLM: its plan \(Llama/Qwen2 \(dense\)\) "
        r"is dense",
    ):
        find_moe_blocks(llama)
    mixtral = _ref(checkpoints / "mixtral")
    for layer in mixtral.model.layers:
        layer.mlp = nn.Identity()
    with pytest.raises(NoMoEBlockError) as err:
        find_moe_blocks(mixtral)
    msg = str(err.value)
    assert msg.startswith(
        "no MoE block found in MixtralForCausalLM: its plan (Mixtral) looks for "
        "model.layers.*.block_sparse_moe with `gate` and `experts` children"
    ), msg
    assert msg.endswith("saw: model.layers.*.mlp = Identity"), msg


# -- audit ----------------------------------------------------------------------------------------------


def test_audit_converted_tp1_and_tp2_clean(checkpoints, capsys, tp2):
    path = str(checkpoints / "deepseek_v2")
    assert cli.main(["audit", path]) == 0
    out, err = capsys.readouterr()
    assert "converted, tp=1" in out and "0 banned ops" in out and out.rstrip().endswith("-> CLEAN")
    assert err.startswith("npu-parallel audit: tp=1: auditing one forward and backward in this process\n"), err
    assert re.search(r"^npu-parallel audit: tp=1: done in \d+\.\d s$", err, re.M), err
    line, banned = audit_summary(tp2["audit"])
    assert banned == 0 and "converted, tp=2" in line and "2 ranks, all the same" in line, line
    assert re.search(r"^allreduce\s+collective\s+\d+\s+\S+collectives\.py:\d+$", tp2["audit"][0]["table"], re.M)


def test_audit_unconverted_eager_reports_nonzero_line(checkpoints, capsys, tmp_path):
    out_json = tmp_path / "audit.json"
    rc = cli.main(
        [
            "audit",
            str(checkpoints / "deepseek_v2"),
            "--unconverted",
            "--experts_implementation",
            "eager",
            "--json",
            str(out_json),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1 and "BANNED OPS FOUND" in out
    events = json.loads(out_json.read_text())["ranks"][0]["events"]
    nonzero = [e for e in events if e["kind"] == "banned" and e["op"] == "aten.nonzero.default"]
    assert nonzero
    modeling = Path(transformers.__file__).parent / "models" / "deepseek_v2" / "modeling_deepseek_v2.py"
    lines = modeling.read_text().splitlines()
    explicit = 0
    for e in nonzero:
        file, line = e["where"].rsplit(":", 1)
        assert Path(file).resolve() == modeling.resolve()
        text = lines[int(line) - 1]
        assert "nonzero" in text or "torch.where(" in text  # single-argument torch.where is nonzero
        explicit += "nonzero" in text
    assert explicit, "the explicit .nonzero() line of DeepseekV2Experts.forward"
    assert f"modeling_deepseek_v2.py:{lines.index(next(t for t in lines if '.nonzero()' in t)) + 1}" in out


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_audit_unconverted_fused_implementations(checkpoints, capsys, impl):
    """transformers' fused experts: no nonzero, no host sync; what the audit bans is DeepSeek-V2's complex64 rotary
    and grouped_mm's sort of int64 expert ids (transformers/integrations/moe.py)."""
    assert cli.main(["audit", str(checkpoints / "deepseek_v2"), "--unconverted", "--experts_implementation", impl]) == 1
    out = capsys.readouterr().out
    assert f"experts_implementation={impl}" in out and "0 host syncs" in out
    banned = [line for line in out.splitlines() if " banned " in line and "banned ops" not in line]
    assert banned and all("[complex64]" in line or "[int64 keys]" in line for line in banned), out
    assert any("aten.polar.default [complex64]" in line and "modeling_deepseek_v2.py" in line for line in banned)
    assert any("aten.sort" in line and "integrations/moe.py" in line for line in banned) == (impl == "grouped_mm")


def test_audit_bad_input(checkpoints, tmp_path, capsys):
    path = str(checkpoints / "deepseek_v2")
    assert cli.main(["audit", path, "--unconverted", "--tp", "2"]) == 2
    assert cli.main(["audit", path, "--experts_implementation", "eager"]) == 2
    assert cli.main(["audit", path, "--tp", "3"]) == 2
    assert cli.main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "tp_size=3 must divide the attention heads" in err and "config.json: missing" in err


# -- verify ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_verify_passes(checkpoints, capsys, tmp_path, tp2, name):
    out_json, png = tmp_path / "v.json", tmp_path / "v.png"
    rc = cli.main(
        ["verify", str(checkpoints / name), "--tp", "1", "--backward", "--json", str(out_json), "--plot", str(png)]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.rstrip().splitlines()[-1].startswith("PASSED: tp 1:")
    assert png.stat().st_size > 1000
    assert sum("<- worst" in line for line in out.splitlines()) == 1
    report = json.loads(out_json.read_text())
    assert report["passed"] and set(report["results"]) == {"1"}
    _check_verify_result(report["results"]["1"])
    # tp=2 from the shared launch
    _check_verify_result(tp2[name])
    assert evaluate({2: tp2[name]}, tolerances_for("float32")) == []


def test_verify_names_the_broken_layer(checkpoints, capsys):
    rc = cli.main(["verify", str(checkpoints / "deepseek_v2"), "--tp", "2", "--_perturb-expert", "1:2"])
    out, err = capsys.readouterr()
    assert rc == 1
    # progress on stderr, per rank as it starts and finishes; the table stays alone on stdout
    lines = err.splitlines()
    assert lines[0] == "npu-parallel verify: tp=2: comparing with transformers on 2 ranks", err
    for r in (0, 1):
        assert lines.index(f"npu-parallel verify: tp=2: rank {r} started") < lines.index(
            f"npu-parallel verify: tp=2: rank {r} finished"
        )
    assert re.match(r"npu-parallel verify: tp=2: done in \d+\.\d s$", lines[-1]), err
    assert "npu-parallel" not in out
    assert re.search(r"^FAILED: tp=2 layer 2 moe_out max diff \S+ > 1e-04", out, re.M), out
    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"^\d\s", line)}
    assert "<- worst" in rows["2"]


def test_verify_failure_order_and_table():
    """Forward figures first (layer order), gradients in backward order: the first names the root cause."""
    tol = Tolerances(1e-4, 1e-4, 100.0)
    layers = [
        dict(
            layer=i,
            kind=k,
            attn_out=0.0,
            mlp_out=0.0,
            router_agree=a,
            router_w=0.0,
            aux=None,
            g_attn=g,
            g_mlp=g,
            g_router=None,
            g_norm=g,
        )
        for i, (k, a, g) in enumerate([("dense", None, 0.0), ("moe", 100.0, 0.0), ("moe", 87.5, 1.0)])
    ]
    result = dict(
        tp=4,
        layers=layers,
        model=dict(logits=0.5, loss=0.0, aux_loss=None, g_embed=1.0, g_final_norm=0.0, g_lm_head=1.0),
        model_type="deepseek_v3",
        dtype="float32",
        batch=[2, 16],
        moe_impl="grouped",
        backward=True,
    )
    f = failures(result, tol)
    assert f[0] == "tp=4 layer 2 router_agree 87.50% < 100%"
    assert f[1] == "tp=4 logits max diff 5.0e-01 > 1e-04"
    assert f[2] == "tp=4 g_lm_head max diff 1.0e+00 > 1e-04"
    assert f[3].startswith("tp=4 layer 2 g_attn") and f[-1].startswith("tp=4 g_embed")
    table = format_table(result, tol)
    assert "87.5%" in table and table.splitlines()[4].endswith("<- worst")


def test_verify_bad_input(checkpoints, capsys):
    path = str(checkpoints / "deepseek_v2")
    assert cli.main(["verify", path, "--tp", "1,3"]) == 2
    assert cli.main(["verify", path, "--tp", "two"]) == 2
    assert cli.main(["verify", path, "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "tp_size=3" in err and "comma-separated" in err and "int8" in err


# -- inspect --routing ----------------------------------------------------------------------------------


def test_inspect_routing(checkpoints, capsys, tmp_path):
    text = tmp_path / "sample.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    png = tmp_path / "routing.png"
    assert (
        cli.main(["inspect", str(checkpoints / "deepseek_v3"), "--routing", "--data", str(text), "--plot", str(png)])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(f"routing on 128 tokens of {text} (bytes)")  # 180 bytes, max_position_embeddings 128
    rows = [line.split() for line in out.splitlines() if re.match(r"^\d\s", line)]
    assert [r[0] for r in rows] == ["1", "2"]
    for r in rows:
        counts = [int(c) for c in r[8:]]
        assert len(counts) == 8 and sum(counts) == 128 * 3
        assert (int(r[3]), int(r[4])) == (min(counts), max(counts))
        assert float(r[6]) == pytest.approx(max(counts) / (128 * 3 / 8), abs=0.01)
    assert png.stat().st_size > 1000

    assert cli.main(["inspect", str(checkpoints / "deepseek_v2"), "--routing", "--json", "--tokens", "20"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == "20 random token ids (seed 0)" and [r["layer"] for r in report["layers"]] == [1, 2]

    assert cli.main(["inspect", str(checkpoints / "llama"), "--routing"]) == 2
    assert "no MoE block found" in capsys.readouterr().err
