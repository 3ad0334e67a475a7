"""What an upcycling run makes: source and target families, the checked request, the target config.

Function preservation at init (every target; the proof is tests/test_upcycle.py):

* Expert ``e`` holds chunk ``c = e % G`` of the dense FFN (rows ``c*I/G:(c+1)*I/G`` of gate/up, the same
  columns of down) for replica ``r = e // G``. The router row of expert ``e`` is row ``r`` of a seeded
  ``[E/G, H]`` matrix, so the G chunks of one replica get equal logits and equal probabilities; with top-k a
  multiple of G the selection is whole replicas, the renormalized weights of a replica's chunks add to
  ``p_r / (G * sum p)``, and the down rows are scaled by G so that the routed sum is the dense FFN.
* A shared expert (Qwen2-MoE, DeepSeek-V2) holds the whole dense FFN. Dense output = 1/2 shared + 1/2 routed:
  Qwen2-MoE's gate ``sigmoid(shared_expert_gate x)`` is exactly 1/2 with a zero gate row; DeepSeek's shared
  experts are ungated, so their down rows are scaled by 1/2; the routed down rows by 1/2 as well.
* Top-k without renormalization (DeepSeek-V2 in transformers) is exact only when every probability is 1/E:
  a zero router, ``routed_scaling_factor = E/K``, plain (G = 1) upcycling. Qwen's ``norm_topk_prob=False`` is
  never exact; the command says so and names ``norm_topk_prob=True`` (its default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from npu_parallel.checkpoint.safetensors_io import CheckpointError

# source model_type -> (natural target, targets whose attention and norms are the source's own)
SOURCES = {
    "llama": ("mixtral", ("mixtral",)),
    "mistral": ("mixtral", ("mixtral",)),
    "qwen2": ("qwen2_moe", ("qwen2_moe",)),
    "qwen3": ("qwen3_moe", ("qwen3_moe",)),
    "deepseek_v2": ("deepseek_v2", ("deepseek_v2",)),
}
TARGETS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")
ROUTER_STD = 0.02  # the seeded router's normal init (Megatron's init_method_std); 0 where only a zero router is exact
MLP_KEYS = ("gate_proj", "up_proj", "down_proj")
# target -> (expert key names for gate, up, down; the MoE module's name on disk)
EXPERT_KEYS = {
    "mixtral": (("w1", "w3", "w2"), "block_sparse_moe"),
    "qwen2_moe": (MLP_KEYS, "mlp"),
    "qwen3_moe": (MLP_KEYS, "mlp"),
    "deepseek_v2": (MLP_KEYS, "mlp"),
}
SHARED_NAME = {"qwen2_moe": "shared_expert", "deepseek_v2": "shared_experts"}
# keys the source config may carry that no target config wants (checked to be off first)
DENSE_ONLY = ("mlp_bias",)


@dataclass(frozen=True)
class Request:
    """A checked upcycling request: every number the writer needs."""

    source_type: str
    target: str
    experts: int
    top_k: int
    granularity: int
    layers: tuple[int, ...]  # the layers made MoE
    num_layers: int
    hidden: int
    intermediate: int
    shared: int  # 0 or 1: one shared expert holding the dense FFN
    seed: int
    norm_topk_prob: bool = True
    notes: list[str] = field(default_factory=list)  # one line each: where and why the result is not exact

    @property
    def chunk(self) -> int:
        return self.intermediate // self.granularity

    @property
    def router_std(self) -> float:
        return 0.0 if self.target == "deepseek_v2" else ROUTER_STD

    def down_scale(self) -> float:
        """Factor on each routed expert's down rows (see the module docstring)."""
        return self.granularity * (0.5 if self.shared else 1.0)

    def shared_down_scale(self) -> float:
        return 0.5 if self.target == "deepseek_v2" else 1.0  # Qwen2-MoE's zero-row sigmoid gate halves it

    def exact(self) -> bool:
        return not self.notes


def parse_layers(spec: str | None, num_layers: int) -> tuple[int, ...]:
    """``None``/``all`` or ``"1,3-5"`` -> sorted layer indices, each checked against the model's depth."""
    if spec is None or spec.strip().lower() == "all":
        return tuple(range(num_layers))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise CheckpointError(f"--layers {spec!r}: {part!r} is not N or N-M; write e.g. 1,3-5 or all") from None
        if not 0 <= first <= last < num_layers:
            raise CheckpointError(f"--layers {spec!r}: {part!r} is outside the model's layers 0-{num_layers - 1}")
        out.update(range(first, last + 1))
    return tuple(sorted(out))


