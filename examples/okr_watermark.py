#!/usr/bin/env python
"""OKR (Opportunistic Keyed Routing) watermark on a converted MoE model, with npu_parallel.override_routing.

    python examples/okr_watermark.py --model PATH --out DIR [--epsilon 2.0]
    torchrun --nproc_per_node 2 examples/okr_watermark.py --model PATH --out DIR --tp 2

Embedding: in every MoE layer, the experts whose raw router logit lies within ``epsilon`` of the token's best
are its candidates. With more candidates than the top-k, the watermark picks k of them by a key: a seeded random
projection of the router input (``[H, E]`` per layer, drawn on the CPU from the seed, so the same buffer on
every rank). The chosen experts keep the weights of the raw logits (the family's own weights at those ids);
with k candidates or fewer nothing changes (fail-open). Generation is greedy, so tp 1 and tp 2 give the
same text.

Detection re-runs a text teacher-forced with the key and counts a hit where the text's token is the keyed
model's greedy choice. Chance is what a decoy key (another seed) scores: with the true key and ``--decoys``
decoys, p_t is the share of the keys predicting token t, and, for a text the key did not make, the true key
is one of them at random, so z = sum(hit_t - p_t) / sqrt(sum p_t (1 - p_t)) is a z-score against chance
(positions where every key agrees add nothing). A text is called watermarked when z > ``--threshold``.

DIR/results.json: over ``--prompts`` prompts, hit rates, chance and z-scores of watermarked and plain
(unhooked) generations, the perplexity of both under the plain model (the cost), the share of routing
decisions and of tokens where the watermark had a choice, and the token ids. DeepSeek-MoE 16B (top-8 of 64,
epsilon 2.0 as in the original experiment): ``--model $DEEPSEEK_MOE_LOCAL_PATH --trust_remote_code``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

import npu_parallel
from npu_parallel.moe.load import moe_blocks

PROMPTS = (
    "The history of the printing press",
    "In a small village by the sea,",
    "The main advantages of renewable energy are",
    "Once upon a time, a young engineer",
    "The recipe for a good bread starts with",
    "Mixture-of-experts models route each token",
    "The train left the station at noon and",
    "A short guide to learning a new language:",
)


class OKRKey:
    """The key: per MoE layer a ``[H, E]`` projection drawn from ``seed`` on the CPU (the same on every rank)."""

    def __init__(self, seed: int, hidden: int, experts: int) -> None:
        self.seed, self.hidden, self.experts = seed, hidden, experts
        self._buffers: dict[tuple[int, torch.device], torch.Tensor] = {}

    def projection(self, layer: int, device: torch.device) -> torch.Tensor:
        if (layer, device) not in self._buffers:
            g = torch.Generator().manual_seed(self.seed * 1009 + layer)
            self._buffers[(layer, device)] = torch.randn(self.hidden, self.experts, generator=g).to(device)
        return self._buffers[(layer, device)]


class Watermark:
    """The override: keyed choice among the experts within ``epsilon`` of the best logit; counts the choices."""

    def __init__(self, key: OKRKey, epsilon: float, top_k: int) -> None:
        self.key, self.epsilon, self.top_k = key, epsilon, top_k
        self.counting = False  # count the choices (while generating)
        self.per_layer: dict[int, list[int]] = {}  # layer -> [routing decisions, those with a choice]

    def __call__(self, layer: int, x: torch.Tensor, raw: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # x [T, H] router input, raw/scores [T, E]; returns ids [T, k]
        k = self.top_k
        plain = scores.topk(k, dim=-1).indices  # the family's own choice
        raw = raw.detach().float()
        allowed = scores.detach() > float("-inf")  # not excluded by the family (V3 group limit)
        cand = (raw >= raw.max(dim=-1, keepdim=True).values - self.epsilon) & allowed  # [T, E]
        keyed_scores = (x.detach().float() @ self.key.projection(layer, x.device)).masked_fill(~cand, float("-inf"))
        keyed = keyed_scores.topk(k, dim=-1).indices
        choice = cand.sum(dim=-1) > k  # [T]; k candidates or fewer: unchanged (fail-open)
        if self.counting:
            seen = self.per_layer.setdefault(layer, [0, 0])
            seen[0] += choice.numel()
            seen[1] += int(choice.sum())
        return torch.where(choice.unsqueeze(-1), keyed, plain)


def load(args, state):
    dtype = getattr(torch, args.dtype or ("float32" if state.device.type == "cpu" else "bfloat16"))
    model = npu_parallel.load_pretrained(
        args.model, state, dtype=dtype, progress=False, trust_remote_code=args.trust_remote_code
    )
    return model.eval()


def prompts(args, model) -> list[torch.Tensor]:
    """Token ids ``[1, n]`` per prompt: the checkpoint's tokenizer on built-in sentences, else seeded random ids."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        return [tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt").input_ids for i in range(args.prompts)]
    except Exception:  # no tokenizer (the tiny test models): random prompts
        g = torch.Generator().manual_seed(args.seed)
        vocab = model.config.vocab_size
        return [torch.randint(3, vocab, (1, args.prompt_tokens), generator=g) for _ in range(args.prompts)]


