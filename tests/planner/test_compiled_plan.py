"""actfx.plan(..., path="compile"): widths for the values actfx.compile packs, and
actfx.compile(model, plan=plan) applying them."""

from __future__ import annotations

import warnings

import pytest
import torch

import actfx
from actfx.compiled_estimate import as_fx_code, estimate_compiled
from actfx.config import KEEP_EXACT, Config
from actfx.planner.compiled_sensitivity import compiled_sensitivities
from planner_models import SmallCNN, projection


class PlannedCnn(SmallCNN):
    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.gelu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class CalibratedCnn(PlannedCnn):
    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.gelu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.slow
def test_the_compiled_model_holds_what_the_plan_says_with_its_widths():
    torch.manual_seed(0)
    model, x = PlannedCnn(), torch.randn(4, 3, 16, 16)
    uniform = estimate_compiled(model, (x,), Config(bits=2)).bytes_after
    plan = actfx.plan(model, x, activation_budget=int(uniform * 1.5), path="compile", loss_fn=projection())
    assert plan.path == "compile" and plan.activation_bytes <= uniform * 1.5
    widths = {s.key: s.bits for s in plan.sites}
    assert len(set(widths.values())) > 1  # a mix, not one width everywhere
    compiled = actfx.compile(model, plan=plan)
    projection()(compiled(x)).backward()
    record = compiled._actfx_compiled
    assert record.bytes_after == plan.activation_bytes
    seen = 0
    for value in (v for p in record.plans for v in p.saved):
        if value.site in widths:
            seen += 1
            expected = None if widths[value.site] == KEEP_EXACT else widths[value.site]
            assert value.bits == expected, value
    assert seen >= len(widths)


@pytest.mark.slow
def test_a_compile_plan_takes_three_levels_and_the_compiled_model_holds_them():
    """Just under uniform 2-bit's bytes the plan puts sites at three levels (1.6) rather than
    dropping one to 1 bit, and actfx.compile packs them as planned (it refused 1.6 before the
    compiled pass had a three-level lowering)."""
    from actfx.kernels import TERNARY

    torch.manual_seed(0)
    model, x = PlannedCnn(), torch.randn(4, 3, 16, 16)
    uniform = estimate_compiled(model, (x,), Config(bits=2)).bytes_after
    plan = actfx.plan(model, x, activation_budget=int(uniform * 0.95), path="compile", loss_fn=projection())
    widths = {s.key: s.bits for s in plan.sites}
    assert TERNARY in widths.values(), widths
    compiled = actfx.compile(model, plan=plan)
    projection()(compiled(x)).backward()
    record = compiled._actfx_compiled
    assert record.bytes_after == plan.activation_bytes
    assert {v.site: v.bits for p in record.plans for v in p.saved if v.site in widths} == widths


class _TanhStack(torch.nn.Module):
    """Functional code in one forward: every saved value is the root module's."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(64, 64) / 8) for _ in range(3)])

    def forward(self, x):
        for w in self.w:
            x = x + torch.tanh(x @ w)
        return x


def test_values_of_one_op_in_one_module_have_their_own_plan_keys():
    """The layers' tanh derivatives are three ``aten.mul`` values of the root module: keys
    ``:mul``, ``:mul#2``, ``:mul#3``, and a width given for one applies to that value alone."""
    model, x = _TanhStack(), torch.randn(32, 64)
    saved = [v for p in estimate_compiled(model, (x,), Config(bits=2)).plans for v in p.saved]
    muls = [v.site for v in saved if v.op == "aten.mul.Tensor"]
    assert muls == [":mul", ":mul#2", ":mul#3"]
    assert len({v.site for v in saved}) == len(saved)
    planned = estimate_compiled(model, (x,), Config(bits=2, site_bits={":mul#2": 8}))
    assert {v.site: v.bits for p in planned.plans for v in p.saved if v.op == "aten.mul.Tensor"} == {
        ":mul": 2, ":mul#2": 8, ":mul#3": 2}


def test_the_estimate_matches_the_variance_of_the_packed_graphs():
    """Sum over values at 2 bits against E||g_k - g||^2 of the same partition with real 2-bit
    packs, run as fx code (K draws)."""
    torch.manual_seed(0)
    model, x, loss = CalibratedCnn(), torch.randn(8, 3, 16, 16), projection()
    config = Config(bits=2, op_bits={})
    predicted = sum(s.at(2) for s in compiled_sensitivities(model, (x,), config, None, loss_fn=loss).values())
    packed, record = as_fx_code(model, config)
    params = list(model.parameters())
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(model(x)), params)])
    samples = []
    for _ in range(24):
        grads = torch.autograd.grad(loss(packed(x)), params)
        samples.append(float((torch.cat([g.reshape(-1) for g in grads]) - exact).square().sum()))
    measured = sum(samples) / len(samples)
    assert any(v.bits == 2 for p in record.plans for v in p.saved)
    assert measured == pytest.approx(predicted, rel=0.35)


