"""How a model's decoder layers split into pipeline stages: the cost of each layer, the default balanced split, and
``--pp_layers a,b,...`` by hand.

The first stage also holds the embedding and the last one the final norm, the output head and DeepSeek-V3's MTP
layers, so a stage's cost is its layers' plus those. A layer costs its share of the model's parameters (memory)
plus its share of the FLOPs per token (time): a DeepSeek dense first layer has a wide MLP that every token runs,
an MoE layer many experts of which each token runs top-k, so the two are costed differently. The default split
is the contiguous one whose most expensive stage is cheapest (Megatron's uneven first and last stages come out of
it when the embedding and head are large).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from npu_parallel.convert.mtp import num_mtp_layers
from npu_parallel.training.errors import ConfigError

__all__ = ["LayerCost", "StageSplit", "balanced_split", "layer_costs", "parse_pp_layers", "resolve_split"]


@dataclass(frozen=True)
class LayerCost:
    """One part of the model: its parameters and its forward FLOPs per token (2 x the parameters a token runs)."""

    params: float
    flops: float


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def is_moe_layer(config: Any, i: int) -> bool:
    """Whether decoder layer ``i`` is an MoE layer in the family's convention (DeepSeek, Qwen-MoE, Mixtral)."""
    if _get(config, "n_routed_experts"):  # DeepSeek: dense first layers, then every moe_layer_freq-th
        return (
            i >= int(_get(config, "first_k_dense_replace", default=0))
            and i % int(_get(config, "moe_layer_freq", default=1)) == 0
        )
    if _get(config, "num_experts"):  # Qwen-MoE
        only = _get(config, "mlp_only_layers", default=[]) or []
        return i not in only and (i + 1) % int(_get(config, "decoder_sparse_step", default=1)) == 0
    return bool(_get(config, "num_local_experts"))  # Mixtral: every layer


def _attention_params(c: Any) -> float:
    h, heads = c.hidden_size, c.num_attention_heads
    if _get(c, "kv_lora_rank"):  # MLA
        nope, rope, v = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        qr = _get(c, "q_lora_rank")
        q = h * heads * (nope + rope) if not qr else h * qr + qr * heads * (nope + rope)
        kv = h * (c.kv_lora_rank + rope) + c.kv_lora_rank * heads * (nope + v)
        return float(q + kv + heads * v * h)
    hd = _get(c, "head_dim", default=h // heads) or h // heads
    kvh = _get(c, "num_key_value_heads", default=heads)
    return float(2 * h * heads * hd + 2 * h * kvh * hd)


def _mlp(c: Any, i: int) -> tuple[float, float]:
    """(parameters, parameters a token runs) of layer ``i``'s MLP or MoE block."""
    h = c.hidden_size
    if not is_moe_layer(c, i):
        return 3.0 * h * c.intermediate_size, 3.0 * h * c.intermediate_size
    experts = int(_get(c, "n_routed_experts", "num_experts", "num_local_experts"))
    k = int(_get(c, "num_experts_per_tok", default=1))
    width = int(_get(c, "moe_intermediate_size", default=c.intermediate_size))
    shared = 3.0 * h * width * int(_get(c, "n_shared_experts", default=0))
    shared += 3.0 * h * int(_get(c, "shared_expert_intermediate_size", default=0))
    one = 3.0 * h * width
    return experts * one + shared + h * experts, k * one + shared + h * experts


def layer_costs(config: Any) -> tuple[list[LayerCost], LayerCost, LayerCost]:
    """(each decoder layer, what the first stage adds: the embedding, what the last adds: norm, head and MTP)."""
    h, vocab = config.hidden_size, config.vocab_size
    layers = []
    for i in range(config.num_hidden_layers):
        params, active = _mlp(config, i)
        attn = _attention_params(config)
        layers.append(LayerCost(attn + params, 2.0 * (attn + active)))
    head = LayerCost(float(h * vocab), 2.0 * h * vocab)
    last = LayerCost(head.params, head.flops)
    for _ in range(num_mtp_layers(config)):  # an MTP module: a decoder layer (the last one's kind), eh_proj, head
        mtp = layers[-1]
        last = LayerCost(last.params + mtp.params + 2 * h * h, last.flops + mtp.flops + 4.0 * h * h + head.flops)
    return layers, LayerCost(float(h * vocab), 0.0), last


def _weights(config: Any) -> tuple[list[float], float, float]:
    """Per layer, first extra, last extra: parameter share + FLOP share (each normalized by the model's total)."""
    layers, first, last = layer_costs(config)
    p = sum(x.params for x in layers) + first.params + last.params
    f = sum(x.flops for x in layers) + first.flops + last.flops

    def w(x: LayerCost) -> float:
        return x.params / p + x.flops / f

    return [w(x) for x in layers], w(first), w(last)


def balanced_split(costs: list[float], stages: int, first: float = 0.0, last: float = 0.0) -> list[int]:
    """Layer counts per stage (each >= 1, contiguous) minimizing the most expensive stage's cost."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the lowest max-stage cost of putting layers 0..i-1 on stages 0..s-1; cut[s][i] the last cut
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                cost = prefix[i] - prefix[j] + (first if s == 1 else 0.0) + (last if s == stages else 0.0)
                value = max(best[s - 1][j], cost)
                if value < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


@dataclass(frozen=True)
class StageSplit:
    """Decoder layers per stage, in stage order (a virtual stage of interleaved schedules counts as one)."""

    counts: tuple[int, ...]

    def ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` layer indices of each stage."""
        out, start = [], 0
        for c in self.counts:
            out.append((start, start + c))
            start += c
        return out

    def stage_costs(self, config: Any) -> list[float]:
        """Each stage's cost (parameter + FLOP share) under :func:`layer_costs`."""
        costs, first, last = _weights(config)
        out = [sum(costs[a:b]) for a, b in self.ranges()]
        out[0] += first
        out[-1] += last
        return out


def parse_pp_layers(spec: str, num_layers: int, stages: int) -> StageSplit:
    """``--pp_layers a,b,...``: one positive count per stage, summing to the decoder layer count."""
    try:
        counts = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise ConfigError(f"--pp_layers {spec!r}: give one whole number of layers per stage, e.g. 2,3") from None
    if len(counts) != stages:
        raise ConfigError(
            f"--pp_layers {spec!r} names {len(counts)} stages and the pipeline has {stages}; give {stages}"
        )
    if min(counts) < 1 or sum(counts) != num_layers:
        raise ConfigError(
            f"--pp_layers {spec!r} sums to {sum(counts)}: every stage needs >= 1 layer and the counts must sum to the "
            f"model's {num_layers} decoder layers"
        )
    return StageSplit(counts)


def resolve_split(config: Any, stages: int, pp_layers: str | None = None) -> StageSplit:
    """``--pp_layers`` when given, else the balanced split; ConfigError when there are more stages than layers."""
    n = int(config.num_hidden_layers)
    if stages > n:
        raise ConfigError(
            f"{stages} pipeline stages (pp_size x virtual stages) for {n} decoder layers: every stage needs at "
            f"least one layer; lower --pp_size or --pp_virtual"
        )
    if pp_layers:
        return parse_pp_layers(pp_layers, n, stages)
    costs, first, last = _weights(config)
    return StageSplit(tuple(balanced_split(costs, stages, first, last)))
