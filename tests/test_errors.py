"""Bad input gets an fxbackmatch error naming the node/module and saying what to do."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxbackmatch
from fxbackmatch.models import lenet_bn


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class Gate(nn.Module):
    """A block with data-dependent control flow, made opaque with leaf_modules."""

    def forward(self, x):
        return x if x.mean() > 0 else x * 0.5


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4, bias=False)
        self.gate = Gate()
        self.fc2 = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.fc2(self.gate(self.fc1(x)))


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cumsum(self.fc(x), 1)


class Alpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.alpha = nn.Parameter(torch.ones(4))

    def forward(self, x):
        # the sine of a parameter (read through a view) gates the features: the sin rule
        # passes the flow but owns no parameter (a parameter expanded over the batch is a
        # learned token, which the expand rule owns; a view of a parameter is the parameter)
        return self.fc(x) * self.alpha.view(1, -1).sin()


def test_untraceable_model_says_use_leaf_modules():
    with pytest.raises(fxbackmatch.TraceError, match="leaf_modules") as e:
        fxbackmatch.prepare(DataDependent(), torch.randn(2, 4), capture="fx")
    assert "DataDependent" in str(e.value)
    assert e.value.__cause__ is not None


def test_leaf_module_with_registered_rule():
    with pytest.raises(fxbackmatch.TraceError):
        fxbackmatch.prepare(WithGate(), torch.randn(2, 4), capture="fx")
    with pytest.raises(fxbackmatch.UnsupportedOpError, match=r"register_rule\(module=Gate\)"):
        fxbackmatch.prepare(WithGate(), torch.randn(2, 4), leaf_modules=[Gate], strict=True)
    reg = fxbackmatch.RuleRegistry()
    for rule in fxbackmatch.REGISTRY:
        reg.register(rule.fn, **{rule.key[0]: rule.key[1]}, transparent=rule.transparent, row_norm=rule.row_norm)

    @reg.register(module=Gate)
    def gate_rule(ctx):
        ctx.pass_to(ctx.inputs[0], ctx.m_out, ctx.frac_out)

    net = WithGate()
    plan = fxbackmatch.prepare(net, torch.randn(2, 4), leaf_modules=["gate"], registry=reg, compile=False,
                               conventions="paper")
    s = plan.scales()
    w2 = net.fc2.weight.detach().double()
    assert s["fc1.weight"] == pytest.approx(1 / float(w2.pow(2).sum() / 4), rel=1e-9)
    with pytest.raises(fxbackmatch.DuplicateRuleError, match="override=True"):
        reg.register(gate_rule, module=Gate)


def test_unknown_op_names_node_and_rule_to_register():
    with pytest.raises(fxbackmatch.UnsupportedOpError) as e:
        fxbackmatch.prepare(Cumsum(), torch.randn(2, 4), strict=True)
    msg = str(e.value)
    assert "cumsum" in msg and "register_rule(function=cumsum)" in msg and "strict=False" in msg


def test_unknown_op_non_strict_measures_its_factor_with_note():
    """strict=False (the default) fills the gap: cumsum over 4 features has the Jacobian of a
    lower-triangular matrix of ones, whose column j holds 4 − j ones — mean diag(JᵀJ) =
    (4+3+2+1)/4 = 2.5, measured on the batch; the head layer's m is that (tests/test_gaps.py
    checks the measurement itself)."""
    net = Cumsum()
    plan = fxbackmatch.prepare(net, torch.randn(64, 4), compile=False, conventions="paper", probes=64)
    assert any("cumsum" in n and "measured" in n for n in plan.notes)
    assert plan.layers[0].m == pytest.approx(2.5, rel=0.05)  # 64 Rademacher probes over 256 entries


def test_wrong_input_shape_names_module():
    with pytest.raises(fxbackmatch.ShapePropagationError, match=r"module '9'|module '0'") as e:
        fxbackmatch.prepare(lenet_bn(), torch.randn(2, 3, 28, 28))
    assert "(2, 3, 28, 28)" in str(e.value) and "example_inputs" in str(e.value)
    with pytest.raises(fxbackmatch.ShapePropagationError, match="Conv2d"):
        fxbackmatch.prepare(lenet_bn(), torch.randn(2, 1, 32, 32))


def test_no_weighted_layer():
    with pytest.raises(fxbackmatch.NoWeightedLayerError, match="register_rule"):
        fxbackmatch.prepare(nn.Sequential(nn.ReLU(), nn.Flatten()), torch.randn(2, 4))


def test_parameter_no_layer_owns():
    with pytest.raises(fxbackmatch.UncoveredParameterError, match="'alpha'") as e:
        fxbackmatch.prepare(Alpha(), torch.randn(2, 4), strict=True)
    assert "view" in str(e.value) and "strict=False" in str(e.value)
    net = Alpha()
    plan = fxbackmatch.prepare(net, torch.randn(2, 4), strict=False, compile=False)
    assert plan.uncovered == ("alpha",)
    assert plan.scales()["alpha"] == 1.0
    net(torch.randn(2, 4)).sum().backward()
    g = net.alpha.grad.clone()
    plan.rescale_grads_()
    assert torch.equal(net.alpha.grad, g)


def test_unused_parameter_is_listed_uncovered():
    class WithExtra(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = lenet_bn()
            self.extra = nn.Linear(3, 3)

        def forward(self, x):
            return self.body(x)

    plan = fxbackmatch.prepare(WithExtra(), torch.randn(2, 3, 32, 32), compile=False)
    assert set(plan.uncovered) == {"extra.weight", "extra.bias"}
    assert "no gradient path" in plan.uncovered_reasons["extra.weight"]


def test_bad_options():
    with pytest.raises(ValueError, match="unknown rule"):
        fxbackmatch.prepare(lenet_bn(), torch.randn(2, 3, 32, 32), rule="adamw")
    with pytest.raises(ValueError, match="adapt"):
        fxbackmatch.prepare(lenet_bn(), torch.randn(2, 3, 32, 32), adapt="some")


def test_replaced_or_resized_parameter_is_detected():
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    net[15].weight = nn.Parameter(torch.randn(10, 84))
    with pytest.raises(fxbackmatch.PlanMismatchError, match="prepare"):
        plan.rescale_grads_()
    net2 = lenet_bn()
    plan2 = fxbackmatch.prepare(net2, torch.randn(2, 3, 32, 32), compile=False)
    net2[15] = nn.Linear(84, 12, bias=False)
    with pytest.raises(fxbackmatch.PlanMismatchError, match="replaced"):
        plan2.scales()


def test_a_failing_rule_is_reported_with_its_node():
    reg = fxbackmatch.RuleRegistry()
    for rule in fxbackmatch.REGISTRY:
        reg.register(rule.fn, **{rule.key[0]: rule.key[1]}, transparent=rule.transparent, row_norm=rule.row_norm)

    @reg.register(module=nn.ReLU, override=True)
    def broken(ctx):
        raise KeyError("oops")

    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(fxbackmatch.RuleError, match=r"rule broken .*ReLU.* failed at node .*KeyError") as e:
        fxbackmatch.prepare(net, torch.randn(2, 3), registry=reg)
    assert "override=True" in str(e.value)
