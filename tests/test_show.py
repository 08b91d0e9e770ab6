"""actfx/show.py and actfx/breakdown.py: rows op by op, before -> after, rendered for people."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console

import actfx
from actfx.accounting import count_saved
from actfx.breakdown import original_of
from actfx.models import build_model
from actfx.passes.analyze import measure
from checks import Doubled


def count_saved_bytes(model, x) -> int:
    with count_saved(model) as saved:
        out = model(x)
    del out
    return saved.activation_bytes


def plain_console():
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = build_model("resnet18")
    return model, actfx.convert(model, bits=2), torch.randn(2, 3, 64, 64)


def test_rows_add_up_to_the_measured_totals(resnet):
    model, converted, x = resnet
    rows = actfx.show(converted, x, console=plain_console())
    assert sum(r["before_bytes"] for r in rows) == measure(model, x).activation_bytes
    assert sum(r["after_bytes"] for r in rows) == measure(converted, x).activation_bytes
    assert all(r["before_bytes"] is not None for r in rows)  # every op paired with the original's


class _MadeInForward(nn.Module):
    """A tensor made in forward: fx stores it as ``_tensor_constant<i>``, named anew by each trace."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(self.a(x) * torch.tensor(2.0))


def test_a_tensor_made_in_forward_does_not_hide_the_original_bytes():
    model, x = _MadeInForward(), torch.randn(8, 16)
    converted = actfx.convert(model, bits=2)
    rows = actfx.show(converted, x, console=plain_console())
    assert {r["node"] for r in rows} >= {"a", "mul", "b"}
    assert all(r["before_bytes"] is not None for r in rows)
    by_node = {r["node"]: r for r in rows}
    assert by_node["a"]["before_bytes"] == x.numel() * 4 and by_node["b"]["before_bytes"] == 8 * 32 * 4
    assert by_node["mul"]["after_bytes"] == 0  # a product with a constant saves only the constant


class _Chains(nn.Module):
    """Chains the rewrite collapses into one op each: GPT-2's GELU, an RMSNorm, a scaled sigmoid."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 4)

    def forward(self, x):
        h = self.a(x)
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.b(torch.sigmoid(h) * torch.tensor(2.0))


def test_rows_of_collapsed_chains_hold_every_op_they_replaced():
    model, x = _Chains(), torch.randn(8, 16)
    converted = actfx.convert(model, bits=2)
    rows = actfx.show(converted, x, console=plain_console())
    kinds = {d.kind for d in converted._actfx_record.decisions}
    assert {"pointwise", "rms_norm"} <= kinds, kinds
    assert sum(r["before_bytes"] for r in rows) == measure(model, x).activation_bytes


def test_rows_say_how_each_value_is_kept(resnet):
    _, converted, x = resnet
    rows = {r["node"]: r for r in actfx.show(converted, x, console=plain_console())}
    assert rows["conv1"]["kind"] == "packed 2-bit" and rows["conv1"]["op"] == "Conv2d"
    assert rows["relu"]["kind"] == "1-bit mask"
    assert rows["maxpool"]["kind"] == "compact indices"
    assert rows["flatten"]["kind"] == "nothing saved"
    # A stride-2 block: conv1 reads the same packed input as the downsample conv.
    assert rows["layer2_0_conv1"]["kind"] == "shared with layer2_0_downsample_0"
    assert rows["layer2_0_conv1"]["after_bytes"] == 0
    assert rows["bn1"]["after_bytes"] < rows["bn1"]["before_bytes"] / 10
    assert any("(parameter)" in text for text in rows["conv1"]["after"])


class Unlisted(nn.Module):
    """An op actfx has no variant for is still measured, and reported with the reason."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        return torch.cumprod(self.proj(x), dim=-1)


