"""Whole-model capture with torch.export (actfx/passes/export_capture.py) and the ATen-to-functional
pass it runs (actfx/passes/aten_to_functional.py).

Every comparison here is bitwise (``torch.equal`` / ``assert_close`` with zero tolerance): the
rewritten graph calls the very same ATen ops, in the same order, with the same RNG draws.
"""

from __future__ import annotations

import copy
import dataclasses
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Graph, GraphModule

from actfx.passes.aten_to_functional import to_functional
from actfx.passes.export_capture import exported_call, export_graph, forward_from_graph, split_example_inputs

aten = torch.ops.aten


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ a model fx cannot trace


@dataclasses.dataclass
class LMOutput:
    logits: torch.Tensor
    hidden: torch.Tensor


torch.export.register_dataclass(LMOutput)


class TinyLM(nn.Module):
    """Unpacks ``input_ids.shape`` and branches on it: fx's symbolic tracing cannot follow that."""

    def __init__(self, vocab=32, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Embedding(64, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        b, t = input_ids.shape
        x = self.emb(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        if t > 1:  # attention only when there is more than one position
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        x = x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))
        logits = self.head(x)
        if attention_mask is not None:
            logits = logits * attention_mask.unsqueeze(-1)
        return LMOutput(logits=logits, hidden=x)


def _lm_inputs(batch, seq):
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, 32, (batch, seq), generator=g)
    mask = torch.ones(batch, seq)
    mask[0, -1] = 0
    return ids, mask


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = TinyLM().train()
    ids, mask = _lm_inputs(2, 5)
    return model, export_graph(model, ((ids,), {"attention_mask": mask}))


def test_fx_cannot_trace_the_model():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(TinyLM())


@pytest.mark.parametrize("batch, seq", [(2, 5), (3, 9), (4, 2)])
def test_generated_forward_on_the_original_model_matches_it(lm, batch, seq):
    """Dynamic batch and sequence dims: one export serves other sizes, with dropout active."""
    model, gm = lm
    forward = forward_from_graph(gm)
    ids, mask = _lm_inputs(batch, seq)
    torch.manual_seed(1)
    expected = model(ids, attention_mask=mask)
    torch.manual_seed(1)
    got = forward(model, ids, attention_mask=mask)
    assert isinstance(got, LMOutput)
    assert_same(got.logits, expected.logits)
    assert_same(got.hidden, expected.hidden)
    got.logits.sum().backward()
    assert model.qkv.weight.grad is not None
    model.zero_grad()


def test_nodes_are_functional_calls(lm):
    _, gm = lm
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    for fn in (F.linear, F.layer_norm, F.scaled_dot_product_attention, F.gelu, torch.dropout, F.embedding,
               operator.mul, operator.add):
        assert fn in targets, fn
    methods = {n.target for n in gm.graph.nodes if n.op == "call_method"}
    assert {"view", "permute", "unbind", "transpose", "reshape", "size"} <= methods
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs["is_causal"] is True


def test_get_attr_targets_are_the_original_tensors(lm):
    model, gm = lm
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert attrs and set(attrs) <= set(named)
    for target in attrs:
        assert gm.get_parameter(target) is named[target]
    assert exported_call(gm).carried == {}


def test_export_keeps_modes_and_state():
    torch.manual_seed(0)
    model = TinyLM().eval()
    before = copy.deepcopy(model.state_dict())
    gm = export_graph(model, _lm_inputs(2, 4))
    assert not any(m.training for m in model.modules())
    dropout = next(n for n in gm.graph.nodes if n.target is torch.dropout)
    assert dropout.args[2] is True  # captured in train mode
    for name, value in model.state_dict().items():
        assert_same(value, before[name])


# ------------------------------------------------------------------ BatchNorm buffers


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.body(x))


def test_batchnorm_running_stats_update_through_the_generated_forward():
    torch.manual_seed(0)
    model = SmallCNN().train()
    reference = copy.deepcopy(model)
    gm = export_graph(model, (torch.randn(4, 3, 8, 8),))
    assert model.body[1].num_batches_tracked.item() == 0  # exporting ran no real step
    targets = {n.target for n in gm.graph.nodes}
    assert {F.conv2d, F.batch_norm, torch.relu_, F.max_pool2d, F.silu, F.adaptive_avg_pool2d, F.linear} <= targets
    forward = forward_from_graph(gm)
    for step, shape in enumerate([(4, 3, 8, 8), (7, 3, 8, 8)]):  # dims 0-1 dynamic; H, W fixed
        x = torch.randn(shape)
        expected, got = reference(x), forward(model, x)
        assert_same(got, expected)
        expected.square().sum().backward()
        got.square().sum().backward()
        for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
            assert_same(b, a)
        assert model.body[5].num_batches_tracked.item() == step + 1
    for a, b in zip(reference.parameters(), model.parameters()):
        assert_same(b.grad, a.grad)


