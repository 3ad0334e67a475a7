"""Rank worker: generate() on converted models at tp 2, ranks seeded differently, against the unconverted model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import npu_parallel

from .models import load_reference

SEED = 1234
SAMPLING = dict(do_sample=True, temperature=1.3, top_p=0.9, top_k=0)
NEW = 10


def _prompt(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 5), generator=torch.Generator().manual_seed(7))


def _all(t: torch.Tensor) -> list[list[list[int]]]:
    """Every rank's tokens, rank order."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, t.tolist())
    return out


def compare(root: str, names: list[str]) -> dict:
    """Per variant: greedy and sampled tokens of every rank and of the reference, and rank 0's RNG check."""
    state = npu_parallel.init_distributed(2)
    results = {}
    for name in names:
        path = Path(root) / name
        ref = load_reference(name, path).eval()
        model = npu_parallel.load_pretrained(path, state, progress=False).eval()
        ids = _prompt(model.config.vocab_size)
        fixed = dict(max_new_tokens=NEW, min_new_tokens=NEW)  # no early EOS: the raw run below must not hang
        with torch.no_grad():
            greedy = model.generate(ids, do_sample=False, **fixed)
            greedy_nocache = model.generate(ids, do_sample=False, use_cache=False, **fixed)
            ref_greedy = ref.generate(ids, do_sample=False, **fixed)

            torch.manual_seed(SEED + 1000 * state.rank)  # as torchrun users leave them: one seed per rank
            sampled = model.generate(ids, **SAMPLING, **fixed)
            after = torch.get_rng_state()
            torch.manual_seed(SEED + 1000 * state.rank)
            raw = type(model).generate(model, ids, **SAMPLING, **fixed)  # transformers' own: no agreement
            torch.manual_seed(SEED)
            ref_sampled = ref.generate(ids, **SAMPLING, **fixed)
            ref_after = torch.get_rng_state()
            torch.manual_seed(SEED + 1000 * state.rank)
            again = model.generate(ids, **SAMPLING, max_new_tokens=NEW)  # EOS allowed: the ranks stop together
        results[name] = {
            "greedy": _all(greedy),
            "greedy_nocache": greedy_nocache.tolist(),
            "ref_greedy": ref_greedy.tolist(),
            "sampled": _all(sampled),
            "raw": _all(raw),
            "ref_sampled": ref_sampled.tolist(),
            "again": _all(again),
            "rng_after_as_ref": bool(torch.equal(after, ref_after)),
        }
    return results


def compare_ep(root: str, names: list[str]) -> dict:
    """tp 1, ep 2: each rank its own prompt and seed; tokens against the reference on that prompt, rank 0's seed."""
    state = npu_parallel.init_distributed(1, ep_size=2)
    results = {}
    for name in names:
        path = Path(root) / name
        ref = load_reference(name, path).eval()
        model = npu_parallel.load_pretrained(path, state, progress=False).eval()
        ids = _prompt(model.config.vocab_size)[state.rank : state.rank + 1]  # a different prompt on each rank
        with torch.no_grad():
            torch.manual_seed(SEED + 1000 * state.rank)
            sampled = model.generate(ids, **SAMPLING, max_new_tokens=NEW)  # EOS allowed: synced_gpus keeps step
            refs = []
            for r in range(2):
                torch.manual_seed(SEED)
                refs.append(ref.generate(_prompt(model.config.vocab_size)[r : r + 1], **SAMPLING, max_new_tokens=NEW))
        results[name] = {"sampled": _all(sampled), "ref": [t.tolist() for t in refs]}
    return results
