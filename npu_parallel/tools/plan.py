"""``npu-parallel plan``: per-card memory and communication of every valid (tp, ep, dp) layout, from a config alone.

Parameter counts are exact: the model is built on the meta device from the config and converted at each tp
size with the family's own plan (every slice and vocab padding as training holds them); the routed experts
then divide by ep. Everything else is a model of a step, stated here so a reader can check it:

* ``dp_mode="fsdp"`` (the default, FSDP2): dense parameters sharded over the dp ranks, expert parameters over
  the edp ranks (the ranks holding the same experts); ``"replicate"``: every dp rank holds a full copy (DDP).
* weights in ``dtype``; fp32 master weights of the trainable parameters when ``dtype`` is not fp32;
  gradients of the trainable parameters in fp32 then (``dtype`` otherwise); AdamW: two fp32 states each.
  With FSDP the largest layer's gathered weights are held twice (the one computing and the prefetched one).
* ``lora``: the base frozen (no gradient, master or optimizer state), rank-``lora_rank`` adapters on every
  attention and MLP linear (routed experts, router, embedding and head excluded) trainable.
* activations: saved tensors of one micro-batch of ``B x S`` tokens per dp rank, fused attention (no ``S x S``
  scores), balanced routing, full logits gathered in fp32 for the loss; ``recompute``: activation
  checkpointing per layer (each layer's input kept, one layer's activations live).
* collectives per step: tp all-reduces (2 per layer forward, 2 backward: attention and MLP/MoE), the ep
  all-to-all (4 per MoE layer when ep > tp), the dp traffic (FSDP: all-gather forward and backward,
  reduce-scatter of fp32 gradients; replicate: an all-reduce); bytes are what one card sends (ring).

Shapes: T = B * S tokens per dp rank, H hidden, V vocab, E experts, k top-k, I_e expert intermediate.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from npu_parallel.moe.load import layer_index
from npu_parallel.tools.plan_pipeline import Stage, bubble, in_flight, stages

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Counts:
    """Parameters one card holds at one tp size, before dp sharding: dense (tp-sliced and replicated) and routed
    experts (all E, divided by ep later), the largest layer of each, LoRA adapter parameters at rank 1."""

    dense: int
    experts: int
    layer_dense: int
    layer_experts: int
    lora_per_rank: int
    # the pipeline's view: (dense, experts, lora) per decoder layer, the embedding, and the rest (norm, head, MTP)
    layers: tuple[tuple[int, int, int], ...] = ()
    embed: int = 0
    rest: tuple[int, int, int] = (0, 0, 0)

    def stages(self, config, pp: int) -> list[Stage]:
        """The counts of each of ``pp`` stages (one stage: the whole model)."""
        from npu_parallel.training.pipeline_split import is_moe_layer

        moe = [bool(self.experts) and is_moe_layer(config, i) for i in range(len(self.layers))]
        return stages(config, list(self.layers), self.embed, self.rest, pp, moe)


def read_config(path: str | Path):
    """A checkpoint folder's config.json, or a config file."""
    from transformers import AutoConfig

    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such file or folder; give a checkpoint folder or its config.json")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ValueError(f"{path}: no config.json in this folder")
    return AutoConfig.from_pretrained(str(p))


