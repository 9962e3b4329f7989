"""Residual and branching graphs (issue 6), each against a hand computation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch

from oracles import coln, rown


def lin(i, o, bias=False):
    torch.manual_seed(i * 31 + o)
    layer = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(()) * 4 + 0.1)
    return layer


def prep(net, *shape, **kw):
    """The paper's conventions unless a test names others: the hand oracles here derive them."""
    kw.setdefault("conventions", "paper")
    return fxbackmatch.prepare(net, torch.randn(*shape), compile=False, **kw)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = lin(4, 4), lin(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.fc(F.relu(self.fc(x)))))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = lin(4, 4), nn.Linear(4, 4, bias=False), lin(4, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("cls,name", [(Shared, "fc.weight"), (Tied, "a.weight")])
def test_shared_and_tied_weights_accumulate_sharing(cls, name):
    net = cls()
    plan = prep(net, 3, 4)
    s = plan.scales()
    w = net.get_parameter(name)
    m_outer = coln(net.head.weight)
    m_inner = m_outer * coln(w)
    # the outer use reads relu(W x): its input moment E[a²] = ‖W‖²row (ReLU as identity)
    assert s[name] == pytest.approx(1 / (m_outer * rown(w) + m_inner * 1), rel=1e-12)
    assert len([r for r in plan.layers if r.params and r.params[0][0] == name]) == 2
    assert "b.weight" not in s  # tied: one parameter, listed once


class BNAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn, self.head = lin(3, 4), lin(3, 4), nn.BatchNorm1d(4, affine=False), lin(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.a(x) + self.b(x)))


def test_bn_after_addition_adds_the_branch_moments():
    """Var[a + b] = Var[a] + Var[b] (independent summands), each from its weights."""
    net = BNAfterAdd()
    plan = prep(net, 5, 3)
    s = plan.scales()
    m = coln(net.head.weight) / (rown(net.a.weight) + rown(net.b.weight))
    assert s["a.weight"] == pytest.approx(1 / m, rel=1e-12) and s["b.weight"] == s["a.weight"]


class BNOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.head = nn.BatchNorm1d(3, affine=False), lin(3, 2)
        self.a = lin(3, 3)

    def forward(self, x):
        return self.head(self.bn(self.a(x) * 0.5 + x))


def _measured_m_at_a(net: BNOnInput) -> float:
    """mean diag(JᵀJ) of the output with respect to ``a``'s output, by autograd, with the BN
    normalizing by its running statistics (what the rule reads)."""
    twin = copy.deepcopy(net).double().eval()  # the plan keeps reading net's own buffers
    x = torch.randn(3, dtype=torch.float64)
    j = torch.autograd.functional.jacobian(lambda u: twin.head(twin.bn((u * 0.5 + x)[None]))[0],
                                           torch.zeros(3, dtype=torch.float64))
    return float(torch.diagonal(j.T @ j).mean())


def test_bn_with_no_estimate_below_reads_running_var():
    """J = 0.5·W_head·diag(1/σ_c): its mean diag(JᵀJ), measured, is ``m`` at ``a``'s output
    (``mean_c(1/running_var_c)``, not ``1/mean``: Jensen). The head's columns have equal norms,
    so the row-homogeneity approximation is exact and the rule must match to float32 rounding
    of those norms."""
    net = BNOnInput()
    with torch.no_grad():
        w = net.head.weight
        w.mul_(1.7 / w.norm(dim=0, keepdim=True))
        net.bn.running_var.copy_(torch.tensor([1.0, 2.0, 6.0]))
    plan = prep(net, 5, 3)
    assert any("running_var" in n for n in plan.notes)  # the op note reaches the report
    assert "running_var" in str(plan)
    # a reads the input (E[x²] = 1, s = 1): its scale is 1/m
    assert plan.scales()["a.weight"] == pytest.approx(1 / _measured_m_at_a(net), rel=1e-6)
    with torch.no_grad():
        net.bn.running_var.mul_(2)  # the statistic is read every step
    m2 = _measured_m_at_a(net)
    assert plan.scales()["a.weight"] == pytest.approx(1 / m2, rel=1e-6)
    torch.testing.assert_close(plan.scale_tensor()[plan.targets.index("a.weight")].item(), 1 / m2, rtol=1e-6, atol=0)


