"""Upcycling: the MoE output equals the dense model at init (transformers and load_pretrained at tp 2),
memory stays bounded, the router is seeded, and bad requests are one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from npu_parallel.checkpoint.upcycle import upcycle_checkpoint
from npu_parallel.tools.cli import main

from .dist import run_ranks
from .models import _STD, VARIANTS, build_checkpoint

# (source, target, granularity, top_k, layers): E = 8 throughout
CASES = [
    (src, g, k, layers)
    for src in ("llama", "qwen2", "qwen3")
    for g, k, layers in ((1, 2, None), (2, 2, "1-2" if src != "llama" else None), (4, 4, None))
]


def _qwen3(path: Path) -> Path:
    torch.manual_seed(3)
    config = transformers.Qwen3Config(**_STD, num_key_value_heads=4, head_dim=16)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    out = {name: checkpoints / name for name in ("llama", "qwen2") if name in VARIANTS}
    for name in ("llama", "qwen2"):
        out.setdefault(name, build_checkpoint(name, root / name)) if name in VARIANTS else None
    out["qwen3"] = _qwen3(root / "qwen3")
    return out


@pytest.fixture(scope="module")
def upcycled(dense, tmp_path_factory) -> dict[tuple, Path]:
    root = tmp_path_factory.mktemp("upcycled")
    out = {}
    for src, g, k, layers in CASES:
        path = root / f"{src}_g{g}"
        upcycle_checkpoint(dense[src], path, experts=8, top_k=k, granularity=g, layers=layers, progress=False)
        out[(src, g, k, layers)] = path
    return out


def _logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-g{c[1]}-k{c[2]}")
def test_transformers_logits_equal_dense(dense, upcycled, case):
    src, _, _, layers = case
    path = upcycled[case]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == {"llama": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}[src]
    if layers:
        assert config["mlp_only_layers"] == [0]
    assert (_logits(path) - _logits(dense[src])).abs().max().item() < 1e-5


def test_load_pretrained_at_tp2_ep2_pp2_equals_dense(dense, upcycled, other):
    pairs = [(str(dense[c[0]]), str(p)) for c, p in upcycled.items()]
    pairs += [(str(d), str(m)) for d, m, _ in other.values()]  # DeepSeek-V2 and Mixtral-from-Mistral targets too
    layouts = [(2, 2, 1), (1, 2, 1), (1, 1, 2)]  # tp 2; ep 2 over dp 2; two pipeline stages
    diffs = run_ranks(2, "tests.upcycle_worker:compare", pairs, layouts)
    assert len(diffs) == 3 * (len(CASES) + len(other))
    assert max(diffs.values()) < 1e-5, diffs


def test_granular_layout_and_seeded_router(dense, upcycled, tmp_path):
    path = upcycled[("qwen2", 4, 4, None)]
    with safe_open(str(path / "model-00001-of-00001.safetensors"), "pt") as f:
        gate = f.get_tensor("model.layers.1.mlp.gate.weight")  # [E, H]: rows repeated per chunk group
        assert torch.equal(gate[0], gate[3]) and not torch.equal(gate[0], gate[4])
        e5 = f.get_tensor("model.layers.1.mlp.experts.5.gate_proj.weight")  # chunk 1 of copy 1
        assert e5.shape == (32, 64)
        assert torch.count_nonzero(f.get_tensor("model.layers.1.mlp.shared_expert_gate.weight")) == 0
    with safe_open(str(dense["qwen2"] / "model.safetensors"), "pt") as f:
        assert torch.equal(e5, f.get_tensor("model.layers.1.mlp.gate_proj.weight")[32:64])
    again = tmp_path / "again"
    other = tmp_path / "other"
    upcycle_checkpoint(dense["qwen2"], again, experts=8, top_k=4, granularity=4, progress=False)
    upcycle_checkpoint(dense["qwen2"], other, experts=8, top_k=4, granularity=4, seed=1, progress=False)
    key = "model.layers.1.mlp.gate.weight"
    read = [safe_open(str(p / "model-00001-of-00001.safetensors"), "pt").get_tensor(key) for p in (again, other)]
    assert torch.equal(read[0], gate) and not torch.equal(read[1], gate)
    marker = json.loads((again / "npu_parallel.json").read_text())["upcycle"]
    assert marker["seed"] == 0 and marker["router_std"] == 0.02 and marker["function_preserving"]
    assert (again / "tokenizer.json").exists() == (dense["qwen2"] / "tokenizer.json").exists()


def test_inexact_choice_is_named(dense, tmp_path, capsys, caplog):
    out = tmp_path / "nonorm"
    args = ["upcycle", str(dense["qwen3"]), "--out", str(out), "--experts", "4", "--top_k", "2", "-q"]
    assert main([*args, "--no_norm_topk_prob"]) == 0
    assert "norm_topk_prob=true" in caplog.text and "does NOT equal" in capsys.readouterr().out
    assert json.loads((out / "npu_parallel.json").read_text())["upcycle"]["function_preserving"] is False
    assert (_logits(out) - _logits(dense["qwen3"])).abs().max().item() > 1e-4
    assert main([*args, "--overwrite"]) == 0  # an earlier upcycle output is replaced with --overwrite
    assert "equals the dense model at init" in capsys.readouterr().out


@pytest.fixture
def mismatched(dense, tmp_path) -> Path:
    """A llama folder whose config claims another intermediate size than its weights."""
    path = tmp_path / "mismatched"
    path.mkdir()
    for f in dense["llama"].iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--experts", "6", "--top_k", "2", "--granularity", "4"], "not a multiple of --granularity"),
        (["--experts", "4", "--top_k", "5"], "larger than --experts"),
        (["--experts", "4", "--top_k", "2", "--layers", "1-2"], "cannot keep dense ones"),
        (["--experts", "4", "--top_k", "2", "--to", "qwen3_moe"], "does not fit qwen3_moe"),
        (["--experts", "4", "--top_k", "2", "--shared_experts", "1"], "has no shared experts"),
        (["--experts", "4", "--top_k", "2", "--out", "EXISTING"], "pass --overwrite"),
        (["--experts", "4", "--top_k", "2", "MISMATCHED"], "does not belong to these weights"),
        (["--experts", "4", "--top_k", "2", "MOE"], "upcycle reads dense"),
    ],
    ids=["e-not-multiple-of-g", "k-gt-e", "mixtral-layers", "wrong-target", "no-shared", "exists", "mlp-shape", "moe"],
)
def test_bad_input_one_line_exit_2(dense, checkpoints, mismatched, tmp_path, capsys, extra, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("x")
    source = str(dense["llama"])
    if "MISMATCHED" in extra:
        extra, source = [a for a in extra if a != "MISMATCHED"], str(mismatched)
    if "MOE" in extra:
        extra, source = [a for a in extra if a != "MOE"], str(checkpoints / "mixtral")
    out = ["--out", str(tmp_path / "out")] if "--out" not in extra else []
    extra = [str(existing) if a == "EXISTING" else a for a in extra]
    assert main(["upcycle", source, *out, *extra, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


PEAK_SCRIPT = """
import sys
from transformers import AutoConfig
from npu_parallel.checkpoint.upcycle import upcycle_checkpoint
AutoConfig.for_model("mixtral")
if len(sys.argv) > 1:
    upcycle_checkpoint(sys.argv[1], sys.argv[2], experts=2, top_k=2, granularity=2, progress=False)
