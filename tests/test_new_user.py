"""New-user frictions from issue 10: each once silent or unhelpful, now fixed."""

import warnings

import pytest
import torch
import torch.nn as nn

import actfx
from actfx.accounting import count_saved
from actfx.config import DEFAULT_OP_BITS


def test_show_after_a_training_step_prints_bytes(capsys):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    converted = actfx.convert(model, bits=2)
    converted(torch.randn(4, 3, 32, 32)).sum().backward()
    rows = actfx.show(converted)  # no inputs: the last training call's shapes are used
    assert all(r["before_bytes"] is not None for r in rows if r["kind"] != "nothing saved")
    assert "bytes: unknown" not in capsys.readouterr().out


class KeywordInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, scale=None):
        return torch.relu(self.lin(x)) * (1.0 if scale is None else scale)


class TwoOptionalInputs(KeywordInput):
    def forward(self, x=None, scale=None):
        return torch.relu(self.lin(x)) * (1.0 if scale is None else scale)


def test_a_call_giving_some_optional_inputs_gets_a_graph_of_its_own():
    """Graphs existed for every optional input given or every one None; a call giving some ran
    the module's own forward, which packs nothing. Such a call is traced at its first use."""
    torch.manual_seed(0)
    model, x = TwoOptionalInputs(), torch.randn(256, 8)  # values above Config.min_numel: packed
    converted = actfx.convert(model, bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = converted(x)
    assert torch.equal(out, model(x))
    with count_saved(model) as before:
        kept = model(x)
    with count_saved(converted) as after:
        kept = converted(x)  # noqa: F841
    assert after.activation_bytes < before.activation_bytes  # packed, not the module's own forward
    assert len(converted._actfx_record.forwards[""]) == 3  # general, all-None, and this call's
    exact = torch.autograd.grad(model(x).square().sum(), model.lin.weight)[0]
    got = torch.autograd.grad(converted(x).square().sum(), converted.lin.weight)[0]
    assert (got - exact).norm() < 0.05 * exact.norm()


class _FloatOfOptional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, a=None, b=None):
        h = self.lin(x)
        return h * float(b.sum()) if a is None else h + a


def test_a_call_fx_cannot_trace_runs_the_module_and_says_so():
    """fx cannot take float() of a traced value: that call runs unconverted, with a warning."""
    converted = actfx.convert(_FloatOfOptional(), bits=8)
    x, b = torch.randn(2, 8), torch.randn(3)
    with pytest.warns(UserWarning, match="ran unconverted .* a call with a None .fx could not trace"):
        out = converted(x, b=b)
    torch.testing.assert_close(out, _FloatOfOptional.forward(converted, x, b=b))


def test_show_after_a_training_call_by_keyword_measures_it():
    """Only positional inputs were remembered: after model(x=...) show reran the model with no
    inputs and crashed inside it (linear(): argument input must be Tensor, not NoneType)."""
    converted = actfx.convert(KeywordInput(), bits=8)
    converted(x=torch.randn(2, 8)).sum().backward()
    rows = actfx.show(converted)
    assert rows and all(r["before_bytes"] is not None for r in rows if r["kind"] != "nothing saved")
    converted(torch.randn(2, 8), scale=torch.tensor(2.0)).sum().backward()
    assert actfx.show(converted)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else self.lin(-x)


def test_a_root_that_does_not_trace_warns_once_and_says_how_to_convert_it_whole():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actfx.convert(DataDependent())
    messages = [str(w.message) for w in caught if "actfx.convert" in str(w.message)]
    assert len(messages) == 1 and "example_inputs" in messages[0] and "\n" not in messages[0]


def test_a_traceable_model_does_not_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = actfx.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert actfx.is_converted(converted)
    assert not [w for w in caught if "actfx.convert" in str(w.message)]


@pytest.mark.parametrize("kwargs", [{"bits": 2, "config": actfx.Config(bits=4)},
                                    {"group_size": 128, "config": actfx.Config(bits=4)}])
def test_bits_that_disagree_with_config_are_refused(kwargs):
    with pytest.raises(ValueError, match="disagree"):
        actfx.convert(nn.Linear(4, 4), **kwargs)


def test_bits_that_agree_with_config_are_accepted():
    assert actfx.convert(nn.Linear(4, 4), bits=4, config=actfx.Config(bits=4))._actfx_record.config.bits == 4


def test_transformer_layer_attention_keeps_the_8_bit_default():
    assert DEFAULT_OP_BITS["transformer_layer"] == 8
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    converted = actfx.convert(nn.Sequential(layer), bits=2)
    kinds = {d.kind for d in converted._actfx_record.decisions}
    assert "transformer_layer" in kinds
    assert converted._actfx_record.config.bits_for("transformer_layer", "0") == 8


# ---------------------------------------------------------------------------------- the CLI

from actfx.cli import main  # noqa: E402


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_dash_writes_json_alone_to_stdout(capsys):
    import json

    code, out, err = _cli(capsys, "report", "mlp", "--input-shape", "4,1,28,28", "--json", "-")
    assert code == 0 and json.loads(out)["activation_bytes_baseline"] > 0
    assert "Training memory" in err


def test_a_negative_size_is_named_not_an_argparse_puzzle(capsys):
    code, _, err = _cli(capsys, "report", "mlp", "--input-shape", "-1,1,28,28")
    assert code == 2 and "positive sizes" in err and "expected one argument" not in err