def check_request(config: dict, *, experts: int, top_k: int, granularity: int = 1, layers: str | None = None,
                  shared_experts: int | None = None, target: str | None = None, seed: int = 0,
                  norm_topk_prob: bool = True) -> Request:  # fmt: skip
    """The request checked against the source config; a CheckpointError names the value, the rule and the fix."""
    kind = config.get("model_type")
    if kind not in SOURCES:
        raise CheckpointError(
            f"model_type {kind!r}: upcycle reads dense {', '.join(SOURCES)} checkpoints; this is not one of them"
        )
    natural, allowed = SOURCES[kind]
    target = target or natural
    if target not in allowed:
        raise CheckpointError(
            f"--to {target}: a {kind} source's attention does not fit {target}; use --to {' or '.join(allowed)}"
        )
    n = int(config.get("num_hidden_layers", 0))
    if kind == "deepseek_v2" and config.get("n_routed_experts") and int(config.get("first_k_dense_replace", 0)) < n:
        raise CheckpointError("the source deepseek_v2 checkpoint already has MoE layers; upcycle reads dense ones")
    for key in DENSE_ONLY:
        if config.get(key):
            raise CheckpointError(f"the source config has {key}=true; no MoE target holds MLP biases")
    if kind in ("llama", "mistral") and config.get("attention_bias"):
        raise CheckpointError("the source config has attention_bias=true; Mixtral's attention has no biases")
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    if experts < 1 or granularity < 1 or top_k < 1:
        raise CheckpointError(f"--experts {experts}, --top_k {top_k}, --granularity {granularity}: each must be >= 1")
    if experts % granularity:
        raise CheckpointError(
            f"--experts {experts} is not a multiple of --granularity {granularity}; each FFN chunk needs E/G copies"
        )
    if top_k > experts:
        raise CheckpointError(f"--top_k {top_k} is larger than --experts {experts}; choose top_k <= experts")
    if top_k % granularity:
        raise CheckpointError(
            f"--top_k {top_k} is not a multiple of --granularity {granularity}: a token must get all G chunks of "
            f"its FFN copy to equal the dense model; use --top_k {granularity * max(1, top_k // granularity)}"
        )
    if inter % granularity:
        raise CheckpointError(f"--granularity {granularity} does not divide intermediate_size {inter}")
    picked = parse_layers(layers, n)
    if not picked:
        raise CheckpointError(f"--layers {layers!r}: no layer chosen")
    _check_layers(target, picked, n)
    shared = (1 if target in SHARED_NAME else 0) if shared_experts is None else shared_experts
    _check_shared(target, shared)
    notes = []
    if target == "deepseek_v2" and granularity > 1:
        notes.append(
            "deepseek_v2 does not renormalize its top-k weights, so granular upcycling cannot equal the dense model "
            "at init (ties of a zero router split chunk groups); the closest exact choice is --granularity 1"
        )
    if not norm_topk_prob and target in ("qwen2_moe", "qwen3_moe"):
        notes.append(
            "norm_topk_prob=false scales the routed output by the sum of the top-k probabilities, so the model "
            "is not the dense one at init; the closest exact choice is norm_topk_prob=true (drop --no_norm_topk_prob)"
        )
    return Request(kind, target, experts, top_k, granularity, picked, n, hidden, inter, shared, seed,
                   norm_topk_prob, notes)  # fmt: skip


def _check_layers(target: str, picked: tuple[int, ...], n: int) -> None:
    if len(picked) == n:
        return
    if target == "mixtral":
        raise CheckpointError(
            "--layers: mixtral has an MoE block in every layer and cannot keep dense ones; upcycle all layers"
        )
    if target == "deepseek_v2" and picked != tuple(range(picked[0], n)):
        raise CheckpointError(
            f"--layers: deepseek_v2 keeps only the first k layers dense (first_k_dense_replace); "
            f"choose --layers {picked[0]}-{n - 1}"
        )


def _check_shared(target: str, shared: int) -> None:
    if shared not in (0, 1):
        raise CheckpointError(
            f"--shared_experts {shared}: use 0 or 1; a second copy of the dense FFN in the shared block gets the "
            f"same gradients as the first and never becomes different"
        )
    if shared and target not in SHARED_NAME:
        raise CheckpointError(f"--shared_experts 1: {target} has no shared experts; use --to qwen2_moe or deepseek_v2")
    if target in SHARED_NAME and not shared:
        # transformers' DeepseekV2 builds n_shared_experts shared experts whatever the config (an int, never None)
        raise CheckpointError(f"--shared_experts 0: {target} always has a shared expert; use 1 (the default)")


def target_config(source: dict, req: Request) -> dict:
    """The target's config.json contents: the source's own fields with the MoE ones set."""
    drop = {"model_type", "architectures", "transformers_version", "auto_map", *DENSE_ONLY}
    if req.source_type in ("llama", "mistral"):
        drop |= {"attention_bias", "pretraining_tp"}
    cfg = {k: v for k, v in source.items() if k not in drop}
    e, k, chunk = req.experts, req.top_k, req.chunk
    dense = [i for i in range(req.num_layers) if i not in req.layers]
    if req.target == "mixtral":
        cfg.update(num_local_experts=e, num_experts_per_tok=k, intermediate_size=chunk)
    elif req.target in ("qwen2_moe", "qwen3_moe"):
        cfg.update(
            num_experts=e, num_experts_per_tok=k, moe_intermediate_size=chunk, mlp_only_layers=dense,
            decoder_sparse_step=1, norm_topk_prob=req.norm_topk_prob,
        )  # fmt: skip
        if req.target == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = req.intermediate
    else:
        cfg.update(
            n_routed_experts=e, num_experts_per_tok=k, moe_intermediate_size=chunk,
            first_k_dense_replace=req.layers[0], moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1,
            routed_scaling_factor=e / k, n_shared_experts=req.granularity if req.shared else None,
        )  # fmt: skip
    return cfg
