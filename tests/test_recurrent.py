"""Recurrent layers (nn.LSTM / GRU / RNN and their cells) are rerun in backward from their exact
inputs: autograd kept every step's gates and states (an LSTM tagger: 3.6 MB, its input 0.1 MB)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import actfx
from actfx.accounting import count_saved


class _Tagger(nn.Module):
    """Embeddings -> a recurrent layer -> per-token classes, and a class from the last state."""

    def __init__(self, layer):
        super().__init__()
        self.emb, self.layer = nn.Embedding(100, 32), layer
        width = getattr(layer, "proj_size", 0) or 32
        self.tokens, self.sentence = nn.Linear(width * (2 if layer.bidirectional else 1), 5), nn.Linear(width, 3)

    def forward(self, x, h0=None):
        out, state = self.layer(self.emb(x), h0)
        last = (state[0] if isinstance(state, tuple) else state)[-1]
        return self.tokens(out).mean() + self.sentence(last).square().mean()


def _grads(model, *inputs):
    return torch.autograd.grad(model(*inputs), [p for p in model.parameters() if p.requires_grad] +
                               [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad])


@pytest.mark.parametrize("layer, factor", [
    (lambda: nn.LSTM(32, 32, 2, batch_first=True, dropout=0.3), 8),
    (lambda: nn.GRU(32, 32, batch_first=True, bidirectional=True), 8),
    (lambda: nn.RNN(32, 32, batch_first=True), 2.5),  # a tanh RNN keeps little more than its input
    (lambda: nn.LSTM(32, 32, batch_first=True, proj_size=16), 5),
], ids=["lstm-dropout", "gru-bidirectional", "rnn", "lstm-proj"])
def test_a_recurrent_layer_keeps_its_input_and_its_gradients_are_exact(layer, factor):
    torch.manual_seed(0)
    model, x = _Tagger(layer()), torch.randint(0, 100, (8, 40))
    converted = actfx.convert(model, bits=2)
    assert "recurrent" in [d.kind for d in converted._actfx_record.decisions]
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.equal(converted(x), expected)  # the same dropout masks
    torch.manual_seed(2)
    exact = _grads(model, x)
    torch.manual_seed(2)
    got = _grads(converted, x)
    # rerun from exact inputs with the same masks: only the heads' weights read packed values
    recurrent = [i for i, (name, _) in enumerate(model.named_parameters()) if name.startswith(("emb", "layer"))]
    for i in recurrent:
        assert torch.allclose(got[i], exact[i], rtol=1e-4, atol=1e-6)
    with count_saved(model) as plain:
        kept = model(x)  # noqa: F841
    with count_saved(converted) as packed:
        kept = converted(x)  # noqa: F841
    assert packed.activation_bytes * factor < plain.activation_bytes, (plain.activation_bytes, packed.activation_bytes)


def test_the_initial_state_gets_its_gradient():
    """A decoder started from an encoder's state: the gradient reaches the state's producer."""
    torch.manual_seed(0)
    model, x = _Tagger(nn.GRU(32, 32, batch_first=True)), torch.randint(0, 100, (4, 20))
    h0 = torch.randn(1, 4, 32, requires_grad=True)
    converted = actfx.convert(model, bits=2)
    exact, got = _grads(model, x, h0), _grads(converted, x, h0)
    assert torch.allclose(got[-1], exact[-1], rtol=1e-4, atol=1e-6)


class _Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.out = nn.LSTMCell(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = c = torch.zeros(8, 32)
        for t in range(12):
            h, c = self.cell(x[t], (h, c))
        return self.out(h).square().mean()


def test_a_cell_in_a_python_loop_is_rerun_per_step():
    torch.manual_seed(0)
    model, x = _Cell(), torch.randn(12, 8, 16, requires_grad=True)
    converted = actfx.convert(model, bits=2)
    assert "recurrent" in [d.kind for d in converted._actfx_record.decisions]
    assert torch.equal(converted(x), model(x))
    exact, got = _grads(model, x), _grads(converted, x)
    assert torch.allclose(got[-1], exact[-1], rtol=1e-4, atol=1e-6)  # the input's: through every step
    with count_saved(model) as plain:
        kept = model(x)  # noqa: F841
    with count_saved(converted) as packed:
        kept = converted(x)  # noqa: F841
    assert packed.activation_bytes * 2 < plain.activation_bytes, (plain.activation_bytes, packed.activation_bytes)


class _Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm = nn.Embedding(50, 16), nn.LSTM(16, 16, batch_first=True)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(self.emb(x), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True)[0].sum()


def test_a_packed_sequence_runs_as_pytorch_runs_it():
    """A PackedSequence holds its tensor inside: the rerun would not differentiate it (the
    embeddings would get no gradient), so such a call is left to autograd."""
    torch.manual_seed(0)
    model, x, lengths = _Packed(), torch.randint(0, 50, (4, 10)), torch.tensor([10, 7, 3, 9])
    converted = actfx.convert(model, bits=2)
    assert torch.equal(converted(x, lengths), model(x, lengths))
    for g, e in zip(_grads(converted, x, lengths), _grads(model, x, lengths)):
        assert torch.equal(g, e)


class _PackedGru(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Linear(8, 32), nn.Linear(64, 4)
        self.rnn = nn.GRU(32, 32, batch_first=True, bidirectional=True)

    def forward(self, x, lengths):
        _, last = self.rnn(pack_padded_sequence(self.emb(x), lengths, batch_first=True))
        return self.head(torch.cat([last[0], last[1]], -1))


def test_a_layer_called_with_a_packed_sequence_is_not_offered_to_torch_export():
    """torch.export cannot take a PackedSequence: the first call tried, and warned with its
    internal error ("'dict' object has no attribute 'device'")."""
    torch.manual_seed(0)
    model, x, lengths = _PackedGru(), torch.randn(4, 10, 8), torch.tensor([10, 8, 5, 3])
    converted = actfx.convert(model, bits=2)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert torch.equal(converted(x, lengths), model(x, lengths))
    assert not [w for w in said if "could not capture GRU" in str(w.message)]