def test_uncovered_ops_are_measured_and_explained():
    converted = actfx.convert(Unlisted())
    console = plain_console()
    rows = {r["node"]: r for r in actfx.show(converted, torch.randn(4, 32), console=console)}
    assert rows["cumprod"]["kind"] == "not covered"
    assert rows["cumprod"]["after_bytes"] == rows["cumprod"]["before_bytes"] > 0
    assert rows["cumprod"]["reason"]
    text = console.file.getvalue()
    assert "1 op not covered" in text and "cumprod" in text and rows["cumprod"]["reason"] in text


class _HookedLayers(nn.Module):
    """Forward hooks and pre-hooks that compute (a rescaled output, a clamped input, a sigmoid
    added): their ops run as written around the converted layers."""

    def __init__(self):
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64)
        self.l1.register_forward_hook(lambda module, args, out: out * 0.5 + 1.0)
        self.l2.register_forward_pre_hook(lambda module, args: (args[0].clamp(-2, 2),))
        self.act.register_forward_hook(lambda module, args, out: out + args[0].sigmoid())

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


def test_what_forward_hooks_save_is_counted():
    """show ran a converted layer's graph without its hooks: 320 -> 21.2 KiB (15.1x) for a
    model that held 576 -> 277 KiB (2.1x). The hooks' ops are counted on their module's row."""
    model, x = _HookedLayers(), torch.randn(4, 64, 64)
    converted = actfx.convert(model, bits=2)
    console = plain_console()
    rows = actfx.show(converted, x, console=console)
    assert sum(r["before_bytes"] or 0 for r in rows) == count_saved_bytes(model, x)
    assert sum(r["after_bytes"] or 0 for r in rows) == count_saved_bytes(converted, x)
    assert "its forward hooks run as written" in console.file.getvalue()


def test_channel_dropouts_are_not_called_not_covered():
    """nn.Dropout1d / Dropout2d keep one mask value per channel, as PyTorch does (left as they
    are on purpose); show listed them as not covered."""
    model = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.Tanh(), nn.Dropout1d(0.2))
    console = plain_console()
    rows = {r["node"]: r for r in actfx.show(actfx.convert(model), torch.randn(4, 8, 256), console=console)}
    dropout = next(r for r in rows.values() if r["op"] == "Dropout1d")
    assert dropout["kind"] == "kept exact (too small to pack)" and dropout["after_bytes"] > 0, rows
    assert "not covered" not in console.file.getvalue()


def test_plain_text_when_not_a_terminal_and_colour_in_one(resnet):
    _, converted, x = resnet
    plain = plain_console()
    actfx.show(converted, x, console=plain)
    text = plain.file.getvalue()
    assert "\x1b[" not in text and "╭" not in text
    assert "layer1_0_conv1" in text and "activations kept for backward" in text
    assert "layer1: " in text  # the module tree, as indented lines
    terminal = Console(file=io.StringIO(), width=200, force_terminal=True)
    actfx.show(converted, x, console=terminal)
    assert "\x1b[" in terminal.file.getvalue()


def test_without_inputs_the_ops_are_listed_without_bytes(resnet):
    _, converted, _ = resnet
    console = plain_console()
    rows = actfx.show(converted, console=console)
    assert rows and all(r["before_bytes"] is None and r["after_bytes"] is None for r in rows)
    assert {r["kind"] for r in rows} >= {"packed 2-bit", "1-bit mask"}
    assert "bytes: unknown" in console.file.getvalue()


def test_shapes_recorded_on_the_graph_stand_in_for_inputs():
    converted = actfx.convert(build_model("gpt_tiny"))
    placeholder = next(n for n in converted._actfx_record.graphs[""][True].nodes if n.op == "placeholder")
    placeholder.meta["val"] = torch.empty(2, 128, dtype=torch.long, device="meta")
    rows = actfx.show(converted, console=plain_console())
    assert sum(r["after_bytes"] for r in rows) == measure(converted, torch.zeros(2, 128, dtype=torch.long)).activation_bytes


def test_show_wants_a_converted_model():
    with pytest.raises(TypeError, match=r"actfx\.show\(actfx\.convert\(model\)"):
        actfx.show(nn.Linear(2, 2))


