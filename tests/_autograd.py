"""Which operations a loss's autograd graph holds (to check which code path computed it)."""

from __future__ import annotations

import torch


def graph_names(loss: torch.Tensor) -> set[str]:
    """The class names of every node in ``loss``'s backward graph."""
    nodes, seen = [loss.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}