# ------------------------------------------------------------------ inputs, guards, errors


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask=None, **kwargs):
        y = self.lin(x) * kwargs.get("scale", 1.0)
        return {"y": y if mask is None else y * mask}


@pytest.mark.parametrize("form", ["tuple", "dict", "pair"])
def test_example_input_forms(form):
    model, x = Affine(), torch.randn(2, 3, 4)
    inputs = {"tuple": (x,), "dict": {"x": x}, "pair": ((x,), {})}[form]
    forward = forward_from_graph(export_graph(model, inputs))
    assert_same(forward(model, x)["y"], model(x)["y"])


@pytest.mark.parametrize("bad", [torch.randn(2, 4), [torch.randn(2, 4)], None])
def test_bad_example_inputs_raise_type_error(bad):
    with pytest.raises(TypeError, match="example_inputs must be"):
        export_graph(Affine(), bad)
    with pytest.raises(TypeError, match="do not fit"):
        export_graph(Affine(), (torch.randn(2, 4),) * 3)
    assert split_example_inputs(((1,), {"a": 2})) == ((1,), {"a": 2})


def test_keyword_arguments_through_var_kwargs_and_bind():
    model, x, mask = Affine(), torch.randn(2, 3, 4), torch.rand(2, 3, 1)
    gm = export_graph(model, ((x,), {"mask": mask, "scale": 2.0}))
    call = exported_call(gm)
    x2, mask2 = torch.randn(5, 7, 4), torch.rand(5, 7, 1)
    bound = call.bind((), {"x": x2, "mask": mask2, "scale": 2.0})
    assert bound is not None
    assert_same(forward_from_graph(gm)(model, *bound[0], **bound[1])["y"], model(x2, mask2, scale=2.0)["y"])
    # Anything export did not see this way needs the original forward.
    assert call.bind((x2,), {"mask": mask2, "scale": 3.0}) is None  # a specialised constant
    assert call.bind((x2,), {"mask": None, "scale": 2.0}) is None  # another structure
    assert call.bind((x2,), {"mask": mask2}) is None  # other arguments
    assert call.bind((x2.double(),), {"mask": mask2.double(), "scale": 2.0}) is None  # dtype
    assert call.bind((x2,), {"mask": mask2[:4], "scale": 2.0}) is None  # batch sizes must agree


class EvenOdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if x.shape[1] % 2 == 0 else y


def test_guards_reject_inputs_export_specialised_on():
    model = EvenOdd()
    gm = export_graph(model, (torch.randn(2, 6, 4),))
    forward, call = forward_from_graph(gm), exported_call(gm)
    even, odd = torch.randn(3, 8, 4), torch.randn(3, 7, 4)
    assert call.bind((even,), {}) is not None
    assert_same(forward(model, even), model(even))
    assert call.bind((odd,), {}) is None
    with pytest.raises(RuntimeError, match="outside what torch.export captured for EvenOdd"):
        forward(model, odd)


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_export_failure_is_a_clear_runtime_error(capfd):
    """torch.export also printed the partial graph of the failed capture to stderr."""
    with pytest.raises(RuntimeError, match="torch.export could not capture DataDependent: .*submodule by submodule") as info:
        export_graph(DataDependent(), (torch.randn(3, 4),))
    assert info.value.__cause__ is not None
    assert "def forward" not in capfd.readouterr().err


class WithConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            peak = x.abs().amax(-1, keepdim=True)
        return self.lin(x / peak) + torch.tensor([0.5, -0.5, 1.0, 2.0])


def test_attributes_the_original_lacks_are_carried():
    model, x = WithConstants(), torch.randn(3, 5, 4)
    gm = export_graph(model, (x,))
    carried = exported_call(gm).carried
    assert carried and all(name.startswith("_actfx_export_") for name in carried)
    holder = copy.copy(model)  # a clone sharing the tensors, as convert builds
    for name, value in carried.items():
        object.__setattr__(holder, name, value)
    assert_same(forward_from_graph(gm)(holder, x), model(x))


