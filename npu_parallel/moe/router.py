"""Reading a router's output, whatever its layout: the one place that knows the router conventions."""

from __future__ import annotations

import torch


def router_outputs(output: object) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(indices, weights, aux_loss)`` from a router's output, whatever its order.

    transformers 5.x routers return ``(logits, weights, indices)``, 4.5x ``(indices, weights)``,
    DeepSeek's remote-code ``MoEGate`` ``(indices, weights[, aux_loss])``; a plain ``nn.Linear`` gate
    (older Mixtral) returns logits only, giving ``(None, None, None)``. The indices are the integer
    tensor, the weights the floating tensor of the same shape, the auxiliary loss a floating scalar.
    """
    if isinstance(output, torch.Tensor) or not isinstance(output, (tuple, list)):
        return None, None, None
    tensors = [t for t in output if isinstance(t, torch.Tensor)]
    at = next((i for i, t in enumerate(tensors) if not t.is_floating_point() and t.dim() >= 1), None)
    indices = weights = None
    if at is not None:
        indices = tensors[at]
        same = [i for i, t in enumerate(tensors) if t.is_floating_point() and t.shape == indices.shape]
        # the one nearest the indices: with every expert picked (k == E) the logits have their shape too
        weights = tensors[min(same, key=lambda i: abs(i - at))] if same else None
    aux = next((t for t in tensors if t.is_floating_point() and t.numel() == 1 and t is not weights), None)
    return indices, weights, aux


def router_logits(output: object, num_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor | None:
    """The router logits ``[T, E]`` in a router's output (transformers 5.x: its first tensor), or None.

    The first floating tensor whose last dimension is ``num_experts`` that is not the routing ``weights``
    (with every expert picked, k == E, both have that shape; transformers puts the logits first).
    """
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() and output.shape[-1] == num_experts else None
    if not isinstance(output, (tuple, list)):
        return None
    for t in output:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2 and t is not weights:
            if t.shape[-1] == num_experts:
                return t
    return None
