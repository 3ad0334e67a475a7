"""DeepSeek-V3 checkpoints as published: FP8 block-scaled weights dequantized per rank slice, and the MTP layer
kept (load, convert, merge, train, save) and trainable with the report's MTP objective."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from npu_parallel.checkpoint.hf_source import HFSource
from npu_parallel.checkpoint.inspect import inspect_checkpoint
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.parallel.shard_spec import ShardSpec
from npu_parallel.tools.cli import main

from .dist import run_ranks
from .published import build_published, mtp_keys, write_single

KEY = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    return build_published(tmp_path_factory.mktemp("published"))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_fp8_slices_cut_128_blocks(tmp_path):
    """A 300 x 200 weight in 128 x 128 blocks (partial edge blocks): any row or column range a tp split can ask
    for equals the dequantized reference, reading only its rows and the scale blocks that cover them."""
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    ref = write_single(tmp_path, KEY, weight, (128, 128))["dequantized"]
    with HFSource(tmp_path) as source:
        assert source.dtype(KEY) == torch.bfloat16  # what convert writes unless asked otherwise
        assert torch.equal(source.read(KEY, None), ref)
        for dim, start, stop in [(0, 0, 150), (0, 150, 300), (0, 100, 250), (1, 0, 100), (1, 50, 170), (1, 190, 200)]:
            source.bytes_read = 0
            got = source.read(KEY, ShardSpec(dim, start, stop, weight.shape[dim], stop - start))
            assert torch.equal(got, ref.narrow(dim, start, stop - start)), (dim, start, stop)
            other = weight.shape[1 - dim]
            blocks = -(-stop // 128) - start // 128
            assert source.bytes_read == (stop - start) * other + blocks * -(-other // 128) * 4
        assert source.keys_read == {KEY, KEY + "_scale_inv"}


def _edit_single(folder: Path, *, scale=None, config=None) -> None:
    if scale is not None:
        tensors = load_file(str(folder / "model.safetensors"))
        if scale == "drop":
            del tensors[KEY + "_scale_inv"]
        else:
            tensors[KEY + "_scale_inv"] = scale
        save_file(tensors, str(folder / "model.safetensors"))
    if config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config)
        if config.get("quantization_config") == "drop":
            del cfg["quantization_config"]
        (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (dict(scale="drop"), "has no model.layers.0.self_attn.o_proj.weight_scale_inv"),
        (dict(scale=torch.ones(2, 1)), "has shape [2, 1] but [300, 200] in [128, 128] blocks needs [3, 2]"),
        (dict(config={"quantization_config": {"quant_method": "awq"}}), "quant_method='awq' is not supported"),
        (dict(config={"quantization_config": "drop"}), "config.json has no quantization_config"),
    ],
)
def test_fp8_bad_input_is_an_error(tmp_path, edit, fragment):
    write_single(tmp_path, KEY, torch.randn(300, 200), (128, 128))
    _edit_single(tmp_path, **edit)
    with pytest.raises(CheckpointError, match=None) as err:
        with HFSource(tmp_path) as source:
            source.dtype(KEY)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_fp8_load_pretrained_matches_dequantized_model(published):
    """Logits of load_pretrained on the fp8 folder at tp 1 and 2 equal transformers' on the dequantized weights;
    the tiny model's 24 x 24 blocks are cut by the tp 2 splits."""
    diffs = run_ranks(2, "tests.mtp_worker:fp8_logits", str(published["fp8"]), str(published["plain"]), [1, 2])
    assert all(d < 1e-4 for d in diffs.values()), diffs


def test_convert_merge_fp8_and_mtp(published, tmp_path, capsys):
    """convert (streaming) + merge of the fp8 folder: a plain bf16-where-quantized HF folder without
    quantization_config, every key of the published layout (MTP included, its copies of embedding and head too),
    untouched tensors bit-exact; inspect counts bytes per rank as loaded."""
    conv, merged = tmp_path / "conv", tmp_path / "merged"
    assert main(["convert", str(published["fp8"]), "--tp", "2", "--out", str(conv), "-q"]) == 0
    assert main(["merge", str(conv), "--out", str(merged), "-q"]) == 0
    src, plain, out = _tensors(published["fp8"]), _tensors(published["plain"]), _tensors(merged)
    assert set(out) == set(plain)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    for key, t in out.items():
        if src[key].dtype == torch.float8_e4m3fn:
            assert t.dtype == torch.bfloat16 and torch.equal(t, plain[key].bfloat16()), key
        else:
            assert t.dtype == src[key].dtype and torch.equal(t, src[key]), key
    assert set(mtp_keys(3)) <= set(out)
    report = inspect_checkpoint(published["fp8"])
    by_rank = report["per_rank_bytes_estimate"]
    assert by_rank[1] == sum(t.numel() * (2 if t.dtype == torch.bfloat16 else 4) for t in out.values())


def test_mtp_roundtrip_bit_exact(published, tmp_path):
    """The unquantized folder: convert at tp 4, merge: every tensor, the MTP layer's included, bit-exact."""
    conv, merged = tmp_path / "conv", tmp_path / "merged"
    assert main(["convert", str(published["plain"]), "--tp", "4", "--out", str(conv), "-q"]) == 0
    manifest = json.loads((conv / "manifest.json").read_text())
    assert "model.layers.3.mlp.experts.gate_up_proj" in manifest["tensors"]
    assert manifest["tensors"]["model.layers.3.self_attn.q_b_proj.weight"]["split"]["dim"] == 0
    assert main(["merge", str(conv), "--out", str(merged), "-q"]) == 0
    src, out = _tensors(published["plain"]), _tensors(merged)
    assert set(out) == set(src) and all(torch.equal(out[k], src[k]) for k in src)
    from npu_parallel import init_distributed, load_sharded

    model = load_sharded(conv, init_distributed(1))  # resharded 4 -> 1, the MTP layer with it
    layer = model.model.layers[3]
    assert torch.equal(layer.eh_proj.weight, src["model.layers.3.eh_proj.weight"])
    assert torch.equal(layer.mlp.experts.down_proj[5], src["model.layers.3.mlp.experts.5.down_proj.weight"])


