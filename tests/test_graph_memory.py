"""graph_memory: a partitioned graph's bytes at its worst point, as Inductor would run it."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from actfx.models import build_model
from actfx.passes.graph_emit import EMITTED
from actfx.compiled_estimate import estimate_compiled
from actfx.config import Config
from actfx.passes.graph_memory import PartitionMemory, graph_memory, partition_memory, step_peak

F32 = 4


def _graph(fn, *shapes):
    inputs = [torch.randn(*s) for s in shapes]
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    return gm, {n.name for n in gm.graph.nodes if n.op == "placeholder"}


def test_a_pointwise_chain_between_two_matmuls_lives_inside_one_kernel():
    # relu and * 2 are inlined into the kernel that writes + h (the second matmul reads it):
    # that kernel reads h and writes a, so both are alive then, and nothing else; h dies after
    # it. Run op by op, relu's and the product's outputs would be alive beside h (3 x h).
    gm, inputs = _graph(lambda x, w1, w2: (lambda h: (h.relu() * 2 + h) @ w2)(x @ w1), (64, 32), (32, 128),
                        (128, 16))
    memory = graph_memory(gm, inputs)
    h = a = 64 * 128 * F32
    out = 64 * 16 * F32
    assert memory.peak == h + a
    assert memory.end == out


def test_an_expensive_value_read_twice_is_written_once_and_a_cheap_one_is_recomputed():
    # Inductor's CPU heuristic: a pointwise value with several readers is stored when
    # recomputing it would run exp (or log, tanh, ...) again, inlined otherwise.
    def read_twice(op):
        return lambda x, w: (lambda e: e.sum(1) + e.amax(1))(op(x @ w))

    h = 64 * 128 * F32
    small = 64 * F32
    expensive, inputs = _graph(read_twice(torch.exp), (64, 32), (32, 128))
    cheap, _ = _graph(read_twice(lambda t: t * 2), (64, 32), (32, 128))
    assert graph_memory(expensive, inputs).peak == 2 * h  # h and exp(h) while exp is written
    assert graph_memory(cheap, inputs).peak == h + 2 * small  # h, then the two reductions of h * 2


def test_inputs_the_caller_keeps_are_not_counted_and_the_others_die_after_their_last_reader():
    gm, inputs = _graph(lambda saved, w: (saved @ w).sum(), (256, 64), (64, 64))
    product, total = 256 * 64 * F32, F32
    assert graph_memory(gm, inputs).peak == product + total
    saved = 256 * 64 * F32
    freed = graph_memory(gm, {n for n in inputs if n.startswith("w")})  # the saved value is the graph's to free
    assert freed.peak == saved + product  # the matmul reads it and writes its product
    assert freed.end == total


def test_the_incoming_gradient_lives_until_the_backward_returns():
    """Inductor's backward never frees its tangents (the autograd Function's arguments hold them):
    freed after their last reader, a compiled gpt_tiny's backward at batch 32 was predicted 4 MiB
    (its logits' gradient) short, -13.9% of its measured peak."""
    def forward(x, w, wide):
        return (x @ w,)

    def backward(saved, w, wide, tangents):
        a = (tangents * saved) @ w  # the tangent's last reader
        return a @ wide  # a value 4x the tangent, written after it

    fwd, _ = _graph(forward, (256, 64), (64, 64), (64, 256))
    bwd, _ = _graph(backward, (256, 64), (64, 64), (64, 256), (256, 64))
    memory = partition_memory(fwd, bwd, num_fwd_outputs=1)
    t = 256 * 64 * F32
    assert memory.backward_peak == t + t + 4 * t  # the tangent, a, the wide product
    assert memory.gradients == 4 * t  # what backward returns, not the tangent


def test_a_pack_runs_when_its_value_exists_wherever_the_partitioner_left_it():
    def forward(x, w1, w2, w3):
        v = x @ w1
        b = (v @ w2) @ w3
        return b, (v * 3).to(torch.uint8)  # "the pack", read at the end of the graph

    gm, inputs = _graph(forward, (64, 32), (32, 128), (128, 128), (128, 128))
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.mul.Tensor, torch.ops.aten._to_copy.default,
                                                           torch.ops.prims.convert_element_type.default):
            node.meta[EMITTED] = True
    value = 64 * 128 * F32
    packed = 64 * 128
    assert graph_memory(gm, inputs).peak == 3 * value  # v waits for the pack beside both products
    assert graph_memory(gm, inputs, packs_early=True).peak == 2 * value + packed  # v dies after its matmul


def test_the_step_peak_is_the_worst_of_each_forward_and_each_backward():
    first = PartitionMemory(forward_peak=100, outputs=10, backward_peak=70, gradients=30)
    last = PartitionMemory(forward_peak=50, outputs=20, backward_peak=40, gradients=5)
    # the second graph's forward and backward run beside what the first saved (60), its backward
    # also beside the outputs the loss reads (20); the first's backward beside those outputs and
    # the second's gradients (5)
    assert step_peak([(first, 60), (last, 25)]) == max(100, 60 + 50, 60 + 20 + 40, 20 + 70 + 5) == 120
    assert step_peak([(first, 60), (PartitionMemory(10, 20, 10, 5), 25)]) == 100


@pytest.mark.slow
def test_a_compiled_transformers_step_follows_its_batch_and_its_packs():
    # on meta tensors: no memory, no code generation
    model = build_model("gpt_tiny").to("meta")
    steps, forwards = {}, {}
    for bits in (2, 8):
        for batch in (4, 8):
            x = torch.zeros(batch, 64, dtype=torch.long, device="meta")
            record = estimate_compiled(model, (x,), Config(bits=bits))
            memory = record.plans[0].memory
            assert memory.forward_peak >= record.bytes_after + memory.outputs  # what it returns is alive at the end
            assert memory.gradients >= sum(p.numel() * F32 for p in model.parameters() if p.requires_grad) * 0.99
            steps[bits, batch], forwards[bits, batch] = record.step_bytes, memory.forward_peak
            assert record.step_bytes >= max(memory.forward_peak, memory.gradients)
    assert 1.8 < forwards[2, 8] / forwards[2, 4] < 2.2  # a forward's values scale with the batch
    assert steps[2, 8] > steps[2, 4] and steps[8, 8] > steps[2, 8]  # wider packs hold more during the step
