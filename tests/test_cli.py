"""actfx/cli.py: `actfx report`, `actfx show`, `actfx models`, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import actfx
from actfx.accounting import count_saved
from actfx.cli import main
from actfx.models import build_model


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_writes_the_numbers_it_prints(capsys, tmp_path):
    path = tmp_path / "report.json"
    code, out, _ = run(capsys, "report", "resnet18", "--input-shape", "2,3,64,64", "--gpu", "t4",
                       "--optimizer", "sgd", "--top", "3", "--json", str(path))
    assert code == 0
    data = json.loads(path.read_text())
    for key in ("activation_bytes_baseline", "activation_bytes_actfx", "param_bytes", "peak_bytes_baseline",
                "peak_bytes_actfx", "max_batch_baseline", "max_batch_actfx", "nodes"):
        assert key in data, key
    assert data["param_bytes"] == sum(p.numel() * 4 for p in build_model("resnet18").parameters())
    assert data["activation_bytes_actfx"] < data["activation_bytes_baseline"]
    assert data["peak_bytes_actfx"] < data["peak_bytes_baseline"]
    assert data["max_batch_actfx"] > data["max_batch_baseline"] > 0
    assert sum(n["before_bytes"] for n in data["nodes"]) == data["activation_bytes_baseline"]
    assert sum(n["after_bytes"] for n in data["nodes"]) == data["activation_bytes_actfx"]
    assert len(data["layers"]) == 3
    assert "peak training memory" in out and "largest batch on t4" in out and "done in" in out
    assert data["layers"][0]["layer"] in out


def test_report_takes_three_levels_and_they_hold_less_than_two_bits(capsys, tmp_path):
    held = {}
    for bits in ("2", "1.6"):
        path = tmp_path / f"report{bits}.json"
        code, out, _ = run(capsys, "report", "resnet20", "--input-shape", "4,3,32,32", "--bits", bits, "--json", str(path))
        assert code == 0
        held[bits] = json.loads(path.read_text())["activation_bytes_actfx"]
    # packs hold 56 bytes a group of 256 against 68; masks and exact values stay as they are
    assert held["2"] * 0.8 < held["1.6"] < held["2"] * 0.95


@pytest.mark.slow
def test_compiled_report_packs_three_levels(capsys):
    """--compile --bits 1.6 estimates actfx.compile's three-level packs (refused before they had
    an Inductor lowering)."""
    code, out, _ = run(capsys, "report", "resnet20", "--input-shape", "4,3,32,32", "--bits", "1.6", "--compile")
    assert code == 0
    assert "packed 1.6-bit" in out and "packed 2-bit" not in out


def test_report_baseline_matches_a_real_step(capsys, tmp_path):
    """The dry run's baseline against the bytes a real CPU step keeps (same input, same model)."""
    path = tmp_path / "r.json"
    assert run(capsys, "report", "resnet20", "--input-shape", "4,3,32,32", "--json", str(path))[0] == 0
    model = build_model("resnet20")
    with count_saved(model) as real:
        out = model(torch.randn(4, 3, 32, 32))
    del out
    assert json.loads(path.read_text())["activation_bytes_baseline"] == pytest.approx(real.activation_bytes, rel=0.10)


def test_token_models_take_integer_inputs(capsys, tmp_path):
    path = tmp_path / "gpt.json"
    code, _, _ = run(capsys, "report", "gpt_tiny", "--input-shape", "2,128", "--gpu-memory", "8GiB",
                     "--dtype", "bfloat16", "--json", str(path))
    assert code == 0
    data = json.loads(path.read_text())
    assert data["input_dtype"] == "int64" and data["dtype"] == "bfloat16"
    assert data["param_bytes"] == sum(p.numel() * 2 for p in build_model("gpt_tiny").parameters())


def test_show_lists_ops(capsys):
    code, out, _ = run(capsys, "show", "resnet20", "--input-shape", "2,3,32,32", "--bits", "4")
    assert code == 0
    assert "packed 4-bit" in out and "1-bit mask" in out and "activations kept for backward" in out