def test_mtp_gradient_matches_reference_tp_1_2_4(published):
    """With --mtp_loss_weight 0.3 the loss is main + 0.3 * L_MTP and every gradient (main and MTP parameters)
    equals the single-process reference written from the report's equations, at tp 1, 2, 4 (one launch),
    with gathered and with vocab-parallel logits."""
    res = run_ranks(4, "tests.mtp_worker:mtp_gradients", str(published["plain"]), 0.3, [1, 2, 4], [False, True])
    ref = res.pop("reference")
    assert len(res) == 6
    for key, r in res.items():
        assert abs(r["mtp_loss"] - ref["mtp"]) < 1e-5, key
        assert abs(r["loss"] - (ref["main"] + 0.3 * ref["mtp"])) < 1e-5, key
        assert r["worst"][1] < 1e-4, (key, r["worst"])
        assert r["mtp_grad_norm"] > 0 and "model.layers.3.eh_proj.weight" in r["mtp_params"], key


def _train(model: Path, out: Path, weight: float) -> dict:
    from npu_parallel.training.config import TrainConfig
    from npu_parallel.training.loop import train

    cfg = TrainConfig(
        model_path=str(model),
        steps=2,
        max_length=16,
        lr=1e-2,
        jit_warmup_steps=0,
        precision="fp32",
        save_dir=str(out / "ckpt"),
        log_dir=str(out / "log"),
        mtp_loss_weight=weight,
    )
    return train(cfg)


def test_train_frozen_and_trained_mtp(published, tmp_path):
    """Weight 0: the MTP layer's own tensors come out of train + save + merge bit-exact while the main model
    changes; weight 0.5: the MTP loss is logged each step and the MTP layer is updated. The published copies of
    the shared embedding and head follow the (trained) shared tensors either way."""
    src = _tensors(published["plain"])
    copies = {"model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"}
    mtp = [k for k in src if k.startswith("model.layers.3.") and k not in copies]
    results = {}
    for weight in (0.0, 0.5):
        run = _train(published["plain"], tmp_path / str(weight), weight)
        merged = tmp_path / f"merged-{weight}"
        assert main(["merge", run["checkpoint"], "--out", str(merged), "-q"]) == 0
        results[weight] = (run, _tensors(merged))
    frozen_run, frozen = results[0.0]
    assert all(torch.equal(frozen[k], src[k]) for k in mtp)
    changed = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.equal(frozen[changed], src[changed])
    assert all(r["mtp_loss"] is None for r in frozen_run["records"])
    trained_run, trained = results[0.5]
    assert all(r["mtp_loss"] > 0 for r in trained_run["records"])
    assert not torch.equal(trained["model.layers.3.eh_proj.weight"], src["model.layers.3.eh_proj.weight"])
    for out in (frozen, trained):
        assert torch.equal(out["model.layers.3.embed_tokens.weight"], out["model.embed_tokens.weight"])
        assert torch.equal(out["model.layers.3.shared_head.head.weight"], out["lm_head.weight"])


def test_incomplete_mtp_is_exit_2(published, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(published["plain"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.3.eh_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", str(bad), "--tp", "2", "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MTP layer (model.layers.3.*" in err[0] and "eh_proj.weight missing" in err[0], err


def test_unknown_quant_method_is_exit_2(published, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(published["fp8"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    for verb in (["convert", str(bad), "--tp", "2", "--out", str(tmp_path / "o")], ["inspect", str(bad)]):
        assert main(verb) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "quant_method='gptq' is not supported; supported:" in err[0], err


def test_mtp_loss_is_npu_safe(published):
    """The MTP forward and backward (static MoE path): no banned op and no host sync."""
    from npu_parallel import init_distributed, load_pretrained
    from npu_parallel.tools.audit import OpAudit
    from npu_parallel.training.losses import causal_lm_loss

    state = init_distributed(1)
    model = load_pretrained(published["plain"], state, dtype=torch.float32, moe_impl="static", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    parts: dict = {}
    with OpAudit(model) as audit:
        loss, _ = causal_lm_loss(model.train(), ids, ids, vocab_parallel=False, mtp_weight=0.3, parts=parts)
        loss.backward()
    assert "mtp_loss" in parts and model.model.layers[3].eh_proj.weight.grad is not None
    assert audit.banned() == [] and [e for e in audit.events if e.kind == "host_sync"] == []


def test_differing_copy_of_shared_head_warns(published, tmp_path, caplog):
    """A published copy that is not the shared tensor: one warning naming both; merge writes the shared one."""
    odd = tmp_path / "odd"
    shutil.copytree(published["plain"], odd)
    tensors = load_file(str(odd / "model.safetensors"))
    tensors["model.layers.3.shared_head.head.weight"][0] += 1
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        assert main(["convert", str(odd), "--tp", "2", "--out", str(tmp_path / "conv"), "-q"]) == 0
    warned = [r.getMessage() for r in caplog.records if "differs from lm_head.weight" in r.getMessage()]
    assert len(warned) == 1 and "model.layers.3.shared_head.head.weight" in warned[0]


def test_mtp_weight_needs_mtp_layers(published, tmp_path):
    from npu_parallel.training.errors import ConfigError

    plain = tmp_path / "no_mtp"
    shutil.copytree(published["plain"], plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"--mtp_loss_weight 0.5: .* has no MTP layers"):
        _train(plain, tmp_path / "run", 0.5)
