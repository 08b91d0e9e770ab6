"""actfx/kernels/graph_pack.py: the fusable pack/unpack the compiled path inserts into graphs."""

import math

import pytest
import torch

from actfx.kernels import TERNARY, levels
from actfx.kernels.graph_pack import (Rows, group_step, pack_mask, pack_values, packed_value_bytes, row_layout, unpack_mask,
                                      unpack_values)


def test_two_bit_layout_is_byte_exact():
    # one group of 32: values 0..3 repeating; lo = 0, step = 1, codes = values, 4 codes a byte, LSB first
    x = torch.arange(32, dtype=torch.float32) % 4
    packed, lo, hi = pack_values(x, bits=2, group_size=32, stochastic=False)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 8)
    assert packed.tolist() == [[0b11_10_01_00] * 8]
    assert lo.tolist() == [0.0] and hi.tolist() == [3.0] and group_step(lo, hi, 2).tolist() == [1.0]


def test_three_level_layout_is_byte_exact():
    """Three levels: five codes a byte as base-3 digits, least-significant first, the bytes of
    the flat layout running across groups (two groups of 8 values: 16 codes in 4 bytes)."""
    x = torch.arange(16, dtype=torch.float32) % 3  # codes 0 1 2 0 1 | 2 0 1 2 0 | 1 2 0 1 2 | 0
    packed, lo, hi = pack_values(x, bits=TERNARY, group_size=8, stochastic=False)
    assert packed.dtype == torch.uint8 and packed.shape == (4,)
    assert packed.tolist() == [0 + 3 + 18 + 0 + 81, 2 + 0 + 9 + 54 + 0, 1 + 6 + 0 + 27 + 162, 0]
    assert lo.tolist() == [0.0, 0.0] and group_step(lo, hi, TERNARY).tolist() == [1.0, 1.0]
    assert torch.equal(unpack_values(packed, lo, hi, x, TERNARY, group_size=8), x)
    rows = (torch.arange(10.0) % 3)[:, None] + torch.tensor([0.0, 10.0])  # 10 rows, 2 columns: 2 bytes a column
    packed, lo, hi = pack_values(rows, TERNARY, 16, stochastic=False, rows=Rows(1))
    assert packed.tolist() == [[102, 102], [65, 65]]
    assert torch.equal(unpack_values(packed, lo, hi, rows, TERNARY, rows=Rows(1)), rows)


@pytest.mark.parametrize("bits", [1, TERNARY, 2, 4, 8])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (2, 300)])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, shape):
    x = torch.randn(shape)
    packed, lo, hi = pack_values(x, bits, 32, stochastic=False)
    y = unpack_values(packed, lo, hi, x, bits, group_size=32)
    step = group_step(lo, hi, bits)
    assert y.shape == x.shape and y.dtype == x.dtype
    # padding repeats the last value, so each group's step bounds its own values' error
    per_value_step = step.repeat_interleave(32)[: x.numel()].view(shape)
    assert torch.all((y - x).abs() <= per_value_step / 2 + 1e-6)


@pytest.mark.parametrize("bits", [2, TERNARY])
def test_stochastic_rounding_is_unbiased(bits):
    torch.manual_seed(0)
    x = torch.randn(4096)
    k = 256
    mean = sum(unpack_values(*pack_values(x, bits, 256), x, bits, group_size=256) for _ in range(k)) / k
    step = group_step(*pack_values(x, bits, 256)[1:], bits).repeat_interleave(256)
    # one rounding has standard deviation <= step / 2; the mean of k, <= step / (2 sqrt(k))
    z = ((mean - x) / (step / (2 * math.sqrt(k)))).abs()
    assert z.mean() < 1.0 and z.max() < 6.0


