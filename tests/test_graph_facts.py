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


class _Rotated(torch.nn.Module):
    """q times a table computed from a buffer, as RoPE's ``q * cos``."""

    def __init__(self, d=16):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, d))

    def forward(self, x):
        angle = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.freq
        return (self.lin(x) * angle.cos()).relu()


def test_a_factor_whose_partner_needs_no_gradient_is_not_packed():
    """Only the table's gradient would read q, and the table needs none: q was packed in every
    layer of a Llama and never kept. Now no pack is made; the gradient is unchanged."""
    import actfx
    from actfx.passes.graph_facts import GraphFacts
    from actfx.variants.packing import pack_value

    torch.manual_seed(0)
    model, x = _Rotated(), torch.randn(4, 8, 16)
    graph = torch.fx.symbolic_trace(model).graph
    facts = GraphFacts(graph)
    cos = next(n for n in graph.nodes if n.target == "cos")
    lin = next(n for n in graph.nodes if n.op == "call_module")
    assert facts.needs_no_gradient(cos) and not facts.needs_no_gradient(lin)
    converted = actfx.convert(model, bits=8)
    product = next(d for d in converted._actfx_record.decisions if d.kind == "mul")
    assert product.saved == ["kept exact", "kept exact"]  # q: kept only if the table needed a gradient
    packed = [n.args[0].name for n in converted._actfx_record.graphs[""][True].nodes if n.target is pack_value]
    assert "lin" not in packed
    torch.testing.assert_close(torch.autograd.grad(converted(x).sum(), model.lin.weight)[0],
                               torch.autograd.grad(model(x).sum(), model.lin.weight)[0], rtol=0.05, atol=1e-3)
