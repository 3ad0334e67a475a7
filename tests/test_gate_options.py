"""Gate options (issue 25 point 3): router noise changes training-mode routing and never eval-mode routing, each
kind equals its definition written out on the unconverted model, the ranks of a tp group draw the same noise,
the router z-loss equals ST-MoE's formula; eval_capacity_factor and min_capacity give the hand-computed drops;
the trainer's flags (noise, z-loss, capacity) run, resume bit for bit and count the drops in metrics.jsonl."""

from __future__ import annotations

import pytest
import torch

import npu_parallel
from npu_parallel.moe.dispatchers.masked import MaskedDispatcher
from npu_parallel.moe.dispatchers.static import StaticDispatcher
from npu_parallel.moe.gate_options import GateNoise, GateOptions, set_noise_step
from npu_parallel.moe.load import moe_blocks

from .common import seeded_ids
from .dist import run_ranks
from .models import VARIANTS, load_reference
from .test_static_moe import _experts, _kept

EPS = 0.3  # large enough that the tiny models' routing changes


def _converted(checkpoints, name: str, **options):
    state = npu_parallel.init_distributed(1)
    model = load_reference(name, checkpoints / name)
    gate = GateOptions(**options) if options else None
    return npu_parallel.convert_model(model, state, aux_loss_coef=0.0, gate_options=gate)


def _routing(model, ids: torch.Tensor, train: bool) -> dict[int, list]:
    model.train(train)
    with torch.no_grad(), npu_parallel.record_routing(model) as rec:
        model(input_ids=ids)
    return {i: r[0] for i, r in rec.layers.items()}


def _moe_modules(ref) -> dict[int, torch.nn.Module]:
    return {i: layer.mlp for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "experts")}


@pytest.mark.parametrize("kind", ["mixtral", "jitter", "rsample"])
def test_noise_changes_training_routing_only(checkpoints, kind):
    model = _converted(checkpoints, "qwen3_moe", noise=kind, noise_eps=EPS)
    plain = _converted(checkpoints, "qwen3_moe")
    ids = seeded_ids(model.config.vocab_size, 2, 16, 3)
    clean = _routing(plain, ids, train=False)
    for eval_run in (_routing(model, ids, train=False), _routing(model, ids, train=False)):
        assert all(torch.equal(eval_run[i].ids, clean[i].ids) for i in clean)  # never in eval
    first, second = _routing(model, ids, train=True), _routing(model, ids, train=True)
    assert any(not torch.equal(first[i].ids, clean[i].ids) for i in clean), "noise left training routing unchanged"
    assert any(not torch.equal(first[i].ids, second[i].ids) for i in clean), "the same noise in two forwards"
    again = []
    for _ in range(2):  # the trainer's step (and dp rank) seed the draws, the forwards counted from it
        set_noise_step(model, 5, 1)
        again.append(_routing(model, ids, train=True))
    assert all(torch.equal(again[0][i].ids, again[1][i].ids) for i in clean)


@pytest.mark.parametrize("name, kind", [("mixtral", "mixtral"), ("qwen3_moe", "jitter")])
def test_jitter_equals_its_definition_on_the_unconverted_model(checkpoints, name, kind):
    """Mixtral: the block's input times U(1-eps, 1+eps) (transformers' router_jitter_noise, here drawn from the
    seeded noise), router and experts both; Jitter: the router's input only. Train-mode logits and loss equal."""
    if name not in VARIANTS:
        pytest.skip(f"{name} is not in this transformers")
    model = _converted(checkpoints, name, noise=kind, noise_eps=EPS, seed=11)
    ref = load_reference(name, checkpoints / name).train()
    handles = []
    for layer, block in _moe_modules(ref).items():
        noise = GateNoise(kind, EPS, 11, layer)
        target = block if kind == "mixtral" else block.gate
        if kind == "mixtral":
            block.jitter_noise = 0.0  # transformers' own draw replaced by the seeded one
        handles.append(target.register_forward_pre_hook(lambda m, a, n=noise: (n.jitter(a[0]),)))
    ids = seeded_ids(model.config.vocab_size, 2, 16, 4)
    model.train()
    got = model(input_ids=ids, labels=ids)
    want = ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    plain = _converted(checkpoints, name).train()(input_ids=ids, labels=ids)
    assert (got.logits - plain.logits).abs().max() > 1e-3  # the noise did something