# ------------------------------------------------------------------ to_functional, op by op


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bn_args():
    return (_rand(4, 3, 5), _rand(3, seed=1), _rand(3, seed=2), torch.zeros(3), torch.ones(3), True, 0.1, 1e-5,
            False), {}


# (ATen op, fresh (args, kwargs) each call, expected target after the pass)
_CASES = [
    (aten.linear.default, lambda: ((_rand(4, 8), _rand(6, 8, seed=1), _rand(6, seed=2)), {}), F.linear),
    (aten.conv1d.default, lambda: ((_rand(1, 2, 9), _rand(3, 2, 3, seed=1), None, [2], [1]), {}), F.conv1d),
    (aten.conv2d.default, lambda: ((_rand(1, 2, 5, 5), _rand(3, 2, 3, 3, seed=1), _rand(3, seed=2), [1, 1], [1, 1]),
                                   {}), F.conv2d),
    (aten.conv_transpose2d.input, lambda: ((_rand(1, 2, 4, 4), _rand(2, 3, 3, 3, seed=1), None, [2, 2], [1, 1],
                                            [1, 1]), {}), F.conv_transpose2d),
    (aten.relu.default, lambda: ((_rand(4, 5),), {}), torch.relu),
    (aten.relu_.default, lambda: ((_rand(4, 5),), {}), torch.relu_),
    (aten.hardtanh.default, lambda: ((_rand(4, 5), -0.5, 0.5), {}), F.hardtanh),
    (aten.hardtanh_.default, lambda: ((_rand(4, 5), 0.0, 6.0), {}), F.hardtanh),
    (aten.leaky_relu.default, lambda: ((_rand(4, 5), 0.2), {}), F.leaky_relu),
    (aten.gelu.default, lambda: ((_rand(4, 5),), {"approximate": "tanh"}), F.gelu),
    (aten.silu.default, lambda: ((_rand(4, 5),), {}), F.silu),
    (aten.sigmoid.default, lambda: ((_rand(4, 5),), {}), torch.sigmoid),
    (aten.tanh.default, lambda: ((_rand(4, 5),), {}), torch.tanh),
    (aten.layer_norm.default, lambda: ((_rand(2, 3, 8), [8], _rand(8, seed=1), _rand(8, seed=2), 1e-5, False), {}),
     F.layer_norm),
    (aten.group_norm.default, lambda: ((_rand(2, 4, 3), 2, _rand(4, seed=1), None, 1e-5, False), {}), F.group_norm),
    (aten.rms_norm.default, lambda: ((_rand(2, 3, 8), [8], _rand(8, seed=1), 1e-6), {}), F.rms_norm),
    (aten.batch_norm.default, _bn_args, F.batch_norm),
    (aten.dropout.default, lambda: ((_rand(6, 7), 0.3, True), {}), torch.dropout),
    (aten.scaled_dot_product_attention.default,
     lambda: ((_rand(1, 2, 5, 4), _rand(1, 2, 5, 4, seed=1), _rand(1, 2, 5, 4, seed=2), None, 0.0, True),
              {"scale": 0.3}), F.scaled_dot_product_attention),
    (aten.mul.Tensor, lambda: ((_rand(3, 4), _rand(4, seed=1)), {}), operator.mul),
    (aten.div.Tensor, lambda: ((_rand(3, 4), 3.0), {}), operator.truediv),
    (aten.add.Tensor, lambda: ((_rand(3, 4), _rand(3, 4, seed=1)), {}), operator.add),
    (aten.matmul.default, lambda: ((_rand(2, 3, 4), _rand(4, 5, seed=1)), {}), torch.matmul),
    (aten.bmm.default, lambda: ((_rand(2, 3, 4), _rand(2, 4, 5, seed=1)), {}), torch.bmm),
    (aten.softmax.int, lambda: ((_rand(3, 4), -1), {}), torch.softmax),
    (aten._softmax.default, lambda: ((_rand(3, 4), 0, False), {}), torch.softmax),
    (aten.log_softmax.int, lambda: ((_rand(3, 4), 1), {}), torch.log_softmax),
    (aten.max_pool2d.default, lambda: ((_rand(1, 2, 6, 6), [2, 2]), {}), F.max_pool2d),
    (aten.avg_pool2d.default, lambda: ((_rand(1, 2, 6, 6), [3, 3], [2, 2], [1, 1]), {}), F.avg_pool2d),
    (aten.adaptive_avg_pool2d.default, lambda: ((_rand(1, 2, 7, 7), [3, 3]), {}), F.adaptive_avg_pool2d),
    (aten.embedding.default, lambda: ((_rand(10, 4), torch.tensor([[1, 0, 9]]), 0), {}), F.embedding),
    (aten.cat.default, lambda: (([_rand(2, 3), _rand(2, 3, seed=1)], 1), {}), torch.cat),
    (aten.view.default, lambda: ((_rand(2, 6), [3, 4]), {}), "view"),
    (aten.transpose.int, lambda: ((_rand(2, 6), 0, 1), {}), "transpose"),
    (aten.expand.default, lambda: ((_rand(1, 6), [3, 6]), {}), "expand"),
    (aten.split.Tensor, lambda: ((_rand(6, 2), 4), {}), "split"),
    (aten.mean.dim, lambda: ((_rand(2, 6), [1], True), {}), "mean"),
    (aten.add_.Tensor, lambda: ((_rand(2, 6), _rand(6, seed=1)), {"alpha": 2}), "add_"),
    (aten.masked_fill_.Scalar, lambda: ((_rand(2, 6), _rand(2, 6, seed=1) > 0, -1.0), {}), "masked_fill_"),
]


