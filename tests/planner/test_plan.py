"""actfx/planner/plan.py: the Plan value, its JSON, its Config, its summary."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

import actfx
from actfx.config import KEEP_EXACT
from actfx.planner.plan import Plan, Site


def _plan() -> Plan:
    sites = (Site("layer1.0.bn1", "batch_norm", 4, 4096, 0.5), Site("layer1.0.conv2", "conv", 1, 0, 0.25),
             Site("fc", "linear", KEEP_EXACT, 8192, 0.0), Site("h.0.attn", "sdpa", 8, 9000, None))
    return Plan(sites, bits=2, group_size=256, batch=8, activation_bytes=20000, predicted_peak_bytes=90000,
                average_bits=1.5, gradient_variance=0.75, budget="activation budget 19.5 KiB")


def test_json_round_trip_is_exact_and_readable(tmp_path):
    path = tmp_path / "plan.json"
    plan = _plan()
    plan.save(path)
    assert Plan.load(path) == plan
    data = json.loads(path.read_text())
    assert data["sites"][0] == {"module": "layer1.0.bn1", "op": "batch_norm", "bits": 4, "bytes": 4096,
                                "variance": 0.5}
    assert data["sites"][2]["bits"] == "exact"
    assert data["activation_bytes"] == 20000 and data["average_bits"] == 1.5


def test_the_config_sets_measured_sites_only():
    config = _plan().config()
    assert dict(config.site_bits) == {"layer1.0.bn1:batch_norm": 4, "layer1.0.conv2:conv": 1, "fc:linear": KEEP_EXACT}
    assert config.bits_for("batch_norm", "layer1.0.bn1") == 4
    assert config.bits_for("batch_norm", "layer1.0.bn2") == 2  # not in the plan: the default
    assert config.bits_for("sdpa", "h.0.attn") == 8  # not measured: the default for attention


@pytest.mark.parametrize("text, match", [
    ("not json", "not JSON"),
    ('{"format": "other"}', "not an actfx plan"),
    ('{"format": "actfx-plan/1", "sites": []}', "malformed plan"),
])
def test_loading_something_else_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        Plan.load(path)


def test_bad_sites_are_refused():
    with pytest.raises(ValueError, match="bits must be one of"):
        Site("a", "conv", 3, 0, 0.0)
    with pytest.raises(ValueError, match="each module:op once"):
        Plan((Site("a", "conv", 2, 0, 0.0),) * 2, 2, 256, 1, 0, 0, 2.0, 0.0)
    with pytest.raises(ValueError, match="must read 'module.path:kind'"):
        actfx.Config(site_bits={"layer1": 2})
    with pytest.raises(ValueError, match="bits must be one of"):
        actfx.Config(module_bits={"layer1": KEEP_EXACT})  # exact is a per-op choice only


def test_summary_lists_every_site_with_its_bits_and_bytes():
    console = Console(width=120, record=True, no_color=True)
    _plan().summary(console)
    text = console.export_text()
    assert "layer1.0.bn1" in text and "4.00 KiB" in text and "not measured" in text and "exact" in text
    assert "average 1.50 bits" in text and "66.7%" in text