# VmHWM: this process's own peak (ru_maxrss would carry the forking test process's peak across exec)
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024)
"""
FFN_MB = 3 * 1024 * 4096 * 4 / 2**20  # one layer's dense gate/up/down in fp32: 48 MiB


def _peak(*args: str) -> int:
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.strip().splitlines()[-1])


def test_peak_rss_is_bounded(tmp_path):
    """A ~260 MB Llama (4 layers of 48 MiB FFN): upcycling's peak RSS exceeds that of a process that only imports
    the same modules by at most 2.5 layers' FFN (it holds one layer's FFN and one expert's slices)."""
    from safetensors.torch import save_file

    src = tmp_path / "big"
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8
    )
    src.mkdir()
    config.save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, src / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    size = (src / "model.safetensors").stat().st_size
    assert size > 250e6
    peak = _peak(str(src), str(tmp_path / "out")) - _peak()
    print(f"peak RSS growth {peak / 2**20:.0f} MiB on a {size / 2**20:.0f} MiB source")
    assert peak < 2.5 * FFN_MB * 2**20, f"peak RSS grew {peak / 2**20:.0f} MiB on a {size / 2**20:.0f} MiB source"


def _dense_deepseek_v2(path: Path) -> Path:
    """A DeepSeek-V2 whose every layer is dense (first_k_dense_replace = the depth), MLA attention as published."""
    from .models import _BASE

    torch.manual_seed(5)
    config = transformers.DeepseekV2Config(**dict(_BASE, first_k_dense_replace=3, topk_method="greedy"))
    transformers.DeepseekV2ForCausalLM(config).save_pretrained(path)
    return path


def _mistral(path: Path) -> Path:
    torch.manual_seed(6)
    config = transformers.MistralConfig(**_STD, num_key_value_heads=2, sliding_window=None)
    transformers.MistralForCausalLM(config).save_pretrained(path)
    return path


OTHER = {
    "deepseek-plain": ("deepseek_v2", dict(experts=8, top_k=2)),
    "deepseek-shared-tail": ("deepseek_v2", dict(experts=8, top_k=2, layers="1-2")),
    "mistral-g2": ("mistral", dict(experts=4, top_k=2, granularity=2)),
}


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> dict[str, tuple[Path, Path, object]]:
    """The dense DeepSeek-V2 layout and Mistral sources, upcycled: name -> (dense, upcycled, requirements)."""
    root = tmp_path_factory.mktemp("other")
    out = {}
    for name, (source, options) in OTHER.items():
        if not hasattr(transformers, "DeepseekV2Config" if source == "deepseek_v2" else "MistralConfig"):
            continue
        dense = root / f"{source}_dense"
        if not dense.is_dir():
            (_dense_deepseek_v2 if source == "deepseek_v2" else _mistral)(dense)
        moe, req = upcycle_checkpoint(dense, root / name, progress=False, **options)
        out[name] = (dense, moe, req)
    return out


@pytest.mark.parametrize("name", list(OTHER))
def test_deepseek_and_mistral_sources_equal_dense(other, name):
    """The dense DeepSeek-V2 layout -> DeepSeek-V2 (zero router, routed_scaling_factor E/K, a shared expert holding
    the FFN; all layers or a tail MoE), and Mistral -> Mixtral granular: logits equal the dense model's."""
    source, options = OTHER[name]
    if name not in other:
        pytest.skip(f"{source} is not in this transformers")
    dense, out, req = other[name]
    assert req.exact()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"deepseek_v2": "deepseek_v2", "mistral": "mixtral"}[source]
    if source == "deepseek_v2":  # the shared expert holds the dense FFN (transformers' class always has one)
        assert config["n_shared_experts"] == 1 and config["routed_scaling_factor"] == 8 / 2
        assert config["first_k_dense_replace"] == (1 if "layers" in options else 0)
    assert (_logits(out) - _logits(dense)).abs().max().item() < 1e-5