@pytest.mark.parametrize("bits", [2, TERNARY])
def test_constant_groups_are_exact_and_non_finite_groups_become_nan(bits):
    x = torch.full((64,), 0.1)
    x[32:] = float("nan")
    x[40] = 1.0
    y = unpack_values(*pack_values(x, bits, 32), x, bits, group_size=32)
    assert torch.equal(y[:32], x[:32])  # 0.1 is not a bf16 value: still exact
    assert torch.isnan(y[32:]).all()
    z = torch.zeros(64)
    z[3] = float("inf")
    assert torch.isnan(unpack_values(*pack_values(z, bits, 32), z, bits, group_size=32)[:32]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values_come_back_in_their_dtype(dtype):
    x = torch.randn(100).to(dtype)
    y = unpack_values(*pack_values(x, 8, 32, stochastic=False), x, 8)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), x.float(), atol=0.02, rtol=0.0)  # 8-bit step of a N(0,1) group


def test_mask_round_trip_and_size():
    mask = torch.rand(3, 7, 5) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_mask(packed, mask), mask)
    assert pack_mask(torch.tensor([True, False, True] + [False] * 5)).tolist() == [0b101]


@pytest.mark.parametrize("bits", [2, TERNARY])
def test_packed_size_matches_the_formula(bits):
    x = torch.randn(1000)
    packed, lo, hi = pack_values(x, bits, 256)
    nbytes = packed.numel() + lo.numel() * 4 + hi.numel() * 4
    assert nbytes == packed_value_bytes((1000,), bits, 256)
    if bits == TERNARY:  # 4 groups: 1024 codes in 205 bytes, 1.6 bits a value
        assert packed.numel() == 205


@pytest.mark.parametrize("per,columns", [(1, 1), (4, 1), (8, 1), (4, 56), (2, 7)])
def test_stochastic_rounding_noise_is_uniform_and_reproducible_per_seed(per, columns):
    """One hash per byte, spread over its ``per`` lanes: every lane uniform, the lanes of a byte
    and neighbouring bytes uncorrelated, the same noise for the same seed."""
    from actfx.kernels.graph_pack import uniform_from_seed

    like = torch.empty(per * columns * (1 << 16) // math.gcd(columns, 8))
    seed, other_seed = torch.tensor(0x2545F491, dtype=torch.int64), torch.tensor(7, dtype=torch.int64)
    u = uniform_from_seed(like, seed, per, columns)
    assert torch.equal(u, uniform_from_seed(like, seed, per, columns))
    assert not torch.equal(u, uniform_from_seed(like, other_seed, per, columns))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.002
    assert torch.histc(u, bins=16, min=0, max=1).div(len(u) / 16).sub(1).abs().max() < 0.06
    lanes = u.view(-1, per, columns).transpose(0, 1).reshape(per, -1).double()
    for k in range(1, per):  # lane 0 against each other lane of the same bytes
        assert abs(float(torch.corrcoef(torch.stack([lanes[0], lanes[k]]))[0, 1])) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.02  # neighbours in memory


def test_compiled_noise_is_the_eager_noise():
    """The int32 hash and the lane multiplies wrap the same way in Inductor's vectorised C++
    loop, its scalar tail (1003 columns: not a whole number of vectors) and eager ATen."""
    from actfx.kernels.graph_pack import uniform_from_seed

    like, seed = torch.empty(4 * 1003), torch.tensor(0x5DEECE66D, dtype=torch.int64)
    eager = uniform_from_seed(like, seed, 4, 1003)
    compiled = torch.compile(uniform_from_seed, backend="inductor")(like, seed, 4, 1003)
    assert torch.equal(eager, compiled)
    assert abs(float(eager.mean()) - 0.5) < 0.05


def test_emitted_packs_are_traced_per_strides():
    """emit caches each traced pack by its input's shape; a transposed value of a shape traced
    before (a conv1d output and a GroupNorm over its transpose, under actfx.compile) replayed the
    contiguous value's ``view`` and failed: "Cannot view a tensor with shape [2, 32, 16] and strides
    (512, 1, 32)". The cache key holds the strides."""
    from torch import fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from actfx.passes.graph_emit import emit

    with FakeTensorMode():
        values = [torch.empty(2, 32, 16), torch.empty(2, 16, 32).transpose(1, 2)]
    graph = fx.Graph()
    inputs = []
    for i, value in enumerate(values):
        inputs.append(graph.placeholder(f"x{i}"))
        inputs[-1].meta["val"] = value
    out = graph.output(None)
    for node in inputs:
        codes, lo, hi = emit(graph, lambda x: pack_values(x, 2, 256), [node], before=out,
                               key="test_emitted_packs_are_traced_per_strides")
        assert tuple(codes.meta["val"].shape) == (4, 64)


def test_row_layout_is_byte_exact():
    """Rows of the innermost dimension: a group is one column of rows, four rows share a byte at
    2 bits, row r at bit 2 * (r % 4) of byte r // 4 in its column."""
    x = (torch.arange(16.0) % 4)[:, None] + torch.tensor([0.0, 10.0, 20.0])  # 16 rows, 3 columns
    packed, lo, hi = pack_values(x, bits=2, group_size=16, stochastic=False, rows=Rows(1))
    step = group_step(lo, hi, 2)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 3)
    assert packed.tolist() == [[0b11_10_01_00] * 3] * 4
    assert lo.tolist() == [[0.0, 10.0, 20.0]] and step.tolist() == [[1.0, 1.0, 1.0]]
    assert torch.equal(unpack_values(packed, lo, hi, x, 2, rows=Rows(1)), x)