def test_config_router_jitter_noise_is_honoured(checkpoints):
    """A Mixtral config with router_jitter_noise > 0 keeps its jitter after conversion (transformers' block has it)."""
    if "mixtral" not in VARIANTS:
        pytest.skip("mixtral is not in this transformers")
    state = npu_parallel.init_distributed(1)
    ref = load_reference("mixtral", checkpoints / "mixtral")
    for block in _moe_modules(ref).values():
        block.jitter_noise = 0.2
    model = npu_parallel.convert_model(ref, state)
    noises = [b.gate_noise for _, b in moe_blocks(model)]
    assert noises and all(n is not None and (n.kind, n.eps) == ("mixtral", 0.2) for n in noises)


def test_rsample_samples_on_the_selection_and_keeps_the_family_weights(checkpoints):
    """RSample: ids are the top-k of log(softmax(raw)) + Gumbel from the seeded draw; weights the family's
    (Qwen3-MoE: softmax at the ids, renormalised) at those ids. A sigmoid router (DeepSeek-V3) is refused."""
    model = _converted(checkpoints, "qwen3_moe", noise="rsample", seed=2)
    ids = seeded_ids(model.config.vocab_size, 2, 16, 5)
    got = _routing(model, ids, train=True)
    for layer, rec in got.items():
        probs = rec.raw_logits.float().softmax(dim=-1)
        want = GateNoise("rsample", 0.01, 2, layer).sample(probs, rec.ids.shape[-1])
        assert torch.equal(rec.ids, want)
        w = probs.gather(1, want)
        torch.testing.assert_close(rec.weights.float(), w / w.sum(dim=-1, keepdim=True))
    v3 = _converted(checkpoints, "deepseek_v3", noise="rsample").train()
    with pytest.raises(ValueError, match="scores by sigmoid: use router noise 'jitter' or 'mixtral'"):
        v3(input_ids=ids)