def test_original_of_is_a_view_of_the_unconverted_model(resnet):
    model, converted, x = resnet
    view = original_of(converted)
    assert type(view) is type(model) and not actfx.is_converted(view)
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))
    assert list(view.state_dict()) == list(model.state_dict())
    assert actfx.is_converted(converted) and hasattr(converted, "_actfx_record")  # left as it was
    model.eval(), view.eval()
    torch.testing.assert_close(view(x), model(x), rtol=0, atol=0)
    model.train()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return torch.sigmoid(self.fc(x)) * x


class WithLeaves(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = Block(), Block(), nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


class Looping(nn.Module):
    """fx cannot trace a loop over a tensor's length: converted piece by piece, measured per module."""

    def __init__(self):
        super().__init__()
        self.proj, self.act = nn.Linear(256, 256), nn.GELU()

    def forward(self, x):
        for _ in range(x.shape[0]):
            x = self.act(self.proj(x))
        return x


class _Embedded(nn.Module):
    """Called without its optional input: the converted block picks the graph traced for that."""

    def __init__(self):
        super().__init__()
        self.word, self.proj = nn.Embedding(64, 256), nn.Linear(256, 256)

    def forward(self, ids, embeds=None):
        if embeds is None:
            embeds = self.word(ids)
        return F.gelu(self.proj(embeds))


class BranchingRoot(nn.Module):
    """Neither fx (a branch on a value) nor torch.export (a custom autograd.Function) captures the root."""

    def __init__(self):
        super().__init__()
        self.emb = _Embedded()

    def forward(self, ids):
        h = Doubled.apply(self.emb(ids))
        return h if h.sum() > -1e9 else -h


@pytest.mark.parametrize("make, kwargs, x", [
    (WithLeaves, {"leaf_modules": [Block]}, torch.randn(32, 64)),
    (Looping, {}, torch.randn(8, 256)),
    (BranchingRoot, {}, torch.randint(0, 64, (4, 8))),
], ids=["declared-leaves", "untraceable-root", "uncaptured-root-optional-input"])
def test_models_converted_in_pieces_still_pair_up(make, kwargs, x):
    torch.manual_seed(0)
    model = make()
    converted = actfx.convert(model, **kwargs)
    rows = actfx.show(converted, x, console=plain_console())
    assert sum(r["before_bytes"] or 0 for r in rows) == measure(model, x).activation_bytes
    assert sum(r["after_bytes"] for r in rows) == measure(converted, x).activation_bytes
    saving = [r for r in rows if r["after_bytes"]]
    assert saving and all(r["before_bytes"] is not None for r in saving)
    # op by op inside the converted modules, also where the root runs whole (it was one row per module)
    assert {r["op"].lower() for r in saving} >= {"linear", "mul" if kwargs else "gelu"}


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, 256)

    def forward(self, x, scale=None):
        if scale is not None:
            x = x * scale
        return F.gelu(self.proj(x))


class ScaledInsideBranchingRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Scaled()

    def forward(self, x):
        h = Doubled.apply(self.block(x, scale=torch.full((256,), 0.5)))
        return h if h.sum() > -1e9 else -h


def test_a_block_whose_traced_graph_does_not_take_the_call_is_one_row():
    """Inside a root that runs whole, the original runs each block's traced graph (here: traced
    without ``scale``); a call that graph does not take runs the block whole, so its rows are
    summed into one, and the totals still add up."""
    torch.manual_seed(0)
    model, x = ScaledInsideBranchingRoot(), torch.randn(4, 8, 256)
    converted = actfx.convert(model, bits=2)
    converted(x).sum().backward()
    rows = actfx.show(converted, x, console=plain_console())
    assert [(r["node"], r["op"]) for r in rows if r["after_bytes"]] == [("block", "_Scaled")]
    assert sum(r["before_bytes"] or 0 for r in rows) == measure(model, x).activation_bytes
    assert sum(r["after_bytes"] or 0 for r in rows) == measure(converted, x).activation_bytes < \
        measure(model, x).activation_bytes / 4