def test_row_blocks_stay_inside_one_channel_plane():
    """NCHW read along W with the channel a row dimension: a group is a block of whole rows of one
    channel's plane (H = 4 rows of 8 here, group 16: two rows), so channels of different ranges
    never share a group."""
    x = torch.randn(2, 3, 4, 8) * torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    packed, lo, hi = pack_values(x, 2, 16, stochastic=False, rows=Rows(3, plane=4))
    step = group_step(lo, hi, 2)
    assert lo.shape == (2 * 3 * 2,) and packed.shape == (6, 8)
    blocks = x.reshape(-1, 16)  # two rows of 8: one group each, in NCHW order
    torch.testing.assert_close(lo, blocks.amin(1))
    torch.testing.assert_close(step, (blocks.amax(1) - blocks.amin(1)) / 3)
    y = unpack_values(packed, lo, hi, x, 2, rows=Rows(3, plane=4))
    assert torch.all((y - x).abs() <= step.repeat_interleave(16).view(x.shape) / 2 + 1e-5)


def _per_value_step(packed, lo, hi, like, bits, rows):
    """Each value's group step, read back through the unpack itself (all codes at the top: hi)."""
    top = torch.full_like(packed, 242 if bits == TERNARY else 255)  # 242: five base-3 digits 2
    step = group_step(lo, hi, bits)
    return unpack_values(top, torch.zeros_like(lo), step * levels(bits), like.float(), bits, rows, group_size=32) / levels(bits)


_LAYOUTS = [((2, 6, 5, 7), Rows(1)), ((3, 20, 12), Rows(2)), ((37, 9, 3), Rows(0)), ((300, 5), Rows(1)),
            ((2, 6, 5, 7), Rows(3, plane=5)), ((2, 6, 37, 7), Rows(3, plane=37)), ((4, 3, 9), Rows(2, plane=1))]


@pytest.mark.parametrize("bits", [1, TERNARY, 2, 4, 8])
@pytest.mark.parametrize("shape,rows", _LAYOUTS)
def test_row_layout_round_to_nearest_error_is_at_most_half_a_step(bits, shape, rows):
    x = torch.randn(shape)
    pieces = pack_values(x, bits, 32, stochastic=False, rows=rows)
    y = unpack_values(*pieces, x, bits, rows=rows)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.all((y - x).abs() <= _per_value_step(*pieces, x, bits, rows) / 2 + 1e-6)
    assert pieces[0].numel() + 8 * pieces[1].numel() == packed_value_bytes(shape, bits, 32, rows)