def test_z_loss_equals_st_moe(checkpoints):
    """loss(z) - loss(no z) = coef * sum over MoE layers of mean_tokens(logsumexp(raw_logits)^2); out.z_loss too."""
    coef = 1e-2
    model = _converted(checkpoints, "qwen3_moe", z_loss_coef=coef).train()
    plain = _converted(checkpoints, "qwen3_moe").train()
    ids = seeded_ids(model.config.vocab_size, 2, 16, 6)
    with npu_parallel.record_routing(model, fields=("raw_logits",)) as rec:
        out = model(input_ids=ids, labels=ids)
    want = coef * sum(torch.logsumexp(r[0].raw_logits.double(), -1).square().mean() for r in rec.layers.values())
    assert out.z_loss.item() == pytest.approx(want.item(), rel=1e-5)
    base = plain(input_ids=ids, labels=ids).loss
    assert (out.loss - base).item() == pytest.approx(want.item(), rel=1e-4)
    out.loss.backward()  # the z-loss reaches the routers
    assert all(b.gate.weight.grad is not None for _, b in moe_blocks(model))
    model.eval()
    assert model(input_ids=ids, labels=ids).get("z_loss") is None  # a training term only


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(noise="gauss"), "router noise 'gauss': unknown"),
        (dict(noise="jitter", noise_eps=1.5), "must lie in (0, 1)"),
        (dict(z_loss_coef=-1.0), "must be a finite number >= 0"),
    ],
)
def test_bad_options_raise_before_conversion(checkpoints, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _converted(checkpoints, "qwen3_moe", **options)


def test_tp2_ranks_draw_the_same_noise(checkpoints):
    """Train-mode logits with each noise at tp 2 equal tp 1's (one launch): the tp ranks routed alike."""
    result = run_ranks(2, "tests.gate_worker:run", str(checkpoints / "qwen3_moe"), ["mixtral", "jitter", "rsample"])
    for kind, diff in result.items():
        assert diff <= 1e-5, (kind, diff)


def test_min_capacity_and_eval_capacity_factor_drop_as_hand_computed():
    """40 tokens, top-2 of 16 experts (8 local), every token to expert 8: capacity_factor 1.25 gives
    ceil(1.25 * 40 * 2 / 16) = 7 slots; min_capacity 20 raises it to 20; eval_capacity_factor 8 gives 40 (no drop)
    in eval mode only."""
    ex = _experts()
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    idx = torch.full((40, 2), 8)
    idx[:, 1] = torch.arange(40) % 16
    idx[idx[:, 1] == 8, 1] = 9
    w = torch.rand(40, 2, generator=torch.Generator().manual_seed(4))
    # expert 8 gets 40 slots, every other local expert at most 4: 33 dropped at 7 slots, 20 at 20, none at 40
    for options, train, cap, drops in [
        (dict(capacity_factor=1.25), True, 7, 33),
        (dict(capacity_factor=1.25, min_capacity=20), True, 20, 20),
        (dict(capacity_factor=1.25, eval_capacity_factor=8.0), True, 7, 33),
        (dict(capacity_factor=1.25, eval_capacity_factor=8.0), False, 40, 0),
    ]:
        static = StaticDispatcher(**options)
        static.training = train
        out = static(x, idx, w, ex)
        kept, dropped = _kept(idx, w, cap)
        assert int(static.stats["dropped"]) == dropped == drops, (options, train)
        torch.testing.assert_close(out, MaskedDispatcher()(x, idx, kept, ex), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dropless without one; pass capacity_factor"):
        StaticDispatcher(min_capacity=4)


def test_training_with_noise_and_z_loss_resumes_exactly(checkpoints, tmp_path):
    """A 2-rank run (tp 2) with --router_noise jitter and --router_z_loss: the losses differ from a plain run's, and a
    run resumed from step-2 gives the uninterrupted run's losses bit for bit (the noise is seeded by the step);
    --moe_impl static --capacity_factor 0.5 drops slots, counted per layer in the metrics."""
    base = dict(
        model_path=str(checkpoints / "qwen3_moe"), batch_size=1, max_length=32, steps=4, lr=1e-3, warmup_steps=1,
        jit_warmup_steps=1, seed=5, grad_clip=1.0,
    )  # fmt: skip
    noisy = dict(base, router_noise="jitter", router_noise_eps=0.3, router_z_loss=1e-2)
    ckpt = tmp_path / "ckpt"
    capped = dict(base, moe_impl="static", capacity_factor=0.5, eval_capacity_factor=4.0, steps=2)
    plain, full, interrupted, dropping = run_ranks(
        2,
        "tests.train_worker:run_many",
        [
            base,
            noisy,
            dict(noisy, stop_after=3, save_dir=str(ckpt), save_every=2, log_dir=str(tmp_path / "a")),
            dict(capped, log_dir=str(tmp_path / "capped")),
        ],
    )
    assert all(a != b for a, b in zip(plain["losses"], full["losses"], strict=True))
    records = [r for r in dropping["records"] if "expert_load" in r]
    assert records and all(sum(row["dropped"] for row in r["expert_load"]) > 0 for r in records)
    resumed = run_ranks(2, "tests.train_worker:run_train", dict(noisy, resume=str(ckpt / "step-2")))
    assert interrupted["losses"] == full["losses"][:3]
    assert resumed["losses"] == full["losses"][2:]  # bit for bit
