"""Residual and branching graphs (issue 6), each against a hand computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch

from oracles import coln, rown


def hm(*ms: float) -> float:
    """The fork rule: Σ√m_i / Σ 1/√m_i (BP amplitudes ∝ √m_i); for two, the geometric mean."""
    return sum(m**0.5 for m in ms) / sum(m**-0.5 for m in ms)


def lin(i, o, bias=False):
    torch.manual_seed(i * 31 + o)
    layer = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(()) * 4 + 0.1)
    return layer


def prep(net, *shape, **kw):
    return fxbackmatch.prepare(net, torch.randn(*shape), compile=False, **kw)


class Fork(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.bn, self.fc1, self.fc2 = lin(5, 6), nn.BatchNorm1d(6, affine=False), lin(6, 3), lin(6, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.fc0(x)))
        return self.fc1(h), self.fc2(h)  # two outputs, m = 1 at each


def test_fork_rule_for_two_is_geometric_mean():
    assert hm(4.0, 9.0) == pytest.approx(6.0)
    assert hm(2.0, 2.0, 2.0) == pytest.approx(2.0)


def test_fork_mean_and_several_outputs():
    net = Fork()
    s = prep(net, 4, 5).scales()
    assert s["fc1.weight"] == 1.0 and s["fc2.weight"] == 1.0
    m_h = hm(coln(net.fc1.weight), coln(net.fc2.weight))
    assert s["fc0.weight"] == pytest.approx(rown(net.fc0.weight) / m_h, rel=1e-12)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.bn0 = lin(5, 6), nn.BatchNorm1d(6, affine=False)
        self.fc1, self.bn1 = lin(6, 6), nn.BatchNorm1d(6, affine=False)
        self.head = lin(6, 3)

    def forward(self, x):
        h = F.relu(self.bn0(self.fc0(x)))
        y = h + F.relu(self.bn1(self.fc1(h)))
        y += 0  # in-place variant
        return self.head(y)


def test_residual_addition():
    net = Residual()
    s = prep(net, 4, 5).scales()
    m_y = coln(net.head.weight)
    assert s["head.weight"] == 1.0
    assert s["fc1.weight"] == pytest.approx(rown(net.fc1.weight) / m_y, rel=1e-12)
    m_h = hm(m_y, m_y / rown(net.fc1.weight) * coln(net.fc1.weight))
    assert s["fc0.weight"] == pytest.approx(rown(net.fc0.weight) / m_h, rel=1e-12)


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
    assert s[name] == pytest.approx(1 / (m_outer * 1 + m_inner * 1), rel=1e-12)
    assert len([r for r in plan.layers if r.params and r.params[0][0] == name]) == 2
    assert "b.weight" not in s  # tied: one parameter, listed once


class CatChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = lin(3, 4), lin(3, 2), lin(6, 6)
        self.out1, self.out2 = lin(3, 2), lin(3, 5)

    def forward(self, x):
        h = torch.cat([self.fc1(x), self.fc2(x)], dim=1)
        a, b = self.fc3(h).chunk(2, dim=1)
        return self.out1(a), self.out2(b)


def test_cat_and_chunk_keep_factors():
    net = CatChunk()
    s = prep(net, 4, 3).scales()
    m3 = hm(coln(net.out1.weight), coln(net.out2.weight))  # slices of one tensor
    assert s["fc3.weight"] == pytest.approx(1 / m3, rel=1e-12)
    m_h = m3 * coln(net.fc3.weight)
    assert s["fc1.weight"] == pytest.approx(1 / m_h, rel=1e-12)
    assert s["fc2.weight"] == pytest.approx(1 / m_h, rel=1e-12)


class ConstGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.gate = lin(4, 6), lin(6, 2), lin(6, 6)

    def forward(self, x):
        h = 2.0 * self.fc0(x)
        h = h / 4
        g = torch.sigmoid(self.gate(h.mean(dim=0, keepdim=True)))
        return self.fc1(h * g)


def test_constant_scaling_and_gates():
    net = ConstGate()
    plan = prep(net, 4, 4)
    s = plan.scales()
    m_hg = coln(net.fc1.weight)  # product h*g: both operands keep m
    assert s["fc1.weight"] == 1.0
    # the gate's input is a mean over the batch: 1 of 4 rows carries gradient per position
    assert plan.layers[1].s == pytest.approx(1.0)
    m_h = hm(m_hg, m_hg * coln(net.gate.weight))
    # h/4 multiplies m by (1/4)², 2·fc0 by 2²: m at fc0's output is m_h/4
    assert s["fc0.weight"] == pytest.approx(1 / (m_h / 4), rel=1e-12)


class BNAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn, self.head = lin(3, 4), lin(3, 4), nn.BatchNorm1d(4, affine=False), lin(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.a(x) + self.b(x)))


def test_bn_after_addition_uses_measured_variance():
    net = BNAfterAdd()
    with torch.no_grad():
        net.bn.running_var.copy_(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    plan = prep(net, 5, 3)
    s = plan.scales()
    m = coln(net.head.weight) / 3.0
    assert s["a.weight"] == pytest.approx(1 / m, rel=1e-12) and s["b.weight"] == s["a.weight"]
    with torch.no_grad():
        net.bn.running_var.mul_(2)  # the statistic is read every step
    assert plan.scales()["a.weight"] == pytest.approx(2 / m, rel=1e-12)
    torch.testing.assert_close(plan.scale_tensor()[plan.targets.index("a.weight")].item(), 2 / m, rtol=1e-9, atol=0)


def test_variance_measured_everywhere_on_lenet():
    from fxbackmatch.models import lenet_bn

    net = lenet_bn()
    with torch.no_grad():
        for i, m in enumerate(x for x in net if isinstance(x, nn.modules.batchnorm._BatchNorm)):
            m.running_var.fill_(float(i + 2))
    s = prep(net, 2, 3, 32, 32, variance="measured").scales()
    fc3, fc2 = net[15].weight, net[12].weight
    # BN4 (before fc3's input relu) has running_var 5: m = ||fc3ᵀ||²/5 at fc2's output
    assert s["12.weight"] == pytest.approx(5 / coln(fc3), rel=1e-12)
    assert s["9.weight"] == pytest.approx(5 * 4 / (coln(fc3) * coln(fc2)), rel=1e-12)


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = lin(4, 6), lin(6, 2)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.beta = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return self.head(self.fc(x) * self.gamma + self.beta)


def test_parameter_scale_and_offset_are_layers():
    net = LayerScale()
    plan = prep(net, 3, 4)
    s = plan.scales()
    m = coln(net.head.weight)
    assert plan.roles["gamma"] == "norm_scale" and plan.roles["beta"] == "bias"
    assert s["beta"] == pytest.approx(1 / m, rel=1e-12) and s["gamma"] == pytest.approx(1 / m, rel=1e-12)
    g2 = float(net.gamma.detach().double().pow(2).mean())
    assert s["fc.weight"] == pytest.approx(1 / (m * g2), rel=1e-12)
    assert plan.uncovered == ()


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


def test_untraceable_model_falls_back_to_hook_capture():
    torch.manual_seed(0)
    net = Branchy()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plan = fxbackmatch.prepare(net, torch.randn(4, 3, 32, 32), compile=False)
    assert plan.capture == "hooks" and "capture=hooks" in str(plan).splitlines()[0]
    assert any("hooks" in n for n in plan.notes)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    assert [r.s for r in plan.layers] == [196.0, 25.0, 1.0, 1.0]
    s = plan.scales()
    m_fc1 = coln(net.fc2.weight) / rown(net.fc1.weight)
    assert s["fc1.weight"] == pytest.approx(1 / m_fc1, rel=1e-12)
    m_cv2 = m_fc1 * coln(net.fc1.weight) / rown(net.cv2.weight)
    assert s["cv2.weight"] == pytest.approx(1 / (25 * m_cv2), rel=1e-12)
    m_cv1 = m_cv2 * coln(net.cv2.weight) / (196 / 25) / rown(net.cv1.weight)
    assert s["cv1.weight"] == pytest.approx(1 / (196 * m_cv1), rel=1e-12)
    with pytest.raises(fxbackmatch.TraceError):
        fxbackmatch.prepare(net, torch.randn(4, 3, 32, 32), capture="fx")
