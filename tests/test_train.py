"""Fine-tuning: DDP over dp groups, true global grad norm, vocab-parallel loss, checkpointing, exact resume."""

import json
import math

import pytest
import torch

from .common import seeded_ids
from .dist import run_ranks

BASE = dict(batch_size=1, max_length=32, steps=4, lr=1e-3, warmup_steps=1, jit_warmup_steps=1, seed=5, grad_clip=1.0)


def test_grad_norm_and_vocab_parallel_loss(checkpoints):
    r = run_ranks(2, "tests.train_worker:norms_and_losses", str(checkpoints / "deepseek_v2"), 2)
    assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-5)  # replicated params once, not tp times
    assert r["loss_vp"] == pytest.approx(r["loss_gathered"], abs=1e-6)
    assert r["grad_diff"] <= 1e-6
    assert r["local_logits_vocab"] == 125  # never the full 250


def test_dp_x_tp_equals_tp_with_the_same_global_batch(checkpoints, tmp_path):
    path = str(checkpoints / "deepseek_v2")
    ddp = run_ranks(4, "tests.train_worker:run_train", dict(BASE, model_path=path, tp_size=2, batch_size=1))
    assert ddp["state"] == {"world": 4, "tp": 2, "dp": 2}
    single = run_ranks(2, "tests.train_worker:run_train", dict(BASE, model_path=path, tp_size=2, batch_size=2))
    assert single["state"] == {"world": 2, "tp": 2, "dp": 1}
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert ddp["losses"][-1] < ddp["losses"][0]


def test_training_options_agree(checkpoints, tmp_path):
    """Vocab-parallel loss, gradient checkpointing and grad accumulation train the same model."""
    path = str(checkpoints / "deepseek_v3")
    jobs = [
        dict(BASE, model_path=path),
        dict(BASE, model_path=path, vocab_parallel_loss=True),
        dict(BASE, model_path=path, gradient_checkpointing=True),
        dict(BASE, model_path=path, batch_size=2, grad_accum=1),
        dict(BASE, model_path=path, batch_size=1, grad_accum=2),
    ]
    plain, vp, gc, b2, acc = run_ranks(2, "tests.train_worker:run_many", jobs)
    assert vp["losses"] == pytest.approx(plain["losses"], abs=1e-5)
    assert gc["losses"] == pytest.approx(plain["losses"], abs=1e-5)
    assert acc["losses"] == pytest.approx(b2["losses"], abs=1e-5)


def test_interrupted_run_resumes_exactly(checkpoints, tmp_path):
    """Resume from step-2 of a run interrupted after step 3: the same losses bit for bit, and metrics.jsonl of the
    log_dir continues the run (its step-3 line from the interrupted run replaced, each step once), the loss curve
    drawn from all of it."""
    path = str(checkpoints / "deepseek_v2")
    cfg = dict(BASE, model_path=path, steps=6)
    ckpt, log = tmp_path / "ckpt", tmp_path / "a"
    full, interrupted = run_ranks(
        2,
        "tests.train_worker:run_many",
        [
            dict(cfg, log_dir=str(tmp_path / "full")),
            dict(cfg, stop_after=3, save_dir=str(ckpt), save_every=2, log_dir=str(log)),
        ],
    )
    assert interrupted["steps"] == [1, 2, 3] and interrupted["checkpoint"].endswith("step-3")
    resumed = run_ranks(
        2, "tests.train_worker:run_train", dict(cfg, resume=str(ckpt / "step-2"), log_dir=str(log), save_dir=str(ckpt))
    )
    assert resumed["steps"] == [3, 4, 5, 6]
    assert resumed["losses"] == full["losses"][2:]  # bit for bit
    assert interrupted["losses"] == full["losses"][:3]
    lines = [json.loads(x) for x in (log / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert [x["loss"] for x in lines] == full["losses"]
    assert resumed["plotted_steps"] == [1, 2, 3, 4, 5, 6]


def test_metrics_file_and_loss_curve(checkpoints, tmp_path):
    run_ranks(
        2,
        "tests.train_worker:run_train",
        dict(
            BASE,
            model_path=str(checkpoints / "deepseek_v2"),
            log_dir=str(tmp_path),
            save_dir=str(tmp_path / "ckpt"),
            save_every=2,
        ),
    )
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    for x in lines:
        assert {"loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= set(x)
        assert math.isfinite(x["loss"]) and x["tokens_per_s"] > 0 and x["peak_mem_mb"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-2", "step-4"]


def test_remote_code_aux_loss_is_reported(checkpoints):
    """The MoEGate auxiliary loss of the source model reaches the training loss report (its gradient is in the
    graph)."""

    import npu_parallel
    from npu_parallel.training.losses import causal_lm_loss

    from .models import load_reference

    ref = load_reference("deepseek_v2_remote", checkpoints / "deepseek_v2_remote").train()
    ids = seeded_ids(250, 2, 16, 0)
    model = npu_parallel.convert_model(
        load_reference("deepseek_v2_remote", checkpoints / "deepseek_v2_remote"), npu_parallel.init_distributed()
    ).train()
    captured = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o[2].detach()))
        for layer in ref.model.layers[1:]
    ]
    ref(input_ids=ids, labels=ids)
    for h in hooks:
        h.remove()
    _, aux = causal_lm_loss(model, ids, ids, vocab_parallel=False)
    assert aux is not None and aux.item() == pytest.approx(sum(c.item() for c in captured), rel=1e-5)


def test_adamw_is_fused_where_torch_has_the_kernel():
    """Fused AdamW (transformers' Trainer default) on CPU/CUDA; foreach elsewhere (meta here stands for npu)."""
    from npu_parallel.training.optim import build_optimizer, fused_adamw

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, 1e-3, weight_decay=0.1)
    assert [g["fused"] for g in opt.param_groups] == [True, True]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # the weight decays; bias and norm do not
    assert not fused_adamw([torch.empty(2, 2, device="meta")]) and not fused_adamw([])
    meta = build_optimizer(torch.nn.Linear(2, 2, device="meta"), 1e-3)
    assert not any(g["fused"] for g in meta.param_groups)