def test_a_plan_goes_to_the_path_it_was_made_for():
    torch.manual_seed(0)
    model, x = SmallCNN(), torch.randn(2, 3, 8, 8)
    eager = actfx.plan(model, x, activation_budget=10**9)
    with pytest.raises(ValueError, match="made for actfx.convert"):
        actfx.compile(model, plan=eager)
    compiled_plan = actfx.Plan.from_dict({**eager.to_dict(), "path": "compile", "sites": []})
    with pytest.raises(ValueError, match="made for actfx.compile"):
        actfx.convert(model, plan=compiled_plan)
    with pytest.raises(ValueError, match="both set the widths"):
        actfx.compile(model, bits=4, plan=compiled_plan)
    with pytest.raises(ValueError, match="goes with path='compile'"):
        actfx.plan(model, x, activation_budget=10**9, memory_budget=0.3)


@pytest.mark.slow
def test_a_compile_plans_peak_is_the_compiled_steps_not_the_eager_conversions():
    """The peak budget is read against the partitioned graphs' own step (graph_memory), which
    the plan's widths are estimated with; the eager conversion's working set stood in before and
    overestimated a compiled gpt_tiny's step by a third."""
    from actfx.report import static_costs

    torch.manual_seed(0)
    model, x = PlannedCnn(), torch.randn(4, 3, 16, 16)
    plan = actfx.plan(model, x, budget=2**30, path="compile", loss_fn=projection())
    record = estimate_compiled(model, (x,), plan.config_for("compile"))
    costs = static_costs(model, "adamw")
    fixed = costs.param_bytes + costs.optimizer_bytes + costs.buffer_bytes
    assert record.step_bytes > record.bytes_after > 0
    assert plan.predicted_peak_bytes == fixed + record.step_bytes


class _TanhMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_the_largest_batch_on_a_gpu_is_the_one_the_compiled_plan_fits():
    """The batch was sized for the eager conversion at the default width; the compiled partition
    holds more here (it keeps the model's input exact, which the eager conversion packs), so the
    plan at that batch could not fit and plan() failed. The batch now shrinks until the compiled plan fits."""
    from actfx.report import GPUS

    torch.manual_seed(0)
    model, x = _TanhMlp(), torch.randn(256, 64)
    plan = actfx.plan(model, x, gpu="t4", path="compile")
    assert plan.batch > 256 and plan.predicted_peak_bytes <= GPUS["t4"]


def test_a_model_that_cannot_be_partitioned_on_meta_tensors_says_what_to_do():
    """A Hugging Face causal LM with its cache on builds real tensors under dynamo, so the
    partition at the planned batch (meta tensors) fails: one line names the fix, where the dynamo
    error ran to dozens; with the cache off the plan is made and applied."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model, ids = transformers.LlamaForCausalLM(config).train(), torch.randint(0, 128, (2, 16))
    with pytest.raises(RuntimeError, match="set config.use_cache=False, or plan with path='eager'"):
        actfx.plan(model, (ids,), activation_budget=10**6, path="compile")
    model.config.use_cache = False
    plan = actfx.plan(model, (ids,), activation_budget=10**6, path="compile")
    assert plan.activation_bytes <= 10**6


class _Positions(torch.nn.Module):
    """A forward that builds a tensor without ``device=`` (a position table, RoPE's arange)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        position = torch.arange(x.shape[1], dtype=torch.float32)[:, None] / x.shape[1]
        return self.b(torch.tanh(self.a(x + position)))


@pytest.mark.slow
def test_a_forward_building_tensors_without_a_device_is_planned_on_meta_tensors():
    """The partition at the planned batch runs on meta tensors; the forward's own arange was made on
    the CPU and met them ("Tensor device mismatch"), so the compile plan failed where
    actfx.compile and the eager plan work."""
    torch.manual_seed(0)
    model, x = _Positions(), torch.randn(4, 32, 16)
    plan = actfx.plan(model, (x,), activation_budget=8192, path="compile", loss_fn=projection())
    assert 0 < plan.activation_bytes <= 8192


class _ZeroTokenNorm(torch.nn.Module):
    """A zero class token (as Hugging Face's DeiT and ViT initialise it) joins the tokens before
    a LayerNorm over 32 features: its row has no variance, so the norm's rstd is 1e6 there."""

    def __init__(self):
        super().__init__()
        self.token = torch.nn.Parameter(torch.zeros(1, 1, 32))
        self.embed = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32, eps=1e-12)
        self.head = torch.nn.Linear(32, 8)

    def forward(self, x):
        tokens = torch.cat([self.token.expand(x.shape[0], 1, 32), self.embed(x)], 1)
        return self.head(self.norm(tokens)).mean(1)