def test_models_lists_the_builtins(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name in ("resnet18", "resnet50", "resnet152", "resnet56", "mobilenet_v2", "vit_b_16", "gpt2", "llama_small"):
        assert name in out


def test_a_file_spec_and_a_module_spec(capsys, tmp_path):
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class Net(nn.Sequential):
            def __init__(self):
                super().__init__(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    """))
    assert run(capsys, "report", f"{tmp_path / 'net.py'}:Net", "--input-shape", "8,16")[0] == 0
    assert run(capsys, "report", "actfx.models:resnet20", "--input-shape", "2,3,32,32")[0] == 0


def test_a_model_fx_cannot_trace_is_reported_as_its_capture_would_convert_it(capsys, tmp_path):
    """Such a model is captured by torch.export at its first training call, which a dry run never
    made: the report counted fx's part alone (a Hugging Face Llama config: 4.0x, not 11.5x).
    The dry run now captures it on meta tensors and reports what a real conversion holds."""
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(64, 256), nn.Linear(256, 64)

            def forward(self, x):
                h = torch.tanh(self.a(x)).clone()
                h[:, 0] = 0.0  # fx cannot trace item assignment; torch.export can
                return self.b(h * torch.sigmoid(h))
    """))
    out_path = tmp_path / "report.json"
    assert run(capsys, "report", f"{tmp_path / 'net.py'}:Net", "--input-shape", "64,64", "--json", str(out_path))[0] == 0
    reported = json.loads(out_path.read_text())
    sys.path.insert(0, str(tmp_path))
    try:
        from net import Net
    finally:
        sys.path.remove(str(tmp_path))
    model, x = Net(), torch.randn(64, 64)
    converted = actfx.convert(model, bits=2, example_inputs=(x,))
    with count_saved(converted) as after:
        kept = converted(x)  # noqa: F841
    assert reported["activation_bytes_actfx"] == after.activation_bytes
    assert reported["activation_bytes_baseline"] > 6 * reported["activation_bytes_actfx"]


BAD = {
    "unknown spec": (["report", "resnt50", "--input-shape", "2,3,32,32"], "did you mean 'resnet50'"),
    "missing hub": (["report", "nosuchhub.models:net", "--input-shape", "2"], "cannot import"),
    "no attribute": (["report", "actfx.models:nothing_here", "--input-shape", "2"], "has no attribute"),
    "no file": (["report", "missing/net.py:Net", "--input-shape", "2"], "no such file"),
    "malformed shape": (["report", "resnet20", "--input-shape", "2,three,32,32"], "not a shape"),
    "wrong rank": (["report", "resnet20", "--input-shape", "2,3,32"], "takes [batch, 3, 32, 32]"),
    "shape the model rejects": (["report", "mlp", "--input-shape", "2,5,5,5"], "running mlp on input [2, 5, 5, 5] failed"),
    "bits": (["report", "resnet20", "--input-shape", "2,3,32,32", "--bits", "3"], "use 1, 1.6 (three levels), 2, 4 or 8"),
    "gpu": (["report", "resnet20", "--input-shape", "2,3,32,32", "--gpu", "k80"], "unknown GPU 'k80'"),
    "gpu memory": (["report", "resnet20", "--input-shape", "2,3,32,32", "--gpu-memory", "lots"], "16GiB"),
    "both gpu flags": (["report", "resnet20", "--input-shape", "2,3,32,32", "--gpu", "t4", "--gpu-memory", "8GB"],
                       "not both"),
    "optimizer": (["report", "resnet20", "--input-shape", "2,3,32,32", "--optimizer", "lion"], "sgd, adam, adamw"),
    "dtype": (["report", "resnet20", "--input-shape", "2,3,32,32", "--dtype", "float8"], "--dtype 'float8'"),
    "no shape": (["report", "resnet20"], "--input-shape"),
    "unknown command": (["frobnicate"], "invalid choice"),
}


