"""SavedPair keeps the partitioned forward and backward in step when a saved value is added."""

from __future__ import annotations

import operator

import torch
from torch import fx

from actfx.passes.saved_pair import SavedPair


def _node(graph, target, args, name):
    node = graph.create_node("call_function", target, args, name=name)
    node.meta["val"] = torch.empty(3)
    return node


def test_added_saved_values_read_their_own_values_when_backward_names_collide():
    # The forward computes u and u_1; the backward already has a node named u. Added as saved
    # values, they become backward arguments renamed u_1 and u_2: generated code that named the
    # arguments after their original names read u's value for both (seen on torchvision's
    # ResNet-18 with the compiled path's graphs run as fx code).
    fwd = fx.Graph()
    x = fwd.placeholder("x")
    x.meta["val"] = torch.empty(3)
    u = _node(fwd, operator.mul, (x, 2.0), "u")
    u_1 = _node(fwd, operator.mul, (x, 3.0), "u_1")
    total = _node(fwd, torch.sum, (x,), "total")
    fwd.output((total, x))
    bwd = fx.Graph()
    saved_x = bwd.placeholder("x")
    tangent = bwd.placeholder("tangents_1")
    local = _node(bwd, operator.mul, (saved_x, tangent), "u")
    out = bwd.output((local,))
    pair = SavedPair(fx.GraphModule({}, fwd), fx.GraphModule({}, bwd), num_fwd_outputs=1)

    got_u = pair.add_saved(u, like=x)
    got_u_1 = pair.add_saved(u_1, like=x)
    with bwd.inserting_before(out):
        combined = _node(bwd, operator.add, (local, _node(bwd, operator.mul, (got_u_1, 10.0), "scaled")), "combined")
        combined = _node(bwd, operator.add, (combined, _node(bwd, operator.mul, (got_u, 100.0), "scaled_u")), "both")
    out.update_arg(0, (combined,))

    forward, backward = fx.GraphModule({}, fwd), fx.GraphModule({}, bwd)
    value = torch.tensor([1.0, 2.0, 3.0])
    _, saved_u, saved_u_1, saved_value = forward(value)
    (grad,) = backward(saved_u, saved_u_1, saved_value, torch.ones(3))
    torch.testing.assert_close(grad, value + 10 * (3 * value) + 100 * (2 * value))
    assert [p.target for p in bwd.find_nodes(op="placeholder")] == [p.name for p in bwd.find_nodes(op="placeholder")]


class _ReluBetweenConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.act1 = torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(inplace=True)
        self.conv2, self.act2 = torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU()
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x)))).mean((2, 3)))


def test_a_mask_the_partitioner_moved_into_forward_names_the_module_of_its_input():
    """``le(relu_out, 0)`` comes from backward's graph with no module of its own; actfx.show
    listed such masks without a module path (18 of SqueezeNet's 45 rows)."""
    import warnings

    from actfx.compiled_estimate import estimate_compiled
    from actfx.config import Config
    from actfx.passes.saved_plan import Storage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = estimate_compiled(_ReluBetweenConvs(), (torch.randn(2, 3, 16, 16),), Config(bits=2))
    masks = [v.module_path for plan in record.plans for v in plan.saved if v.storage is Storage.MASK]
    assert sorted(masks) == ["act1", "act2"]