def test_column_groups_hold_one_column_each():
    x = torch.randn(20, 6) * torch.arange(1.0, 7.0)
    _, lo, hi = pack_values(x, 2, 32, stochastic=False, rows=Rows(1))
    torch.testing.assert_close(lo[0], x.amin(0))
    torch.testing.assert_close(hi[0], x.amax(0))


@pytest.mark.parametrize("bits", [2, TERNARY])
@pytest.mark.parametrize("rows", [Rows(1), Rows(3, plane=6)])
def test_row_layout_stochastic_rounding_is_unbiased(rows, bits):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 6, 6)
    k = 256
    mean = sum(unpack_values(*pack_values(x, bits, 256, rows=rows), x, bits, rows=rows) for _ in range(k)) / k
    step = _per_value_step(*pack_values(x, bits, 256, rows=rows), x, bits, rows)
    z = ((mean - x) / (step / (2 * math.sqrt(k)))).abs()
    assert z.mean() < 1.0 and z.max() < 6.0


@pytest.mark.parametrize("rows", [Rows(1), Rows(1, plane=10)])
def test_row_layout_pads_with_the_last_row_and_keeps_groups_apart(rows):
    """10 rows pad to whole bytes and groups with copies of row 9 (they cannot widen a range); a
    NaN makes its own group NaN and leaves a constant column exact (columns), or the whole
    block NaN (blocks)."""
    x = torch.full((10, 2), 0.1)
    x[:, 1] = torch.arange(10.0)
    x[4, 1] = float("nan")
    y = unpack_values(*pack_values(x, 2, 256, rows=rows), x, 2, rows=rows)
    assert torch.isnan(y[:, 1]).all()
    if rows.plane is None:
        assert torch.equal(y[:, 0], x[:, 0])
    z = torch.full((10, 2), 0.1)
    assert torch.equal(unpack_values(*pack_values(z, 2, 256, rows=rows), z, 2, rows=rows), z)


def test_row_layout_mask_round_trip():
    mask = torch.rand(3, 6, 5, 7) > 0.5  # 105 rows of 6 channels: 14 bytes a channel
    packed = pack_mask(mask, rows=Rows(1))
    assert packed.shape == (14, 6)
    assert torch.equal(unpack_mask(packed, mask, rows=Rows(1)), mask)


@pytest.mark.parametrize("shape,rows", [((2, 64, 28, 28), Rows(1)), ((8, 2048, 7, 7), Rows(1)), ((4, 256, 512), Rows(2)),
                                        ((8, 64, 56, 56), Rows(3, plane=56)), ((8, 512, 7, 7), Rows(3, plane=7))])
def test_row_layout_packed_size_matches_the_formula(shape, rows):
    x = torch.randn(shape)
    packed, lo, hi = pack_values(x, 2, 256, rows=rows)
    assert packed.numel() + lo.numel() * 4 + hi.numel() * 4 == packed_value_bytes(shape, 2, 256, rows)
    # about as small as the flat layout: under 8 padding rows a group, and groups of fewer rows
    # where the rows do not divide evenly (392 rows: two groups of 200; 56 x 56 planes: 224 values)
    assert packed_value_bytes(shape, 2, 256, rows) <= packed_value_bytes(shape, 2, 256) * 1.06


def test_rows_are_used_from_a_group_of_rows_up():
    assert row_layout((1000,), 0, None, 256) is None  # one row
    assert row_layout((100, 64), -1, None, 256) is None  # 100 rows: the flat layout
    assert row_layout((1000, 64), -1, None, 256) == Rows(1)
    assert row_layout((2, 64, 28, 28), 3, 28, 256) == Rows(3, plane=28)