def count_parameters(config, tp: int) -> Counts:
    """Exact per-card parameter counts at ``tp`` (rank 0): the meta model converted by the family's plan."""
    import torch

    from npu_parallel.checkpoint.materialize import empty_model
    from npu_parallel.convert.conversion import apply_plan
    from npu_parallel.moe.experts import LocalExperts
    from npu_parallel.parallel.shard_spec import spec_of
    from npu_parallel.parallel.state import Group

    model = empty_model(config, torch.bfloat16, meta_buffers=True)
    apply_plan(model, Group.offline(0, tp), device_type="meta")
    dense = experts = lora = embed = 0
    per_layer: dict[int, list[int]] = {}  # layer (-1: outside the decoder layers) -> [dense, experts, lora]
    seen: set[int] = set()
    n = int(config.num_hidden_layers)
    for mod_name, module in model.named_modules():
        is_experts = isinstance(module, LocalExperts)
        leaf = mod_name.rsplit(".", 1)[-1]
        weight = module._parameters.get("weight")
        index = layer_index(mod_name)
        if weight is not None and weight.dim() == 2 and leaf != "gate" and ".layers." in f".{mod_name}.":
            adapter = sum(weight.shape)  # an adapter of rank r on this (local) linear: r * (in + out)
            lora += adapter
            per_layer.setdefault(-1 if index is None else index, [0, 0, 0])[2] += adapter
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            spec = spec_of(p)
            layer = layer_index(f"{mod_name}.{name}")
            slot = per_layer.setdefault(-1 if layer is None else layer, [0, 0, 0])
            if is_experts and spec is not None:
                count = math.prod(spec.global_shape(p.shape))  # all E experts
                experts += count
                slot[1] += count
            else:
                dense += p.numel()
                slot[0] += p.numel()
                if layer is None and "embed_tokens" in mod_name:
                    embed += p.numel()
    decoder = [tuple(per_layer.get(i, [0, 0, 0])) for i in range(n)]
    biggest = max(decoder, key=lambda v: v[0] + v[1], default=(0, 0, 0))
    outside = [v for k, v in per_layer.items() if k < 0 or k >= n]  # norm, head, MTP layers (and the embedding)
    rest = (sum(v[0] for v in outside) - embed, sum(v[1] for v in outside), sum(v[2] for v in outside))
    return Counts(dense, experts, biggest[0], biggest[1], lora, tuple(decoder), embed, rest)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Step:
    """The planner's choices besides the layout: what one training step holds and sends (the module docstring)."""

    dtype: str = "bfloat16"
    dp_mode: str = "fsdp"
    lora: bool = False
    lora_rank: int = 16
    micro_batch: int = 1
    seq: int = 4096
    recompute: bool = False
    grad_accum: int = 8
    pp_schedule: str = "1f1b"

    @property
    def tokens(self) -> int:
        """``T = B * S``: one micro-batch's tokens per dp rank."""
        return self.micro_batch * self.seq


@dataclass
class Layout:
    """One (tp, ep, dp) layout: bytes per card and the collectives of one step."""

    tp: int
    ep: int
    dp: int
    edp: int
    weights: int
    gathered: int
    master: int
    grads: int
    optimizer: int
    activations: int
    comm: dict
    total: int = 0
    fits: bool = False
    pp: int = 1
    bubble: float = 0.0  # idle share of a step (pipeline stages)
    stage: int = 0  # the stage whose card is counted (the fullest)


def _ring(size: float, n: int, kind: str) -> float:
    """Bytes one card sends for a collective on ``size`` bytes over ``n`` ranks (ring algorithms)."""
    if n == 1:
        return 0.0
    return size * (2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n)


def activations(
    config, tp: int, ep: int, tokens: int, b: int, recompute: bool = False, stage: Stage | None = None
) -> int:
    """The activation estimate of one micro-batch of ``tokens`` on one card (see the module docstring); ``stage``:
    only its layers (and the head's logits only on the last stage)."""

    def g(name: str, default: int = 0):
        return getattr(config, name, None) or default

    h, v = g("hidden_size"), g("vocab_size")
    heads = g("num_attention_heads") // tp
    nope, rope, vdim = g("qk_nope_head_dim"), g("qk_rope_head_dim"), g("v_head_dim")
    if not nope:  # standard attention
        head_dim = g("head_dim") or h // g("num_attention_heads")
        nope, rope, vdim = head_dim, 0, head_dim
    attn = 4 * h + g("q_lora_rank") + g("kv_lora_rank") + heads * (2 * (nope + rope) + 3 * vdim)
    n_exp = g("n_routed_experts") or g("num_experts") or g("num_local_experts")
    top_k = g("num_experts_per_tok", 1)
    i_e = g("moe_intermediate_size") or g("intermediate_size")
    shared = (g("n_shared_experts") * i_e) or g("shared_expert_intermediate_size")
    if stage is None:
        layers = g("num_hidden_layers")
        dense_layers, head = (min(layers, g("first_k_dense_replace")) if n_exp else layers), True
    else:
        layers, dense_layers, head = stage.layers, stage.dense_layers, stage.head
    mlp = 2 * h + 4 * g("intermediate_size") // tp
    moe = 2 * h + 4 * shared // tp + (top_k / tp) * (3 * h + 4 * i_e) + n_exp * 4 / b
    per_token = layers * attn + dense_layers * mlp + (layers - dense_layers) * moe + 2 * h
    if recompute:  # each layer's input kept, one layer's activations live at a time (its recomputation)
        per_token = layers * h + attn + max(mlp, moe if n_exp else 0)
    logits = tokens * v * (4 * 3 + b) if head else 0  # fp32 logits, softmax and its gradient; the gathered logits
    return int(tokens * per_token * b + logits)