def generate(model, ids: torch.Tensor, new_tokens: int, watermark: Watermark | None) -> torch.Tensor:
    """Greedy continuation ``[n + new_tokens]``, with the watermark's routing when given."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    ids = ids.to(model.device)
    with torch.no_grad():
        if watermark is None:
            return model.generate(ids, **kwargs)[0].cpu()
        watermark.counting = True
        try:
            with npu_parallel.override_routing(model, watermark):
                return model.generate(ids, **kwargs)[0].cpu()
        finally:
            watermark.counting = False


def predictions(model, text: torch.Tensor, start: int, watermark: Watermark | None) -> torch.Tensor:
    """Teacher-forced greedy predictions for the tokens ``text[start:]`` (under ``watermark``'s routing)."""
    ids = text.unsqueeze(0).to(model.device)
    with torch.no_grad():
        if watermark is None:
            logits = model(input_ids=ids).logits
        else:
            with npu_parallel.override_routing(model, watermark):
                logits = model(input_ids=ids).logits
    logits = logits[0, start - 1 : -1].float()
    eos = model.generation_config.eos_token_id
    if eos is not None:  # generation ran with min_new_tokens: end-of-text was never a choice
        logits[:, torch.as_tensor(eos).reshape(-1)] = float("-inf")
    return logits.argmax(dim=-1).cpu()


def perplexity_terms(model, text: torch.Tensor, start: int) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of ``text[start:]`` under the plain model."""
    ids = text.unsqueeze(0).to(model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, start - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, start:], reduction="sum")
    return float(nll), text.numel() - start


def detect(model, text: torch.Tensor, start: int, marks: list[Watermark]) -> dict:
    """Hits of the true key (``marks[0]``) against chance from the decoys (``marks[1:]``): rates and z."""
    target = text[start:]
    hits = torch.stack([predictions(model, text, start, m) == target for m in marks]).float()  # [keys, n]
    p = hits.mean(dim=0)  # the share of keys predicting each token
    informative = (p > 0) & (p < 1)
    var = float((p * (1 - p)).sum())
    z = float((hits[0] - p).sum()) / math.sqrt(var) if var > 0 else 0.0
    n = int(informative.sum())
    return {
        "z": z,
        "excess": float((hits[0] - p).sum()),  # hits above chance, and their variance: pooled over texts
        "variance": var,
        "hit_rate": float(hits[0][informative].mean()) if n else float("nan"),
        "chance": float(p[informative].mean()) if n else float("nan"),
        "informative_tokens": n,
        "tokens": target.numel(),
    }


def summary(rows: list[dict], threshold: float) -> dict:
    zs = [r["z"] for r in rows]
    rates = [r["hit_rate"] for r in rows if not math.isnan(r["hit_rate"])]
    chance = [r["chance"] for r in rows if not math.isnan(r["chance"])]
    var = sum(r["variance"] for r in rows)
    return {
        "z": zs,
        "z_mean": sum(zs) / len(zs),
        "z_pooled": sum(r["excess"] for r in rows) / math.sqrt(var) if var > 0 else 0.0,  # all texts as one
        "hit_rate": sum(rates) / len(rates) if rates else float("nan"),
        "chance": sum(chance) / len(chance) if chance else float("nan"),
        "detected": sum(z > threshold for z in zs) / len(zs),
    }


def run(args) -> dict:
    state = npu_parallel.init_distributed(args.tp)
    model = load(args, state)
    block = moe_blocks(model)[0][1]  # the routed experts and top-k of the family (every MoE layer alike)
    experts, top_k = block.experts.num_experts, int(model.config.num_experts_per_tok)
    hidden = model.config.hidden_size
    marks = [Watermark(OKRKey(args.seed + i, hidden, experts), args.epsilon, top_k) for i in range(1 + args.decoys)]
    texts, rows = [], {"watermarked": [], "plain": []}
    nll = {"watermarked": [0.0, 0], "plain": [0.0, 0]}
    for prompt in prompts(args, model):
        start = prompt.shape[-1]
        made = {"watermarked": generate(model, prompt, args.new_tokens, marks[0]), "plain": None}
        made["plain"] = generate(model, prompt, args.new_tokens, None)
        for kind, text in made.items():
            rows[kind].append(detect(model, text, start, marks))
            value, count = perplexity_terms(model, text, start)
            nll[kind][0] += value
            nll[kind][1] += count
        texts.append({"prompt": prompt[0].tolist(), **{k: v[start:].tolist() for k, v in made.items()}})
    ppl = {k: math.exp(v / n) for k, (v, n) in nll.items()}
    return {
        "model": str(args.model),
        "tp": args.tp,
        "epsilon": args.epsilon,
        "seed": args.seed,
        "top_k": top_k,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "decoys": args.decoys,
        "threshold_z": args.threshold,
        "watermarked": summary(rows["watermarked"], args.threshold),
        "plain": summary(rows["plain"], args.threshold),
        "perplexity": {**ppl, "cost": ppl["watermarked"] / ppl["plain"] - 1.0},
        "choice_share": _choice_share(marks[0]),
        "per_text": rows,
        "texts": texts,
        "_rank0": state.rank == 0,
    }


def _choice_share(mark: Watermark) -> dict:
    """While generating watermarked text: the share of (token, MoE layer) routing decisions with a choice, and per
    layer the share of tokens with one."""
    decisions = sum(d for d, _ in mark.per_layer.values())
    choices = sum(c for _, c in mark.per_layer.values())
    return {
        "routing_decisions": choices / max(decisions, 1),
        "decisions": decisions,
        "per_layer": {str(layer): c / max(d, 1) for layer, (d, c) in sorted(mark.per_layer.items())},
    }


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=os.environ.get("DEEPSEEK_MOE_LOCAL_PATH"),
        help="Hugging Face MoE checkpoint folder (default: $DEEPSEEK_MOE_LOCAL_PATH)",
    )
    p.add_argument("--out", required=True, help="folder for results.json")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1; torchrun for more)")
    p.add_argument("--epsilon", type=float, default=2.0, help="logit margin of the candidates (default 2.0)")
    p.add_argument("--prompts", type=int, default=8, help="prompts (default 8)")
    p.add_argument("--new_tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    p.add_argument("--prompt_tokens", type=int, default=8, help="random prompt length without a tokenizer")
    p.add_argument("--decoys", type=int, default=8, help="decoy keys that estimate chance (default 8)")
    p.add_argument("--threshold", type=float, default=4.0, help="z above which a text is watermarked (default 4)")
    p.add_argument("--seed", type=int, default=1234, help="the key's seed (decoys: seed+1, seed+2, ...)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, else bfloat16)")
    p.add_argument("--trust_remote_code", action="store_true", help="build the model from its checkpoint's code")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.new_tokens < 1 or args.decoys < 1 or args.epsilon < 0:
        p.error("--prompts, --new_tokens and --decoys must be >= 1 and --epsilon >= 0")
    if not args.model:
        p.error("--model PATH is required (or set DEEPSEEK_MOE_LOCAL_PATH)")
    if not Path(args.model).is_dir():
        p.error(f"--model {args.model}: no such folder")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    results = run(args)
    if results.pop("_rank0"):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        wm, plain = results["watermarked"], results["plain"]
        print(
            f"okr: z watermarked {wm['z_mean']:.2f} (pooled {wm['z_pooled']:.1f}, hit {wm['hit_rate']:.3f} vs "
            f"chance {wm['chance']:.3f}, {wm['detected']:.0%} > {args.threshold}), plain {plain['z_mean']:.2f} "
            f"(pooled {plain['z_pooled']:.1f}, {plain['detected']:.0%}); "
            f"perplexity cost {results['perplexity']['cost']:+.1%}; choice in "
            f"{results['choice_share']['routing_decisions']:.1%} of routing decisions -> {out / 'results.json'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
