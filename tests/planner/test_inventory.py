"""actfx/planner/inventory.py: the groups must predict, to the byte, what any choice of widths holds.

The planner picks widths on the inventory's bytes; where a conversion holds something the
inventory does not list, the plan overshoots its budget and every width is squeezed to pay for it.
"""

from __future__ import annotations

import random

import pytest
import torch

import actfx
from actfx.config import Config
from actfx.passes.analyze import measure
from actfx.planner.inventory import take_inventory
from planner_models import SmallCNN
from transformer_blocks import example

WIDTHS = (1, 2, 4, 8)


def _model(name):
    if name == "cnn":
        torch.manual_seed(0)
        return SmallCNN(), (torch.randn(4, 3, 16, 16),)
    return example(name)


@pytest.mark.parametrize("name", ["gpt", "mha", "cnn"])
def test_the_inventory_predicts_what_any_widths_hold(name):
    model, inputs = _model(name)
    inventory = take_inventory(actfx.convert(model, bits=2), inputs)
    draw = random.Random(0)
    for _ in range(3):
        widths = [draw.choice(WIDTHS) for _ in inventory.groups]
        site_bits = {unit: w for group, w in zip(inventory.groups, widths) for unit in group.units}
        converted = actfx.convert(model, config=Config(bits=2, site_bits=site_bits))
        predicted = inventory.other_bytes + sum(g.nbytes(w, 256) for g, w in zip(inventory.groups, widths))
        assert measure(converted, inputs).activation_bytes == predicted, widths


def test_attention_q_and_k_are_charged_at_their_floor():
    """Recomputed attention keeps q and k at 8 bits whatever its width (a narrower recompute is
    biased); charged at the plan's width they looked 4x cheaper than they are."""
    model, inputs = example("gpt")
    inventory = take_inventory(actfx.convert(model, bits=2), inputs)
    attention = next(g for g in inventory.groups if any(u.endswith(":sdpa") for u in g.units))
    floors = sorted(p.source.floor for p in attention.packs)
    assert floors == [0, 8, 8]  # v follows the width, q and k do not
    assert attention.nbytes(1, 256) > sum(p.nbytes(8, 256) for p in attention.packs if p.source.floor)


def test_a_linear_after_layer_norm_shares_the_norms_width():
    """The linear reads LayerNorm's output rebuilt from LayerNorm's own pack; given more bits than
    that pack, it packs a copy of its own, so the two must take one width."""
    model, inputs = example("gpt")
    inventory = take_inventory(actfx.convert(model, bits=2), inputs)
    group = next(g for g in inventory.groups if "ln1:layer_norm" in g.units)
    assert "qkv:linear" in group.units
