"""The head-count attributes an attention forward reads, divided by tp and checked at conversion time.

Attention code reshapes with sizes it keeps on ``self``: ``num_heads``, ``num_key_value_heads``, and in
older code (DeepSeek-MoE 16B's remote ``DeepseekAttention``) the width of the attention output as
``hidden_size``. Splitting the projections without dividing every one of them fails deep inside the
forward ("shape '[2, 16, 64]' is invalid for input of size 1024"); :func:`check_heads_patched` reads the
forward's source instead and names the attribute a style left whole, before any tensor moves.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from torch import nn

# sizes proportional to the number of heads, under the names attention code gives them
HEAD_ATTRS = frozenset(
    {
        "num_heads",
        "num_attention_heads",
        "num_key_value_heads",
        "num_kv_heads",
        "n_heads",
        "n_kv_heads",
        "n_local_heads",
        "hidden_size",
        "embed_dim",
        "all_head_size",
    }
)


_READS: dict[type, frozenset[str]] = {}


def forward_reads(cls: type) -> frozenset[str]:
    """Names ``self.X`` read in the ``forward`` of ``cls`` and its bases (empty when the source is unavailable)."""
    if cls in _READS:
        return _READS[cls]
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or "forward" not in vars(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(vars(klass)["forward"])))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Load)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
    _READS[cls] = frozenset(names)
    return _READS[cls]


def divide_heads(module: nn.Module, values: dict[str, int]) -> set[str]:
    """Set each attribute of ``values`` the module has; returns the names set."""
    done = set()
    for name, value in values.items():
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, value)
            done.add(name)
    return done


def check_heads_patched(module: nn.Module, path: str, patched: set[str], tp_size: int, style: str) -> None:
    """A ValueError when the forward reads a head-proportional size that the style did not divide."""
    if tp_size == 1:
        return
    left = sorted(
        a
        for a in forward_reads(type(module)) & HEAD_ATTRS
        if a not in patched and isinstance(getattr(module, a, None), int)
    )
    if left:
        sizes = ", ".join(f"self.{a} = {getattr(module, a)}" for a in left)
        raise ValueError(
            f"{path} ({type(module).__name__}): its forward reads {sizes}, which tp={tp_size} splits, but the "
            f"plan's {style} style does not divide it; add it to the style's attributes in the family's plan"
        )
