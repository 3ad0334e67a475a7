"""DeepSeek's published remote code (auto_map + modeling_deepseek.py): opt-in, converted and loaded exactly.

The refusal and the head-attribute check need nothing else; the rest runs DeepSeek's own files from
``NPU_PARALLEL_UPSTREAM_DIR`` (tests/upstream.py says the layout) and skips, saying why, when it is unset.
That code imports modules transformers 5 removed: under 5.x it is expected to fail with one clear line,
and ``make test-compat`` runs the equivalence under transformers 4.51 and 4.57.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from torch import nn

from npu_parallel.checkpoint.hf_source import load_config
from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.checkpoint.remote_code import ENV, RemoteCodeError, has_native_class
from npu_parallel.convert.styles import GQAttention, ShardHeads
from npu_parallel.hf_compat import TRANSFORMERS
from npu_parallel.parallel.state import single_rank_state

from .dist import run_ranks
from .test_cli_input import run_cli
from .upstream import CONFIGS, build_native_with_auto_map, build_remote_checkpoint, missing_upstream

TF5 = TRANSFORMERS >= (5, 0)
NOT_ON_TF5 = "DeepSeek's published code imports transformers.modeling_attn_mask_utils, gone in 5.x: make test-compat"


def need_upstream(*names: str) -> None:
    for name in names:
        if why := missing_upstream(name):
            pytest.skip(why)


@pytest.fixture(autouse=True)
def no_env_opt_in(monkeypatch):
    """Nothing trusts remote code unless the test says so (and the CLI's setting of it is undone after)."""
    monkeypatch.setenv(ENV, "0")


@pytest.fixture(scope="module")
def remote_root(tmp_path_factory):
    """Tiny checkpoints built and saved by the published code, one per model (transformers 4.x only)."""
    need_upstream(*CONFIGS)
    if TF5:
        pytest.skip(NOT_ON_TF5)
    root = tmp_path_factory.mktemp("upstream")
    for name in CONFIGS:
        build_remote_checkpoint(name, root / name)
    return root


# --------------------------------------------------------------------------- no upstream files needed


def test_remote_code_is_refused_without_the_flag(tmp_path, capsys):
    """DeepSeek-MoE 16B (model_type deepseek): no transformers class, so only its own code could build it."""
    import json

    path = tmp_path / "deepseek-moe"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(CONFIGS["deepseek_moe"]))
    assert not has_native_class("deepseek")
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        load_pretrained(path, single_rank_state())
    with pytest.raises(RemoteCodeError, match="--trust_remote_code"):
        load_config(path)
    for argv in (["inspect", str(path)], ["convert", str(path), "--tp", "2", "--out", str(tmp_path / "out")]):
        code, _, err = run_cli(capsys, argv)
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "--trust_remote_code" in err and "deepseek" in err, err
    assert not (tmp_path / "out").exists()


class _OldAttention(nn.Module):
    """DeepSeek-MoE 16B's attention, reduced to what matters here: the output reshaped with self.hidden_size."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim, self.hidden_size = heads, head_dim, heads * head_dim
        self.num_key_value_heads = self.num_key_value_groups = heads
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(self.hidden_size, self.hidden_size, bias=False))

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        return self.o_proj(q.reshape(b, s, self.hidden_size))


def test_head_attributes_the_forward_reads_are_divided_or_refused():
    ctx = types.SimpleNamespace(tp=types.SimpleNamespace(size=2, rank=0))
    with pytest.raises(ValueError, match=r"self\.hidden_size = 64.*ShardHeads"):
        ShardHeads(("num_heads",)).apply(_OldAttention(4, 16), ctx, "model.layers.0.self_attn")
    ok = ShardHeads(("num_heads", "hidden_size")).apply(_OldAttention(4, 16), ctx, "model.layers.0.self_attn")
    assert (ok.num_heads, ok.hidden_size) == (2, 32)


def test_gq_attention_divides_the_output_width():
    """GQAttention divides hidden_size where it is the attention output's width (the old Llama-style code)."""
    from npu_parallel.parallel.state import Group

    config = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=4, hidden_size=64)
    group = Group(size=1, rank=0, group=None)
    module = GQAttention().apply(_OldAttention(4, 16), types.SimpleNamespace(tp=group, config=config), "attn")
    assert module.hidden_size == 64 and module.num_heads == 4  # tp 1: nothing divided, nothing refused
    x = torch.randn(2, 3, 64)
    assert module(x).shape == (2, 3, 64)


# ------------------------------------------------------------------------- with DeepSeek's own files