def test_variance_measured_everywhere_on_lenet():
    from fxbackmatch.models import lenet_bn

    net = lenet_bn()
    with torch.no_grad():
        for i, m in enumerate(x for x in net if isinstance(x, nn.modules.batchnorm._BatchNorm)):
            m.running_var.fill_(float(i + 2))
    s = prep(net, 2, 3, 32, 32, conventions=fxbackmatch.Conventions(variance="measured")).scales()
    fc3, fc2 = net[15].weight, net[12].weight
    # BN4 (before fc3's input relu) has running_var 5: m = ||fc3ᵀ||²/(5 + eps) at fc2's output
    eps = net[13].eps
    assert s["12.weight"] == pytest.approx((5 + eps) / coln(fc3), rel=1e-12)
    assert s["9.weight"] == pytest.approx((5 + eps) * (4 + eps) / (coln(fc3) * coln(fc2)), rel=1e-12)


class Branchy(nn.Module):
    """LeNet-like chain whose forward has data-dependent control flow (not fx-traceable)."""

    def __init__(self):
        super().__init__()
        self.cv1, self.bn1 = nn.Conv2d(3, 6, 5, bias=False), nn.BatchNorm2d(6, affine=False)
        self.pool = nn.MaxPool2d(2)
        self.cv2, self.bn2 = nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16, affine=False)
        self.fc1, self.bn3 = nn.Linear(400, 120, bias=False), nn.BatchNorm1d(120, affine=False)
        self.fc2 = nn.Linear(120, 10, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.mean() > 100:  # data-dependent: symbolic tracing fails here
            x = x / 2
        x = self.pool(self.act(self.bn1(self.cv1(x))))
        x = self.pool(self.act(self.bn2(self.cv2(x))))
        x = self.act(self.bn3(self.fc1(x.flatten(1))))
        return self.fc2(x)


class _Unbranched(nn.Module):
    """``Branchy``'s modules and forward, without the ``if``."""

    def __init__(self, net: Branchy):
        super().__init__()
        for name, child in net.named_children():
            self.add_module(name, child)

    def forward(self, x):
        x = self.pool(self.act(self.bn1(self.cv1(x))))
        x = self.pool(self.act(self.bn2(self.cv2(x))))
        x = self.act(self.bn3(self.fc1(x.flatten(1))))
        return self.fc2(x)


def test_untraceable_model_needs_hook_capture_asked_for():
    """Neither torch.fx nor torch.export captures a data-dependent ``if``: the default refuses
    (the hook fallback assumes a chain — no silent guess), naming ``capture='hooks'``."""
    torch.manual_seed(0)
    net = Branchy()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(fxbackmatch.TraceError, match="capture='hooks'"):
        fxbackmatch.prepare(net, torch.randn(4, 3, 32, 32), compile=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    plan = fxbackmatch.prepare(net, torch.randn(4, 3, 32, 32), compile=False, capture="hooks")
    assert plan.capture == "hooks" and "capture=hooks" in str(plan).splitlines()[0]
    assert any("hooks" in n for n in plan.notes)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    assert [r.s for r in plan.layers] == [196.0, 25.0, 1.0, 1.0]
    # the same function without the data-dependent branch (never taken on this input) traces
    # with torch.fx: the hook capture's chain must give its scales
    traced = fxbackmatch.prepare(_Unbranched(net), torch.randn(4, 3, 32, 32), compile=False, capture="fx")
    assert traced.capture == "fx"
    want = traced.scales()
    assert set(plan.scales()) == set(want)
    for n, v in plan.scales().items():
        assert v == pytest.approx(want[n], rel=1e-12), n
    with pytest.raises(fxbackmatch.TraceError):
        fxbackmatch.prepare(net, torch.randn(4, 3, 32, 32), capture="fx")
