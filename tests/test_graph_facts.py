"""Tests for `actfx/passes/graph_facts.py`: which calls write into their input, and aliasing."""

import pytest
import torch
import torch.fx as fx

from actfx.passes.graph_facts import GraphFacts, writes_first_argument

aten = torch.ops.aten


@pytest.mark.parametrize("target,writes", [
    (aten.add_.Tensor, True), (aten.relu_.default, True), (aten.copy_.default, True),
    (aten.index_put_.default, True), (aten.add_, True), (torch.relu_, True), ("mul_", True),
    (aten.add.Tensor, False), (aten.relu.default, False), (torch.relu, False), ("__iadd__", False),
    # writes its running stats (arguments 3 and 4), not its input
    (aten.native_batch_norm.default, False),
])
def test_writes_first_argument(target, writes):
    assert writes_first_argument(target) is writes


def test_aten_inplace_overloads_alias_and_mutate_their_input():
    # What a torch.export graph holds: ATen overloads, whose names end in ".Tensor", not "_".
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(aten.mul.Tensor, (x, x))
    z = graph.call_function(aten.add_.Tensor, (y, x))
    w = graph.call_function(aten.add.Tensor, (z, x))
    graph.output(w)
    facts = GraphFacts(graph)
    assert facts.mutated_input(z, None) is y
    assert facts.same_storage(z, y)
    assert facts.mutated_input(w, None) is None
    assert not facts.same_storage(w, z)