@pytest.mark.parametrize("argv, expected", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("actfx: error: ")
    assert expected in err
    assert "Traceback" not in err + out


def test_a_factory_that_raises(capsys, tmp_path):
    (tmp_path / "broken.py").write_text("def make():\n    raise RuntimeError('weights not found')\n")
    code, _, err = run(capsys, "report", f"{tmp_path / 'broken.py'}:make", "--input-shape", "2,3")
    assert code == 2 and "building the model failed: RuntimeError: weights not found" in err
    with pytest.raises(Exception, match="weights not found"):
        main(["report", f"{tmp_path / 'broken.py'}:make", "--input-shape", "2,3", "--debug"])


def test_a_real_process():
    """`python -m actfx.cli` as a user runs it: plain text on a pipe, nothing on stderr."""
    done = subprocess.run([sys.executable, "-m", "actfx.cli", "report", "resnet20", "--input-shape", "8,3,32,32",
                           "--gpu", "v100-16"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "largest batch on v100-16" in done.stdout and "\x1b[" not in done.stdout
    assert done.stderr == ""


def test_plan_writes_a_plan_that_report_applies(capsys, tmp_path):
    import actfx

    path, report = tmp_path / "plan.json", tmp_path / "report.json"
    code, out, _ = run(capsys, "plan", "mlp", "--input-shape", "8,1,28,28", "--activation-budget", "8KiB",
                       "--out", str(path))
    assert code == 0 and "held for backward" in out and f"wrote {path}" in out
    plan = actfx.Plan.load(path)
    assert plan.activation_bytes <= 8 * 1024 and {s.module for s in plan.sites} >= {"layers.0", "fc"}
    code, out, _ = run(capsys, "report", "mlp", "--input-shape", "8,1,28,28", "--plan", str(path),
                       "--json", str(report))
    assert code == 0 and f"widths from {path}" in out
    assert json.loads(report.read_text())["activation_bytes_actfx"] == plan.activation_bytes


def test_plan_compile_writes_a_plan_for_the_compiled_pass(capsys, tmp_path):
    import actfx

    path = tmp_path / "plan.json"
    code, out, err = run(capsys, "plan", "mlp", "--input-shape", "8,1,28,28", "--activation-budget", "16KiB",
                         "--compile", "--memory-budget", "0.5", "--out", str(path))
    assert code == 0 and f"wrote {path}" in out, err
    plan = actfx.Plan.load(path)
    assert plan.path == "compile" and plan.memory_budget == 0.5
    assert plan.activation_bytes <= 16 * 1024 and any(s.planned for s in plan.sites)
    # Sites are the compiled pass's saved values, named by ATen op, not actfx.convert's op kinds.
    assert plan.sites and not {s.op for s in plan.sites} & {"linear", "relu"}, [s.op for s in plan.sites]
    code, out, err = run(capsys, "report", "mlp", "--input-shape", "8,1,28,28", "--compile", "--plan", str(path))
    assert code == 0 and "widths from" in out and "memory budget 0.5" in out, err
    assert "one training step's worst point" in out  # the compiled step's peak, from the same partition


@pytest.mark.slow
def test_plan_recompute_reruns_blocks_in_backward(capsys, tmp_path):
    import actfx

    path = tmp_path / "plan.json"
    code, out, err = run(capsys, "plan", "gpt_tiny", "--input-shape", "4,64", "--activation-budget", "400KiB",
                         "--recompute", "1", "--out", str(path))
    assert code == 0 and "recompute" in out and "recomputed in" in out, err
    plan = actfx.Plan.load(path)
    assert [s.module for s in plan.recomputed] == ["h.0", "h.1"] and plan.activation_bytes <= 400 * 1024


@pytest.mark.parametrize("argv, expected", [
    (["--budget", "1GiB", "--memory-budget", "0.3"], "--memory-budget applies to the compiled path; add --compile"),
    (["--budget", "1GiB", "--compile", "--memory-budget", "2"], "must be a number in (0, 1]"),
    (["--activation-budget", "1KiB"], "cannot meet the activation budget 1.00 KiB: every planned op at 1 bit"),
    (["--activation-budget", "1KiB", "--recompute", "off"], "every planned op at 1 bit still needs held activations"),
    (["--budget", "1GiB", "--recompute", "lots"], "--recompute 'lots' must be auto, off or a fraction in (0, 1]"),
    (["--budget", "1GiB", "--compile", "--recompute", "0.5"], "--recompute plans actfx.convert"),
    (["--budget", "1MiB"], "cannot meet the peak budget 1.00 MiB"),
    (["--budget", "1GiB", "--gpu", "t4"], "give exactly one of --budget, --activation-budget or --gpu"),
    (["--budget", "1GiB", "--batch", "4"], "--batch goes with --gpu"),
    (["--budget", "lots"], "--budget: cannot read 'lots'"),
    (["--budget", "0"], "budget must be a positive number of bytes"),
    (["--activation-budget", "0"], "activation_budget must be a positive number of bytes"),
    (["--budget", "1GiB", "--input-shape", "8,1,28"], "--input-shape 8,1,28 has 3 sizes but mlp takes"),
    (["--budget", "1GiB", "--input-shape", "8,1,28,20"], "failed on example_inputs of shape [8, 1, 28, 20]"),
])
def test_plan_errors_are_one_line_and_exit_code_2(capsys, argv, expected):
    code, _, err = run(capsys, "plan", "mlp", "--input-shape", "8,1,28,28", *argv)
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1


def test_report_refuses_a_plan_made_for_another_model(capsys, tmp_path):
    path = tmp_path / "plan.json"
    assert run(capsys, "plan", "mlp", "--input-shape", "8,1,28,28", "--budget", "1GiB", "--out", str(path))[0] == 0
    code, _, err = run(capsys, "report", "resnet18", "--input-shape", "2,3,64,64", "--plan", str(path))
    assert code == 2 and "made for another model" in err and "--input-shape" not in err
