"""Start a measuring backward where a pack's noise enters it, not at the loss.

Why: calibration runs one backward per pack and measured width (ResNet-50 in ``actfx plan``:
189 of them, 19 of its 28 s), and each ran from the loss down, although above the nodes that
read the pack every gradient is the exact backward's. The exact backward records what every
autograd node passes down; a measurement then starts at the nodes the noise reaches (the
readers and everything below them), fed the recorded gradients of the nodes above, and asks
only for the parameters below.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


class RecordedBackward:
    """The exact gradient of ``loss`` for ``params`` (``exact``), and what each node passed to
    the nodes below it meanwhile. Which nodes read a pack, the caller notes while this backward
    runs (``torch._C._current_autograd_node()`` in its unpack hook)."""

    def __init__(self, loss: torch.Tensor, params: list):
        self.loss, self.params = loss, params
        self.passed: dict = {}  # node -> its gradients for next_functions, in order
        self.parents: dict = {}  # node -> [(parent, index in parent.next_functions, input slot)]
        self.accumulators = [get_gradient_edge(p).node for p in params]
        nodes = _nodes_below([loss.grad_fn])
        for node in nodes:
            for i, (child, slot) in enumerate(node.next_functions):
                if child is not None:
                    self.parents.setdefault(child, []).append((node, i, slot))
        handles = [node.register_hook(functools.partial(self._record, node)) for node in nodes if node.next_functions]
        try:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        self.exact = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]

    def _record(self, node, grad_inputs, grad_outputs):
        self.passed[node] = grad_inputs

    def restarted(self, readers) -> tuple:
        """(outputs, grad_outputs, indices of the parameters reached) of the backward below the
        nodes ``readers``: their noise changes only what they and the nodes below compute."""
        below = set(_nodes_below(readers))
        fed: dict = {}
        if self.loss.grad_fn in below:
            fed[(self.loss.grad_fn, 0)] = torch.ones_like(self.loss)
        for node in below:
            for parent, i, slot in self.parents.get(node, ()):
                grads = self.passed.get(parent)  # a parent never run leads to no parameter
                if parent in below or grads is None or grads[i] is None:
                    continue
                fed[(node, slot)] = grads[i] if (node, slot) not in fed else fed[(node, slot)] + grads[i]
        reached = [k for k, acc in enumerate(self.accumulators) if acc in below]
        return [GradientEdge(node, slot) for node, slot in fed], list(fed.values()), reached


def _nodes_below(starts) -> list:
    """Every autograd node reachable from ``starts`` (included), each once."""
    seen, stack, order = set(), [n for n in starts if n is not None], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return order


def restarted_gradient(outputs: list, grad_outputs: list, params: list) -> list:
    """The gradient for ``params`` of a backward started at ``outputs`` (GradientEdges)."""
    if not outputs or not params:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
