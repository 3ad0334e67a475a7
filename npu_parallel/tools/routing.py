"""Tokens per expert per MoE layer on a sample (``npu-parallel inspect PATH --routing``).

Loads the unconverted model in one process, hooks every router found by
:func:`npu_parallel.routers.find_moe_blocks`, runs one forward over a sample (text from ``--data`` through
the checkpoint's tokenizer, bytes when it has none; else seeded random ids) and counts how many
token-slots each expert receives. Imbalance is max / mean: 1.0 is perfectly even, ``E / top_k`` is
every token on the same experts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from npu_parallel.convert.moe_blocks import find_moe_blocks
from npu_parallel.moe.router import router_outputs


def sample_ids(path: str | Path, config, data: str | None, tokens: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``[1, n]`` input ids and a description of where they came from.

    ``data`` must be UTF-8 text (else a UserError naming the file and the first bad byte: never replaced).
    """
    if tokens < 1:
        raise ValueError(f"tokens={tokens}: the sample needs at least one token")
    limit = min(tokens, getattr(config, "max_position_embeddings", tokens) or tokens)
    if data:
        from npu_parallel.tools.checks import read_text
        from npu_parallel.training.data import ByteTokenizer, load_tokenizer

        text = read_text(data)
        tok = load_tokenizer(path, config.vocab_size, getattr(config, "eos_token_id", None))
        ids = tok.encode(text)[:limit]
        if not ids:
            raise ValueError(f"{data}: no tokens in the file")
        how = "bytes" if isinstance(tok, ByteTokenizer) else "tokenizer"
        return torch.tensor([ids]), f"{len(ids)} tokens of {data} ({how})"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (1, limit), generator=g), f"{limit} random token ids (seed {seed})"


def routing_counts(model, ids: torch.Tensor) -> list[dict]:
    """Per MoE block: layer, path, top_k and token-slots per expert (a list of E ints)."""
    blocks = find_moe_blocks(model)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for info in blocks:

        def hook(module, args, out, info=info):
            indices, _, _ = router_outputs(out)
            if indices is None and isinstance(out, torch.Tensor) and info.top_k:  # nn.Linear gate: logits only
                indices = out.float().softmax(-1).topk(info.top_k, dim=-1).indices
            if indices is not None:
                seen[info.path] = indices.detach().reshape(-1).cpu()

        handles.append(info.router.register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for info in blocks:
        idx = seen.get(info.path)
        counts = torch.bincount(idx, minlength=info.num_experts) if idx is not None else torch.zeros(info.num_experts)
        c = counts.float()
        mean = c.mean().item()
        rows.append(
            {
                "layer": info.layer,
                "path": info.path,
                "top_k": info.top_k,
                "counts": counts.tolist(),
                "min": int(c.min().item()),
                "max": int(c.max().item()),
                "mean": mean,
                "imbalance": c.max().item() / mean if mean else float("nan"),
                "unused": int((counts == 0).sum().item()),
            }
        )
    return rows


def format_routing(rows: list[dict], source: str, show_counts: int = 16) -> str:
    lines = [
        f"routing on {source}: token-slots per expert (imbalance = max / mean)",
        f"{'layer':<6} {'experts':>7} {'top_k':>5} {'min':>5} {'max':>5} {'mean':>7} {'imbalance':>9} "
        f"{'unused':>6}  counts",
    ]
    for r in rows:
        counts = r["counts"]
        shown = " ".join(str(c) for c in counts[:show_counts]) + (" ..." if len(counts) > show_counts else "")
        lines.append(
            f"{r['layer']!s:<6} {len(counts):>7} {r['top_k']!s:>5} {r['min']:>5} {r['max']:>5} "
            f"{r['mean']:>7.1f} {r['imbalance']:>9.2f} {r['unused']:>6}  {shown}"
        )
    if rows:
        worst = max(rows, key=lambda r: r["imbalance"])
        lines.append(
            f"most imbalanced: layer {worst['layer']} ({worst['imbalance']:.2f}x the mean on its busiest expert)"
        )
    return "\n".join(lines)


def plot_routing(rows: list[dict], out: str | Path, source: str) -> Path:
    """Heat map, layer x expert, of token-slots per expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(r["counts"]) for r in rows)
    grid = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        grid[i, : len(r["counts"])] = torch.tensor(r["counts"], dtype=torch.float32)
    fig, ax = plt.subplots(figsize=(min(16, 3 + width * 0.15), 1.5 + 0.35 * len(rows)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [str(r["layer"]) for r in rows])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"token-slots per expert ({source})", fontsize=9)
    fig.colorbar(im, ax=ax)
    from npu_parallel.training.metrics import save_figure

    return save_figure(fig, out)


def inspect_routing(
    path: str | Path, data: str | None = None, tokens: int = 256, seed: int = 0, plot: str | None = None
) -> tuple[list[dict], str]:
    from transformers.utils import logging as hf_logging

    from npu_parallel.checkpoint.hf_source import load_config
    from npu_parallel.checkpoint.remote_code import load_hf_model

    hf_logging.disable_progress_bar()
    config = load_config(path)
    model = load_hf_model(path, torch.float32)
    ids, source = sample_ids(path, config, data, tokens, seed)
    rows = routing_counts(model, ids)
    if plot:
        plot_routing(rows, plot, source)
    return rows, source