def test_row_layout_of_a_transposed_value():
    """A fused attention kernel's v and output are transposed views: they pack in rows and come
    back with their values. (Partitioning a Hugging Face GPT-2 on meta tensors once failed in the
    unpack's ``view`` of strided codes; the row layout reshapes instead. That failure is not
    reproduced here: eager and fake tensors both copy these to contiguous rows.)"""
    x = torch.randn(4, 1024, 128).transpose(1, 2)
    packed, lo, hi = pack_values(x, 2, 256, stochastic=False, rows=Rows(2))
    assert packed.is_contiguous()
    y = unpack_values(packed, lo, hi, x, 2, rows=Rows(2))
    assert torch.all((y - x).abs() <= _per_value_step(packed, lo, hi, x, 2, Rows(2)) / 2 + 1e-6)
    mask = x > 0
    assert torch.equal(unpack_mask(pack_mask(mask, rows=Rows(2)), mask, rows=Rows(2)), mask)


_LAYOUTS = [((1400, 1), Rows(1, None)),  # 1400 rows: the last group of 240 is partial, 8 rows per byte
            *(pytest.param(shape, rows, marks=pytest.mark.slow) for shape, rows in
              [((3, 300), None), ((2, 16, 9, 12), Rows(3, 9)), ((4, 37, 24), Rows(2, None)), ((1400, 1, 16), Rows(2, None))])]