def layout(config, c: Counts, tp: int, ep: int, world: int, step: Step, card_bytes: int, pp: int = 1) -> Layout:
    """Bytes per card and the step's collectives for one layout (see the module docstring); with ``pp`` stages,
    those of the fullest stage's card (:mod:`npu_parallel.tools.plan_pipeline`)."""
    if pp == 1:
        one = _stage_layout(config, None, c, tp, ep, world, step, 1)
        one.fits = one.total <= card_bytes
        return one
    cards = []
    for st in c.stages(config, pp):
        flight = in_flight(step.pp_schedule, st.index, pp, step.grad_accum)
        lay = _stage_layout(config, st, c, tp, ep, world // pp, step, flight)
        act = step.tokens * config.hidden_size * BYTES[step.dtype]  # one micro-batch's [B, S, H] at a boundary
        sends = step.grad_accum * (int(st.index > 0) + int(not st.head))  # gradients back, activations forward
        lay.comm["pp send/recv"] = (sends, int(sends * act))
        lay.pp, lay.stage, lay.bubble = pp, st.index, bubble(pp, step.grad_accum)
        cards.append(lay)
    out = max(cards, key=lambda lay: lay.total)
    out.fits = out.total <= card_bytes
    return out


def _stage_layout(config, st: Stage | None, c: Counts, tp: int, ep: int, world: int, step: Step, flight: int) -> Layout:
    """One card of a stage (``st`` None: the whole model) among ``world`` ranks holding that stage, ``flight``
    micro-batches' activations held at once."""
    dtype, lora, lora_rank, tokens = step.dtype, step.lora, step.lora_rank, step.tokens
    b = BYTES[dtype]
    dp, edp = world // tp, world // ep
    fsdp = step.dp_mode == "fsdp"
    dense_share, expert_share = (dp, edp) if fsdp else (1, 1)
    dense_n, experts_n = (c.dense, c.experts) if st is None else (st.dense, st.experts)
    lora_n = c.lora_per_rank if st is None else st.lora_per_rank
    layer_dense, layer_experts = (c.layer_dense, c.layer_experts) if st is None else (st.layer_dense, st.layer_experts)
    params = dense_n / dense_share + experts_n / ep / expert_share
    trainable = lora_n * lora_rank if lora else params
    master = trainable * 4 if dtype != "float32" else 0
    grad_b = 4 if dtype != "float32" else b
    layer = layer_dense + layer_experts / ep
    gathered = 2 * layer * b if fsdp and dp > 1 else 0
    h = config.hidden_size
    layers = config.num_hidden_layers if st is None else st.layers
    if st is None:
        first_dense = getattr(config, "first_k_dense_replace", 0) or 0
        moe_layers = sum(1 for i in range(layers) if c.experts and i >= first_dense)
    else:
        moe_layers = st.layers - st.dense_layers
    top_k = getattr(config, "num_experts_per_tok", 1) or 1
    act_bytes = tokens * h * b
    comm = {
        "tp all-reduce": (4 * layers, 4 * layers * _ring(act_bytes, tp, "all_reduce")),
        # this tp rank's share of the tokens, k slots each, out and back, forward and backward
        "ep all-to-all": (4 * moe_layers, 4 * moe_layers * _ring(act_bytes / tp * top_k, ep, "a2a"))
        if ep > tp
        else (0, 0.0),
    }
    dense_b = dense_n * (b if not lora else 0)
    exp_b = experts_n / ep * (b if not lora else 0)
    if fsdp:
        comm["dp all-gather"] = (4 * layers, 2 * (_ring(dense_n * b, dp, "g") + _ring(experts_n / ep * b, edp, "g")))
        comm["dp reduce-scatter"] = (
            2 * layers if not lora else 0,
            _ring(dense_b / b * 4, dp, "rs") + _ring(exp_b / b * 4, edp, "rs") if not lora else 0.0,
        )
    else:
        grads_b = lora_n * lora_rank * grad_b if lora else None
        comm["dp all-reduce"] = (
            1,
            _ring(grads_b, dp, "all_reduce")
            if grads_b is not None
            else _ring(dense_n * grad_b, dp, "all_reduce") + _ring(experts_n / ep * grad_b, edp, "all_reduce"),
        )
    out = Layout(
        tp,
        ep,
        dp,
        edp,
        weights=int(params * b),
        gathered=int(gathered),
        master=int(master),
        grads=int(trainable * grad_b),
        optimizer=int(trainable * 8),
        activations=flight * activations(config, tp, ep, tokens, b, step.recompute, st),
        comm={k: (n, int(v)) for k, (n, v) in comm.items()},
    )
    out.total = out.weights + out.gathered + out.master + out.grads + out.optimizer + out.activations
    return out


def plan(
    config,
    *,
    nodes: int,
    cards_per_node: int,
    card_bytes: int,
    dtype: str = "bfloat16",
    dp_mode: str = "fsdp",
    lora: bool = False,
    lora_rank: int = 16,
    micro_batch: int = 1,
    seq: int = 4096,
    recompute: bool = False,
    pp_sizes: list[int] | None = None,
    grad_accum: int = 8,
    pp_schedule: str = "1f1b",
) -> list[Layout]:
    """Every valid (tp, ep, dp, pp) layout, ranked: those that fit first, by the smallest pipeline bubble (idle
    compute, which no byte count weighs: the fewest stages that fit come first), then by bytes one card sends per
    step, then by memory; then those that do not fit, the least memory first. ``pp_sizes``: the pipeline sizes to
    consider (default: every one the world and the layers allow)."""
    from npu_parallel.convert.plans import plan_for
    from npu_parallel.parallel.state import divisors

    if dtype not in BYTES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(BYTES)}")
    if dp_mode not in ("fsdp", "replicate"):
        raise ValueError(f"dp_mode={dp_mode!r}: use 'fsdp' or 'replicate'")
    family = plan_for(config)
    step = Step(dtype, dp_mode, lora, lora_rank, micro_batch, seq, recompute, grad_accum, pp_schedule)
    world = nodes * cards_per_node
    n_exp = family.num_experts(config)
    layers = int(config.num_hidden_layers)
    if pp_sizes is None:
        pp_sizes = [p for p in divisors(world) if p <= layers]
    for p in pp_sizes:
        if p < 1 or world % p or p > layers:
            raise ValueError(
                f"pp {p}: must divide the {world} cards and be at most the model's {layers} decoder layers"
            )
    out = []
    for tp in family.valid_tp_sizes(config, divisors(cards_per_node)):  # tp inside a node
        counts = count_parameters(config, tp)
        for pp in pp_sizes:
            stage = world // pp
            if stage % tp:
                continue
            eps = [e for e in divisors(stage) if e % tp == 0 and (n_exp or 0) % e == 0] if n_exp else [tp]
            for ep in eps:
                out.append(layout(config, counts, tp, ep, world, step, card_bytes, pp))
    return sorted(out, key=_rank)