@pytest.mark.skipif(not has_native_class("deepseek_v2"), reason="this transformers has no DeepSeek-V2 class")
def test_native_class_unless_the_remote_code_is_asked_for(tmp_path, caplog):
    need_upstream("deepseek_v2")
    path = build_native_with_auto_map(tmp_path / "v2")
    with caplog.at_level(logging.WARNING, logger="npu_parallel.checkpoint.remote_code"):
        native = load_pretrained(path, single_rank_state(), dtype=torch.float32, progress=False)
    assert type(native).__module__.startswith("transformers.models.deepseek_v2"), type(native)
    assert "pass trust_remote_code=True" in caplog.text
    if TF5:
        with pytest.raises(RemoteCodeError, match="fails under transformers 5"):
            load_pretrained(path, single_rank_state(), trust_remote_code=True)
        return
    remote = load_pretrained(path, single_rank_state(), dtype=torch.float32, progress=False, trust_remote_code=True)
    assert type(remote).__module__.startswith("transformers_modules"), type(remote)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():  # same weights, same eval-mode math: the two classes agree
        assert torch.allclose(native(input_ids=ids).logits, remote(input_ids=ids).logits, atol=1e-5)


@pytest.mark.skipif(has_native_class("deepseek_v2"), reason="this transformers has a DeepSeek-V2 class")
def test_v2_needs_the_flag_where_transformers_has_no_class(tmp_path):
    """transformers < 4.56 has no DeepSeek-V2: the published checkpoint loads only with its own code."""
    import json

    path = tmp_path / "v2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(CONFIGS["deepseek_v2"]))
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        load_config(path)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_published_code_converted_and_loaded_match_it(remote_root, tp):
    """convert_model and load_pretrained on models built by DeepSeek's own code (V2-Lite, V3, MoE 16B)."""
    names = ["deepseek_v2", "deepseek_v3", "deepseek_moe", "deepseek_moe:eager"]
    got = run_ranks(tp, "tests.upstream_worker:compare", str(remote_root), names, tp)
    for name in names:
        for how, diffs in got[name].items():
            if how == "class":
                assert diffs == "transformers_modules", (name, diffs)
                continue
            for what, diff in diffs.items():
                assert diff < 1e-4, f"{name} {how} tp={tp}: {what} differs by {diff}"


def test_cli_runs_the_published_code_with_the_flag(remote_root, tmp_path, capsys):
    path = remote_root / "deepseek_moe"
    code, out, err = run_cli(capsys, ["inspect", str(path), "--trust_remote_code"])
    assert code == 0, err
    assert "deepseek" in out
    code, out, err = run_cli(
        capsys, ["convert", str(path), "--tp", "2", "--out", str(tmp_path / "tp2"), "-q", "--trust_remote_code"]
    )
    assert code == 0, err
    code, out, err = run_cli(capsys, ["verify", str(path), "--tp", "1,2", "--trust_remote_code"])
    assert code == 0, err + out


def test_published_code_saved_resumed_and_merged(remote_root, tmp_path, capsys):
    """DeepSeek-MoE 16B's own code kept by save_sharded and `convert`, run by load_sharded only with the flag,
    and written by `merge` so that from_pretrained(trust_remote_code=True) loads the merged folder bit-exact."""
    import json

    from transformers import AutoModelForCausalLM

    from npu_parallel.checkpoint.load import load_sharded
    from npu_parallel.checkpoint.save import save_sharded

    from .upstream import FILES

    path = remote_root / "deepseek_moe"
    state = single_rank_state()
    model = load_pretrained(path, state, dtype=torch.float32, progress=False, trust_remote_code=True)
    ckpt = save_sharded(model, tmp_path / "sharded", state)
    assert json.loads((ckpt / "manifest.json").read_text())["remote_code"]["files"] == sorted(FILES)
    with pytest.raises(RemoteCodeError, match="--trust_remote_code"):
        load_sharded(ckpt, state)
    loaded = load_sharded(ckpt, state, trust_remote_code=True)
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in loaded.named_parameters())

    reference = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()
    code, _, err = run_cli(capsys, ["convert", str(path), "--tp", "2", "--out", str(tmp_path / "tp2"), "-q"])
    assert code == 2 and "--trust_remote_code" in err, err
    code, _, err = run_cli(
        capsys, ["convert", str(path), "--tp", "2", "--out", str(tmp_path / "tp2"), "-q", "--trust_remote_code"]
    )
    assert code == 0, err
    for src in (ckpt, tmp_path / "tp2"):
        out = tmp_path / f"merged-{src.name}"
        code, _, err = run_cli(capsys, ["merge", str(src), "--out", str(out), "-q"])
        assert code == 0, err
        merged = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
        assert type(merged).__module__.startswith("transformers_modules")
        ours, theirs = merged.state_dict(), reference.state_dict()
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