def test_a_decorrelation_copy_is_planned_and_calibrated_with_its_source():
    """LayerNorm's backward multiplies its normalised value by a sum over the same value; under
    128 features the pass reads the two factors from two packs (a forward ``alias``). Where the
    value is zero, each pack's noise alone moves nothing and both together move the gradient by
    rstd times their product: calibrated one at a time the pair measured ~0 (a tiny Hugging Face
    DeiT: 3e-5 |g|^2 each at 1 bit, 2.3 together) and the plan put both at 1 bit. Now the copy
    takes its source's key, one width, and is rounded with it during calibration."""
    torch.manual_seed(0)
    model, x, loss = _ZeroTokenNorm(), torch.randn(4, 8, 16), projection()
    saved = [v for p in estimate_compiled(model, (x,), Config(bits=2)).plans for v in p.saved]
    copies = [v for v in saved if v.op == "aten.alias.default" and v.module_path == "norm"]
    assert copies and not any(v.site.endswith(":alias") for v in saved)
    site = copies[0].site
    assert [v.name for v in saved if v.site == site and v.op != "aten.alias.default"]  # the source
    predicted = compiled_sensitivities(model, (x,), Config(bits=2), None, loss_fn=loss)[site].at(1)
    packed, _ = as_fx_code(model, Config(bits=8, site_bits={site: 1}))
    params = list(model.parameters())
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(model(x)), params)])
    measured = sum(float((torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(packed(x)), params)])
                          - exact).square().sum()) for _ in range(8)) / 8
    assert predicted > measured / 3


@pytest.mark.slow
def test_a_compile_plan_whose_estimate_fails_says_so(monkeypatch):
    """As the eager plan does (``sensitivity.warn_if_compounding``): the chosen widths are
    measured once on the calibration inputs, and an estimate far below that is named."""
    import actfx.planner.make_compiled as make_compiled

    real = make_compiled.compiled_sensitivities

    def understated(*args, **kwargs):
        return {site: type(s)({b: v * 1e-9 for b, v in s.variance.items()}) for site, s in real(*args, **kwargs).items()}

    monkeypatch.setattr(make_compiled, "compiled_sensitivities", understated)
    torch.manual_seed(0)
    model, x = PlannedCnn(), torch.randn(4, 3, 16, 16)
    uniform = estimate_compiled(model, (x,), Config(bits=2)).bytes_after
    with pytest.warns(UserWarning, match=r"is \d+x what the plan estimated .* lower memory_budget") as caught:
        plan = actfx.plan(model, x, activation_budget=uniform, path="compile", loss_fn=projection())
    assert len([w for w in caught if "plan estimated" in str(w.message)]) == 1  # once, for the chosen widths
    assert plan.activation_bytes <= uniform and plan.gradient_variance > 0  # still a plan, with its estimate


class _Multiplied(torch.nn.Module):
    """Constant multipliers on the embedding, the residual and the logits (Hugging Face Granite)."""

    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.embed, self.norm = torch.nn.Embedding(vocab, d), torch.nn.RMSNorm(d)
        self.up, self.down, self.head = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d), torch.nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids) * 12.0
        x = x + self.down(torch.nn.functional.silu(self.up(self.norm(x)))) * 0.22
        return self.head(x) / 8.0


@pytest.mark.slow
def test_a_compile_plan_holds_under_actfx_compile_what_it_estimated():
    """The plan partitions on meta tensors and actfx.compile on real ones; Inductor's uniform-value
    constant folding runs only where values exist, so a model with constant multipliers partitioned
    two ways (a Hugging Face Granite held 8.7% more than its plan said). Both now run the same
    joint-graph passes."""
    torch.manual_seed(0)
    model, ids = _Multiplied(), torch.randint(0, 64, (4, 32))
    uniform = estimate_compiled(model, (ids,), Config(bits=2)).bytes_after
    plan = actfx.plan(model, ids, activation_budget=uniform, path="compile", loss_fn=projection())
    compiled = actfx.compile(model, plan=plan)
    projection()(compiled(ids)).backward()
    assert compiled._actfx_compiled.bytes_after == plan.activation_bytes <= uniform


def _mlp(depth: int) -> torch.nn.Sequential:
    layers = [torch.nn.Linear(32, 256), torch.nn.GELU()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(256, 256), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(256, 8))


@pytest.mark.slow
def test_a_compile_plan_applied_to_a_deeper_model_says_so(tmp_path):
    """The module paths of a two-layer plan are all in a three-layer model: it was accepted, and
    the extra layer's values took the default width (1.28x the plan's bytes, silently)."""
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    plan = actfx.plan(_mlp(2), x, activation_budget=estimate_compiled(_mlp(2), (x,), Config(bits=2)).bytes_after,
                      path="compile", loss_fn=projection())
    assert plan.ops
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="actfx.compile: this model packs")
        actfx.compile(_mlp(2), plan=plan)(x).sum().backward()
    with pytest.warns(UserWarning, match="packs 2 value\\(s\\) the plan did not see \\(e.g. '4:"):
        plan.save(tmp_path / "plan.json")  # the sites it saw travel with it
        actfx.compile(_mlp(3), plan=actfx.Plan.load(tmp_path / "plan.json"))(x).sum().backward()