def _rank(lay: Layout) -> tuple:
    if not lay.fits:  # the closest to fitting first
        return (1, lay.total, 0.0, 0)
    return (0, round(lay.bubble, 6), sum(v for _, v in lay.comm.values()), lay.total)


def parse_bytes(text: str) -> int:
    """'64GB' -> 64e9, '32GiB' -> 32 * 2**30, '1.5TB'; a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 64GB or 32GiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def format_plan(layouts: list[Layout], title: str, limit: int = 12) -> str:
    """The ranked table: GB per card by kind, GB sent per step, whether it fits."""
    head = ("tp", "ep", "dp", "pp", "weights", "gathered", "master", "grads", "optim", "activ", "total", "sent/step",
            "bubble", "fits")  # fmt: skip
    rows = [head]
    for lay in layouts[:limit]:
        sent = sum(v for _, v in lay.comm.values())
        rows.append(
            (
                str(lay.tp),
                str(lay.ep),
                str(lay.dp),
                str(lay.pp),
                _gb(lay.weights),
                _gb(lay.gathered),
                _gb(lay.master),
                _gb(lay.grads),
                _gb(lay.optimizer),
                _gb(lay.activations),
                _gb(lay.total),
                _gb(sent),
                f"{lay.bubble:.0%}",
                "yes" if lay.fits else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [title, "GB per card (with pp: the fullest stage's card; sent/step: GB one card sends in a step)"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if len(layouts) > limit:
        lines.append(f"... {len(layouts) - limit} more layouts (--json lists all)")
    if layouts:
        best = layouts[0]
        lines.append(
            "collectives per step of the first layout: "
            + "; ".join(f"{k} x{n} {_gb(v)} GB" for k, (n, v) in best.comm.items() if n and v)
        )
    return "\n".join(lines)


def as_json(layouts: list[Layout]) -> list[dict]:
    return [asdict(lay) for lay in layouts]


def total_parameters(config) -> int:
    """All parameters of the model (tp 1, every expert)."""
    c = count_parameters(config, 1)
    return c.dense + c.experts