class _WeightNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1))

    def forward(self, h):
        y = self.conv(h)
        return F.elu(y) if y.sum() > -1e9 else y


class WeightNormBlocks(nn.Module):
    """Hugging Face Encodec / vocoder style: weight_norm parametrized convolutions converted on
    their own, inside blocks and a root neither fx nor torch.export captures (a branch on a value)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(1, 8, 3, padding=1)
        self.blocks = nn.ModuleList(_WeightNormBlock() for _ in range(2))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return h if h.sum() > -1e9 else -h


@pytest.mark.filterwarnings("ignore:actfx")
def test_parametrized_modules_in_a_model_converted_in_pieces_are_measured():
    """The measurement copies each module on its way to a converted block; parametrized modules
    refuse ``copy.copy``, and show printed '?' for every byte."""
    torch.manual_seed(0)
    model, x = WeightNormBlocks(), torch.randn(2, 1, 1024)
    converted = actfx.convert(model, bits=2)
    converted(x).sum().backward()
    assert "" not in converted._actfx_record.captured and "blocks.0.conv" in converted._actfx_record.graphs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = actfx.show(converted, x, console=plain_console())
    assert not [w for w in caught if "could not measure" in str(w.message)]
    assert sum(r["after_bytes"] or 0 for r in rows) == measure(converted, x).activation_bytes < \
        measure(model, x).activation_bytes / 1.5


def test_a_model_captured_by_torch_export_pairs_up_op_by_op():
    """The exported graph is kept as it was before the rewrite: each row has its before bytes
    and the ATen op's name, and they add up to the original's total."""
    torch.manual_seed(0)
    model, x = Looping(), torch.randn(8, 256)
    converted = actfx.convert(model, example_inputs=(x,))
    assert "" in converted._actfx_record.captured  # captured whole by torch.export
    rows = actfx.show(converted, x, console=plain_console())
    assert sum(r["before_bytes"] or 0 for r in rows) == measure(model, x).activation_bytes
    saving = [r for r in rows if r["after_bytes"]]
    assert saving and all(r["before_bytes"] for r in saving), saving
    assert {"linear", "gelu"} <= {r["op"] for r in saving}, [r["op"] for r in saving]


class _Gated(nn.Module):
    """A forward taking keywords, with an optional input, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x, gate=None, scale=1.0):
        h = torch.nn.functional.gelu(self.a(x))
        return self.b(h if gate is None else h * gate) * scale


@pytest.mark.parametrize("exported", [False, True])
def test_inputs_given_by_keyword_are_measured_as_convert_takes_them(exported):
    """``actfx.show`` takes ``example_inputs`` in convert's forms (a dict of keywords, an
    ``(args, kwargs)`` pair); a dict used to reach the forward as one positional argument.
    (fx's root graph is the one traced for the usual call, with ``gate`` left None.)"""
    torch.manual_seed(0)
    model, x, gate = _Gated(), torch.randn(8, 64), torch.rand(8, 128)
    given = {"gate": gate} if exported else {}
    converted = actfx.convert(model, bits=2, example_inputs=((x,), given) if exported else None)
    positional = actfx.show(converted, (x, *given.values()), console=plain_console())
    assert sum(r["after_bytes"] or 0 for r in positional) > 0
    for form in ({"x": x, **given}, ((x,), given), ((), {**given, "x": x})):
        rows = actfx.show(converted, form, console=plain_console())
        assert [(r["node"], r["before_bytes"], r["after_bytes"]) for r in rows] == \
            [(r["node"], r["before_bytes"], r["after_bytes"]) for r in positional]
    with pytest.raises(TypeError, match="example inputs do not fit _Gated.forward"):
        actfx.show(converted, {"y": x}, console=plain_console())


@torch.library.custom_op("actfx_test::doubled", mutates_args=())
def _doubled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