def _single_op(op, args, kwargs):
    """A GraphModule calling ``op`` once, every tensor argument a placeholder."""
    graph, tensors = Graph(), []

    def lift(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return graph.placeholder(f"t{len(tensors)}")
        return value

    node = graph.call_function(op, torch.fx.node.map_aggregate(args, lift),
                               torch.fx.node.map_aggregate(kwargs, lift))
    graph.output(node)
    return GraphModule(nn.Module(), graph), node


def _run(gm, make):
    args, kwargs = make()
    tensors = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    torch.manual_seed(0)
    return gm(*tensors), tensors


@pytest.mark.parametrize("op, make, expected", _CASES, ids=[str(c[0]) for c in _CASES])
def test_to_functional_is_bitwise_identical(op, make, expected):
    gm, _ = _single_op(op, *make())
    before, inputs_before = _run(gm, make)
    assert to_functional(gm.graph)
    (node,) = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert node.target == expected
    after, inputs_after = _run(gm, make)
    assert_same(after, before)
    assert_same(inputs_after, inputs_before)  # in-place ops and BatchNorm's running stats


@pytest.mark.parametrize("op, args, kwargs", [
    (aten._softmax.default, (_rand(3, 4), 0, True), {}),  # upcasting softmax: no functional form
    (aten.add.Tensor, (_rand(3, 4), _rand(3, 4)), {"alpha": 2}),
    (aten.embedding.default, (_rand(10, 4), torch.tensor([1]), -3), {}),  # F.embedding never passes this
    (aten.abs.default, (_rand(3),), {}),  # no mapping at all
])
def test_to_functional_leaves_calls_it_cannot_express(op, args, kwargs):
    gm, node = _single_op(op, args, kwargs)
    assert not to_functional(gm.graph)
    assert node.target is op


# ------------------------------------------------------------------ Hugging Face models


def _hf_model(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                         use_cache=False, bos_token_id=0, eos_token_id=0)
        return transformers.AutoModelForCausalLM.from_config(config)
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                          max_position_embeddings=64, use_cache=False)
        return transformers.AutoModelForCausalLM.from_config(config)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    return transformers.BertModel(config)


@pytest.mark.parametrize("kind, mapped", [
    ("gpt2", {F.layer_norm, F.scaled_dot_product_attention, torch.dropout, F.embedding}),
    ("llama", {F.linear, F.scaled_dot_product_attention, F.silu, F.embedding}),
    ("bert", {F.linear, F.layer_norm, F.scaled_dot_product_attention, F.gelu, torch.dropout}),
])
def test_hugging_face_models(kind, mapped):
    model = _hf_model(kind).train()
    ids = torch.randint(0, 128, (2, 8))
    gm = export_graph(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert mapped <= {n.target for n in gm.graph.nodes}
    forward, call = forward_from_graph(gm), exported_call(gm)
    for shape in [(2, 8), (3, 13)]:
        ids = torch.randint(0, 128, shape)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        bound = call.bind((ids,), {"attention_mask": mask})
        assert bound is not None
        torch.manual_seed(0)
        expected = model(input_ids=ids, attention_mask=mask)
        torch.manual_seed(0)
        got = forward(model, *bound[0], **bound[1])
        assert type(got) is type(expected) and got.keys() == expected.keys()
        for key in expected:
            assert_same(got[key], expected[key])