@pytest.mark.parametrize("shape, rows", _LAYOUTS)
def test_compiled_packs_and_unpacks_are_eager_s_bit_for_bit(shape, rows, monkeypatch):
    """actfx::pack_codes and actfx::unpack_codes have Inductor lowerings of their own
    (kernels/lowered.py); compiled, they give eager's bytes and values at every width, for a
    stored value (and at 2 bits for a large expression inlined into the pack), three levels'
    base-3 digits included. Unpacking
    (1400, 1) at 8 bits once lost its last partial group: Inductor's loops split a row range by a
    floor division that did not divide it; the lowering now covers whole groups only. On one
    thread the hash's int32 products, which wrap (undefined in C++), gave other bytes: the hash
    runs in int64 now."""
    from actfx.kernels import graph_pack

    seed = torch.tensor(0x2545F491, dtype=torch.int64)  # an input of the graph, as pack_seeds' seeds are
    monkeypatch.setattr(graph_pack, "_pack_seed", lambda device: seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    mismatches = []
    try:
        for count in sorted({1, threads}):  # one thread: C++ with no OpenMP region, optimised otherwise
            torch.set_num_threads(count)
            torch._dynamo.reset()
            with torch._inductor.config.patch(fx_graph_cache=False):  # the graph is the same, the lowering may not be
                mismatches += [(count, *m) for m in _compiled_against_eager(x, rows)]
    finally:
        torch.set_num_threads(threads)
    assert mismatches == []


def _large_expression(x):
    """24 exactly rounded operations (no two of which a compiler may contract)."""
    for _ in range(6):
        x = (x * 2.0 - 1.0) * 0.5 + 0.5
    return x


def _compiled_against_eager(x, rows) -> list:
    """(bits, what) for each compiled pack, unpack or mask unpack that differs from eager's."""
    found = []
    for bits in (1, TERNARY, 2, 4, 8):
        def pack(v):
            return pack_values(v, bits, 64, True, rows)

        def unpack(packed, lo, hi):
            return unpack_values(packed, lo, hi, x, bits, rows, group_size=64)

        eager = pack(x)
        compiled = torch.compile(pack, backend="inductor", dynamic=False)(x)
        if not all(torch.equal(a, b) for a, b in zip(eager, compiled)):
            found.append((bits, "pack"))
        if bits == 2:  # an inlined table (one width: each compile here costs the suite seconds)
            eager_large = pack(_large_expression(x))
            compiled_large = torch.compile(lambda v: pack(_large_expression(v)), backend="inductor", dynamic=False)(x)
            if not all(torch.equal(a, b) for a, b in zip(eager_large, compiled_large)):
                found.append((bits, "pack of a large expression"))
        if not torch.equal(torch.compile(unpack, backend="inductor", dynamic=False)(*eager), unpack(*eager)):
            found.append((bits, "unpack"))
    mask = x > 0
    if not torch.equal(torch.compile(lambda p: unpack_mask(p, mask, rows), backend="inductor", dynamic=False)(
            pack_mask(mask, rows)), mask):
        found.append((1, "mask unpack"))
    return found


def test_a_pack_s_rounding_is_generated_once_not_once_per_lane():
    """A large expression's codes are stored as one byte a value, so a 2-bit pack of a GELU output
    rounds in one expression (vector loop and scalar tail: two floors), where lane by lane it
    wrote four copies of the whole expression, GELU's math included, per loop (GELU is computed
    in the group-range reduction and in the codes: four ``erf`` then, ten before)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()

    def pack_gelu(v):
        return pack_values(torch.nn.functional.gelu(v), 2, 256, True, Rows(1, None))

    with torch._inductor.config.patch(fx_graph_cache=False):
        _, (code,) = run_and_get_code(torch.compile(pack_gelu, backend="inductor", dynamic=False), torch.randn(64, 1003))
    assert code.count(".floor()") + code.count("std::floor") <= 2
    assert code.count(".erf()") <= 4
    assert code.count("uint8_t* out_ptr") == 2  # the codes and the bytes


def _compiled_pack_indices(x, rows):
    """(index expressions Inductor's C++ backend analysed for vectorisation, outer-loop fusions
    that failed their check and were generated again) for a compiled 2-bit pack of ``2 x`` (a
    value computed in the graph, which the pack's loops compute again; rounded to nearest; the
    bytes checked against eager's)."""
    from unittest import mock

    import torch._inductor.sizevars as sizevars
    from torch._inductor.codegen.cpp import OuterLoopFusedSchedulerNode

    torch._dynamo.reset()
    indices, failed = [], []
    simplify, check = sizevars.simplify_index_in_vec_range, OuterLoopFusedSchedulerNode.check_outer_fusion_loop_level_attr

    def recording_simplify(index, var, vec_length):
        indices.append(index)
        return simplify(index, var, vec_length)

    def recording_check(self, *args):
        ok = check(self, *args)
        failed.extend([] if ok else [self])
        return ok

    def pack_doubled(v):  # a value computed in the graph (exactly: 2 v); rounded to nearest, since
        return pack_values(v * 2.0, 2, 256, False, rows)  # compiled and eager draw noise from other seeds

    with mock.patch.object(sizevars, "simplify_index_in_vec_range", recording_simplify), \
            mock.patch.object(OuterLoopFusedSchedulerNode, "check_outer_fusion_loop_level_attr", recording_check), \
            torch._inductor.config.patch(fx_graph_cache=False):
        compiled = torch.compile(pack_doubled, backend="inductor", dynamic=False)(x)
    assert all(torch.equal(a, b) for a, b in zip(compiled, pack_doubled(x)))
    return indices, failed


@pytest.mark.parametrize("shape,rows", [((4, 8, 16, 16), Rows(3, plane=16)), ((64, 1024), None)])
def test_a_pack_reads_its_value_through_one_reshape_and_fuses_at_once(shape, rows):
    """The group range and the codes read x through one reshape each, so every index is one
    decomposition of the flat index (built as rows, then groups, then bytes, the indices were
    floor divisions and moduli of each other, simplified by sympy kernel by kernel); and the
    pack saves each group's maximum, not its step, whose pointwise node Inductor tried to run in
    the range reduction's outer loop, failed (their vector widths differ) and generated again."""
    from torch.utils._sympy.functions import FloorDiv, ModularIndexing

    indices, failed = _compiled_pack_indices(torch.randn(shape), rows)
    nested = [i for i in indices for f in i.atoms(FloorDiv, ModularIndexing) if f.args[0].atoms(FloorDiv, ModularIndexing)]
    assert indices and not nested
    assert not failed