class _WithOpaqueOp(torch.nn.Module):
    """A custom op without a fake implementation: the model runs, fake tensors cannot."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(_doubled(x))))


class _FixedExperts(torch.nn.Module):
    """Two experts over fixed token ranges: torch's fake kernel of ``_grouped_mm`` takes bfloat16
    only, its CPU kernel float32 too (Hugging Face PhiMoE)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Parameter(torch.randn(2, 8, 32) / 3)
        self.register_buffer("offs", torch.tensor([3, 8], dtype=torch.int32))
        self.b = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.tanh(torch._grouped_mm(x, self.up, self.offs)))


@pytest.mark.parametrize("make", [_WithOpaqueOp, _FixedExperts], ids=["no-fake-kernel", "fake-kernel-refuses"])
def test_a_model_fake_tensors_cannot_run_is_measured_for_real(make):
    """``actfx.show`` measures on fake tensors; where the forward failed there (Hugging Face's
    Nystromformer, PhiMoE) it first raised, then showed no bytes, though the model converts and
    trains. Now it measures on real tensors as the training forward would run them."""
    torch.manual_seed(0)
    model, x = make(), torch.randn(8, 8)
    converted = actfx.convert(model, bits=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = actfx.show(converted, x, console=plain_console())
    assert sum(r["before_bytes"] or 0 for r in rows) == count_saved_bytes(model, x)
    assert sum(r["after_bytes"] or 0 for r in rows) == count_saved_bytes(converted, x)


@torch.library.custom_op("actfx_test::positive_root", mutates_args=())
def _positive_root(x: torch.Tensor) -> torch.Tensor:
    if (x <= 0).any():
        raise ValueError("positive_root takes positive values")
    return x.sqrt()


class _PositiveOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(_positive_root(x))))


def test_a_model_neither_fake_nor_random_tensors_can_run_is_shown_without_bytes():
    """Without inputs, show measures at the shapes of the last training call, on random values:
    a forward that takes positive values only cannot run there either."""
    converted = actfx.convert(_PositiveOnly(), bits=2)
    converted(torch.rand(4, 8) + 1).sum().backward()
    with pytest.warns(UserWarning, match="could not measure _?\\w* on fake tensors"):
        rows = actfx.show(converted, console=plain_console())
    assert rows and all(r["after_bytes"] is None for r in rows)


class _MaskedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation=F.silu, batch_first=True, bias=False)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(64), enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x, mask):
        return self.head(self.enc(x, mask=mask, is_causal=False))


@pytest.mark.filterwarnings("ignore:actfx.convert")
def test_show_measures_a_unit_called_by_keyword():
    """The converted nn.TransformerEncoder unit's graph got the positional arguments only; called
    with ``mask=`` its measure failed and show printed no bytes."""
    torch.manual_seed(0)
    x, mask = torch.randn(2, 12, 64), torch.randn(12, 12)
    converted = actfx.convert(_MaskedEncoder(), bits=2)
    converted(x, mask).sum().backward()
    buffer = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        actfx.show(converted, (x, mask), console=Console(file=buffer, width=200))
    assert "activations kept for backward" in buffer.getvalue()


class _SharedBlock(nn.Module):
    def __init__(self, shared: nn.Module):
        super().__init__()
        self.conv, self.shared = nn.Conv2d(8, 8, 1), shared

    def forward(self, x):
        return F.relu(self.conv(x)) + self.shared(x)