def test_a_missing_factory_names_the_file_and_what_it_defines(capsys, tmp_path):
    path = tmp_path / "net.py"
    path.write_text("import torch.nn as nn\ndef net():\n    return nn.Linear(2, 2)\n")
    code, _, err = _cli(capsys, "report", f"{path}:missing", "--input-shape", "2,2")
    assert code == 2 and str(path) in err and "it defines net" in err and "actfx_spec_" not in err


def test_a_wrong_image_size_says_what_the_model_takes(capsys):
    code, _, err = _cli(capsys, "report", "vit_tiny", "--input-shape", "2,3,100,100")
    assert code == 2 and "try --input-shape 2,3,32,32" in err


def test_value_dependent_control_flow_is_measured_for_real(capsys, tmp_path):
    path = tmp_path / "branchy.py"
    path.write_text("import torch.nn as nn\nclass Model(nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.a = nn.Linear(16, 16)\n"
                    "    def forward(self, x):\n        h = self.a(x)\n        return h.relu() if h.sum() > 0 else h\n")
    code, out, err = _cli(capsys, "show", f"{path}:Model", "--input-shape", "4,16")
    assert code == 0 and "branches on tensor values, so it ran for real" in err
    assert "activations kept for backward: " in out and " B -> " in out, out  # bytes, whichever branch ran


def test_show_measures_a_model_whose_forward_reads_values():
    """actfx.show(converted, inputs) on fake tensors cannot branch on values: it runs for real."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 64)

        def forward(self, x):
            h = self.a(x).relu()
            return self.b(h * 2 if h.sum() > 0 else h)

    model = Branchy()
    buffers = [t.clone() for t in model.state_dict().values()]
    converted = actfx.convert(model, bits=2)
    rows = actfx.show(converted, torch.randn(64, 32))
    assert sum(r["before_bytes"] or 0 for r in rows) > sum(r["after_bytes"] or 0 for r in rows) > 0
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.state_dict().values()))


# ------------------------------------------------------- optional arguments in traced submodules


class Embeddings(nn.Module):
    """Hugging Face style: an optional argument that fx traces as a tensor (``if ids is None``
    is False for a Proxy), called with it left None."""

    def __init__(self):
        super().__init__()
        self.tok, self.typ = nn.Embedding(50, 16), nn.Embedding(2, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, input_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.norm(self.tok(input_ids) + self.typ(token_type_ids))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = Embeddings(), nn.Linear(16, 50)

    def forward(self, ids):
        if ids.sum() < 0:  # value-dependent: the root does not trace, its children are converted
            ids = -ids
        return self.head(self.emb(ids))


def test_a_converted_submodule_called_with_a_default_none_behaves_like_the_original():
    torch.manual_seed(0)
    model, ids = Model(), torch.randint(0, 50, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = actfx.convert(model, bits=8)
    assert actfx.is_converted(converted.emb)
    torch.testing.assert_close(converted(ids), model(ids))
    converted(ids).sum().backward()  # used to fail: embedding(): argument 'indices' must be Tensor, not NoneType
    typ = torch.ones_like(ids)
    torch.testing.assert_close(converted.emb(ids, typ), model.emb(ids, typ))  # given: the converted graph runs


class Block(nn.Module):
    """timm / Hugging Face style: an optional mask, None in most calls."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x, mask=None):
        h = torch.nn.functional.gelu(self.a(x))
        if mask is not None:
            h = h * mask
        return self.b(h)


def test_calls_leaving_an_optional_input_none_run_a_graph_traced_with_it_none():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(128, 64)
    converted = actfx.convert(model, bits=2)
    for call in (lambda m: m(x), lambda m: m(x, None), lambda m: m(x, mask=None)):
        torch.manual_seed(1)
        assert torch.equal(call(converted), call(model))
        with count_saved(model) as before:
            kept = call(model)
        with count_saved(converted) as after:
            kept = call(converted)  # noqa: F841 - used to run the original forward: nothing packed
        assert after.activation_bytes * 8 < before.activation_bytes
    mask = torch.rand(128, 256)
    assert torch.equal(converted(x, mask), model(x, mask))  # given: the general graph


class FlaggedBlock(nn.Module):
    """timm's VisionTransformer: an optional mask and a flag, both branched on together."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x, mask=None, is_causal: bool = False):
        h = torch.nn.functional.gelu(self.a(x))
        if mask is not None or is_causal:
            h = h * (mask if mask is not None else torch.tril(torch.ones_like(h)))
        return self.b(h)


def test_a_flag_left_at_its_default_does_not_stop_the_graph_traced_without_the_mask():
    """fx cannot branch on a traced bool: the graph for calls leaving the mask None fixes the
    flag at its default too (timm ViTs: nothing was packed before), and calls that set it run
    the model's own forward."""
    torch.manual_seed(0)
    model, x = FlaggedBlock(), torch.randn(128, 64)
    converted = actfx.convert(model, bits=2)
    with count_saved(model) as before:
        kept = model(x)
    with count_saved(converted) as after:
        kept = converted(x)  # noqa: F841
    assert torch.equal(converted(x), model(x))
    assert after.activation_bytes * 8 < before.activation_bytes
    assert torch.equal(converted(x, is_causal=True), model(x, is_causal=True))
    mask = torch.rand(128, 256)
    assert torch.equal(converted(x, mask), model(x, mask))


def test_hugging_face_bert_without_example_inputs_trains():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=500, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = actfx.convert(model, bits=8)
    ids = torch.randint(0, 500, (2, 16))
    out, ref = converted(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