class _SharedTwice(nn.Module):
    """A convolution registered under two parents, as timm's CoaT shares its ``crpe`` convolutions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.blocks = nn.ModuleList([_SharedBlock(self.pos) for _ in range(2)])

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return h.mean()


def test_show_leaves_a_module_shared_by_two_parents_with_its_own_parameters():
    """functional_call restored a submodule reached by two names with the fake twin it had swapped
    in: after ``actfx.show`` the original and the converted model returned FakeTensors."""
    model, x = _SharedTwice(), torch.randn(2, 3, 16, 16)
    weights = [p for _, p in model.named_parameters(remove_duplicate=False)]
    converted = actfx.convert(model, bits=2)
    converted(x).backward()  # show measures at this call's shapes
    with contextlib.redirect_stdout(io.StringIO()):
        actfx.show(converted)
    assert all(p is w for (_, p), w in zip(model.named_parameters(remove_duplicate=False), weights, strict=True))
    for m in (model, converted):
        loss = m(x)
        assert type(loss) is torch.Tensor
        loss.backward()
    assert model.pos.weight.grad is not None


class _Routed(nn.Module):
    """A top-k router: its selection keeps compact indices, a function made anew by each rewrite."""

    def __init__(self):
        super().__init__()
        self.router, self.expert = nn.Linear(32, 300), nn.Linear(32, 32)

    def forward(self, x):
        scores, chosen = self.router(x).topk(4, dim=-1)
        return self.expert(x) * scores.sum(-1, keepdim=True) + chosen.float().mean()


def test_rows_of_a_top_k_router_keep_their_original_bytes():
    """Each rewrite names the compact-index selection anew; show matched rows to the original's
    by function identity and found none (a Hugging Face GraniteMoe: no row had "before" bytes)."""
    torch.manual_seed(0)
    model, x = _Routed(), torch.randn(64, 32)
    converted = actfx.convert(model, bits=2)
    rows = actfx.show(converted, x, console=plain_console())
    assert any("topk" in r["op"] for r in rows)
    assert sum(r["before_bytes"] or 0 for r in rows) > 0


def test_show_looks_inside_data_parallel_wrappers():
    """``actfx.show(nn.DataParallel(converted))`` said the model was not converted (the same for
    DistributedDataParallel around an actfx.compile model)."""
    converted = actfx.convert(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8)), bits=2)
    x = torch.randn(16, 64)
    assert actfx.show(nn.DataParallel(converted), x, console=plain_console()) == \
        actfx.show(converted, x, console=plain_console())


class _KnotSpacings(nn.Module):
    """A spline layer's knot spacings, ``grid[1:] - grid[:-1]``: computed from a buffer alone."""

    def __init__(self):
        super().__init__()
        self.register_buffer("grid", torch.linspace(-1, 1, 4097))
        self.lin = nn.Linear(64, 4096)

    def forward(self, x):
        return self.lin(x) / (self.grid[1:] - self.grid[:-1])


def test_values_folded_from_buffers_are_model_state_in_both_counts():
    """Conversion folds the spacings into a constant the model holds; show called it model state
    and count_saved an activation, so a plan's measured bytes passed its budget (a KAN)."""
    torch.manual_seed(0)
    model, x = _KnotSpacings(), torch.randn(4, 64)
    converted = actfx.convert(model, bits=2)
    rows = actfx.show(converted, x, console=plain_console())
    with count_saved(converted) as held:
        out = converted(x)
    assert held.activation_bytes == sum(r["after_bytes"] or 0 for r in rows)
    assert held.parameter_bytes >= 4096 * 4  # the folded spacings, with the parameters
    out.sum().backward()


class SampledAtPredictedGrid(nn.Module):
    """A spatial transformer: grid_sample reads the model's input (packed once, counted at the
    conv that reads it first) and keeps its grid exact on purpose (the grid's gradient is
    nonlinear in the grid)."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Conv2d(1, 2, 3, padding=1)
        self.theta = nn.Linear(512, 6)

    def forward(self, x):
        theta = self.theta(self.loc(x).flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.size(), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)


def test_a_large_value_kept_exact_by_design_is_not_called_too_small():
    model = SampledAtPredictedGrid()
    x = torch.randn(8, 1, 16, 16)
    converted = actfx.convert(model, bits=2)
    rows = {r["node"]: r for r in actfx.show(converted, x, console=plain_console())}
    row = rows["grid_sample"]
    assert row["after_bytes"] == row["before_bytes"] == 8 * 16 * 16 * 2 * 4  # the grid, exact
    assert row["kind"] == "kept exact (backward nonlinear in it)"
