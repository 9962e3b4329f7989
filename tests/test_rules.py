"""Tests parametrized over the rule registry and the rate methods."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.models import lenet_bn
from fxbackmatch.analysis.rules.ops import _ACTIVATION_MODULES, _MAX_POOL_MODULES

RULES = list(fxbackmatch.REGISTRY)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.key[0]}-{getattr(r.key[1], '__name__', r.key[1])}")
def test_every_rule_is_documented(rule):
    assert rule.doc, f"rule {rule.name} has no docstring naming its formula/approximation"


def _activation_instances():
    out = []
    for cls in _ACTIVATION_MODULES:
        if cls in (nn.modules.dropout._DropoutNd,):
            continue
        if cls is nn.Unflatten:
            continue
        kwargs = {"dim": 1} if cls in (nn.Softmax, nn.LogSoftmax) else {}
        if cls.__name__ == "StochasticDepth":
            kwargs = {"p": 0.2, "mode": "row"}
        out.append(cls(**kwargs))
    out += [nn.Dropout(0.5), nn.Dropout1d(0.2)]
    return out


@pytest.mark.parametrize("mod", _activation_instances(), ids=lambda m: type(m).__name__)
def test_transparent_modules_leave_factors_unchanged(mod):
    """Inserting a pointwise op/reshape between BN and the next layer changes no scale."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3, bias=False))
    with_op = nn.Sequential(base[0], base[1], mod, base[2])
    x = torch.randn(4, 6)
    s0 = fxbackmatch.prepare(base, x, compile=False, conventions="paper").scales()
    s1 = fxbackmatch.prepare(with_op, x, compile=False, conventions="paper").scales()
    assert s0["0.weight"] == pytest.approx(s1["0.weight"], rel=1e-12)
    assert s0["2.weight"] == pytest.approx(s1["3.weight"], rel=1e-12)


def _pool_instances():
    out = []
    for cls in _MAX_POOL_MODULES:
        name = cls.__name__
        dims = int(name[-2]) if name[-2].isdigit() else 2
        if "Adaptive" in name:
            out.append((cls(1), dims))
        elif "LP" in name:
            out.append((cls(2, 2), dims))
        else:
            out.append((cls(2), dims))
    return out


@pytest.mark.parametrize("mod,dims", _pool_instances(), ids=lambda m: type(m).__name__ if isinstance(m, nn.Module) else str(m))
def test_pooling_sets_sharing_factor(mod, dims):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](2, 3, 1, bias=False)
    x = torch.randn((2, 2) + (4,) * dims)
    out = nn.Sequential(conv, mod, nn.Flatten())(x)
    net = nn.Sequential(conv, mod, nn.Flatten(), nn.Linear(out.shape[1], 2, bias=False))
    plan = fxbackmatch.prepare(net, x, compile=False)
    pooled = out.shape[1] // 3  # positions after the pool
    assert plan.layers[0].s == pooled
    assert plan.layers[0].c == pytest.approx(4**dims / pooled)


def test_duplicate_registration_raises_and_override():
    with pytest.raises(fxbackmatch.DuplicateRuleError, match="already registered"):
        fxbackmatch.register_rule(lambda ctx: None, module=nn.ReLU)
    reg = fxbackmatch.RuleRegistry()
    reg.register(lambda ctx: None, module=nn.ReLU)
    reg.register(lambda ctx: None, module=nn.ReLU, override=True)
    with pytest.raises(ValueError, match="at least one"):
        reg.register(lambda ctx: None)


def test_registry_lookup_uses_mro():
    """A subclass of a registered module is a leaf with its base's rule. Its forward here is
    one symbolic tracing cannot enter (a branch on the data), so only the MRO lookup lets the
    fx capture succeed; the scales then equal the same net's with the plain ``nn.ReLU``."""

    class MyReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) if bool(x.sum() > -1e9) else x

    def net_with(act):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 3, bias=False), nn.BatchNorm1d(3, affine=False), act,
                             nn.Linear(3, 2, bias=False))

    x = torch.randn(4, 3)
    plan = fxbackmatch.prepare(net_with(MyReLU()), x, compile=False, capture="fx", strict=True)
    ref = fxbackmatch.prepare(net_with(nn.ReLU()), x, compile=False, capture="fx", strict=True)
    assert [n.target for n in plan.graph_module.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3"]
    assert plan.scales() == pytest.approx(ref.scales(), rel=1e-12)


# ----------------------------------------------------------------- rate methods
def _grads(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()


@pytest.mark.parametrize("conventions", ["paper", "default"])
@pytest.mark.parametrize("rule", ["lars", "lsalr", "sgd", "lamb"])
def test_competitor_rules_against_plain_formula(rule, conventions):
    """The competitors are their published formulas under either set of conventions: the
    default's batch span (a correction of back-matching's ``s``) used to divide the linear
    layers' scales by ``n/(B·s)`` here too, so ``rule="sgd"`` was not plain SGD (LeNet's fc1
    at batch 8: 0.02)."""
    torch.manual_seed(0)
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), rule=rule, compile=False, trust_coefficient=2e-3,
                               conventions=conventions)
    _grads(net)
    got = plan.scales()
    for n, p in net.named_parameters():
        w, g = float(p.detach().double().norm()), float(p.grad.double().norm())
        want = {"lars": 2e-3 * w / g, "lsalr": 1 + math.log(1 + 1 / g), "sgd": 1.0, "lamb": w}[rule]
        assert got[n] == pytest.approx(want, rel=1e-9), n
    if rule == "lamb":  # a step length, not a gradient scale: no rescale_grads_
        return
    torch.testing.assert_close(
        plan.scale_tensor(), torch.tensor([got[n] for n in plan.targets], dtype=torch.float64), rtol=1e-9, atol=0
    )
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    plan.rescale_grads_()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, before[n] * got[n], rtol=1e-6, atol=0)


def test_competitor_zero_norm_guards():
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    lars = fxbackmatch.prepare(net, torch.randn(2, 4), rule="lars", compile=False, conventions="paper")
    lsalr = fxbackmatch.prepare(net, torch.randn(2, 4), rule="lsalr", compile=False, conventions="paper")
    with torch.no_grad():
        net[0].weight.zero_()
    net(torch.randn(2, 4)).sum().backward()
    net[2].weight.grad.zero_()  # zero weight for layer 0, zero gradient for layer 2
    s = lars.scales()
    assert s["0.weight"] == 1.0 and s["2.weight"] == 1.0
    assert torch.equal(lars.scale_tensor(), torch.ones(2, dtype=torch.float64))
    s2 = lsalr.scales()
    assert math.isfinite(s2["2.weight"]) and s2["2.weight"] == pytest.approx(1 + math.log1p(1e6), rel=1e-9)
    torch.testing.assert_close(
        lsalr.scale_tensor(), torch.tensor([s2[n] for n in lsalr.targets], dtype=torch.float64), rtol=1e-9, atol=0
    )


def test_group_and_layer_norm_and_conv_transpose():
    from oracles import coln, rown

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False), nn.Flatten(2), nn.LayerNorm(256),
    )
    x = torch.randn(2, 3, 8, 8)
    plan = fxbackmatch.prepare(net, x, compile=False, conventions="paper")
    s = plan.scales()
    ln_g = net[5].weight
    # LayerNorm at the output: m = 1; γ, β shared over the 4 channels; s = 4
    assert s["5.weight"] == pytest.approx(1 / 4) and s["5.bias"] == s["5.weight"]
    # the LN's input comes from the transposed conv: Var ≈ sum(W²)/(out·Π stride)
    wt = net[3].weight
    var_t = float(wt.detach().double().pow(2).sum()) / (4 * 4)
    m_t = float(ln_g.detach().double().pow(2).mean()) / var_t
    assert s["3.weight"] == pytest.approx(1 / (m_t * 64), rel=1e-9)  # s = input locations
    m_gn = m_t * float(wt.detach().double().pow(2).sum()) / 8  # c = 1
    assert s["1.weight"] == pytest.approx(1 / (m_gn * 64), rel=1e-9)
    m_conv = m_gn * float(net[1].weight.detach().double().pow(2).mean()) / rown(net[0].weight)
    assert s["0.weight"] == pytest.approx(1 / (m_conv * 64), rel=1e-9)


def test_a_registered_method_gets_the_batch_corrections_of_s(monkeypatch):
    """A method registered by the user sees ``s`` in its uses, so the batch's corrections of
    ``s`` (the default's ``span="batch"``) multiply its scales as they do back-matching's:
    a copy of back-matching registered under another name gives back-matching's scales at a
    batch of 8, which differ from the batch of 2 it was prepared on."""
    from fxbackmatch.analysis import methods

    monkeypatch.setitem(methods.METHODS, "mine", methods.METHODS["backmatch"])
    monkeypatch.setitem(methods.LENGTH_UNITS, "mine", "gradient")
    torch.manual_seed(0)
    net = lenet_bn()
    x = torch.randn(8, 3, 32, 32)
    mine = fxbackmatch.prepare(net, x[:2], rule="mine", compile=False)
    ref = fxbackmatch.prepare(net, x[:2], rule="backmatch", compile=False)
    before = ref.scales()
    net(x)
    assert mine.scales() == pytest.approx(ref.scales(), rel=1e-12)
    assert ref.scales()["9.weight"] != pytest.approx(before["9.weight"], rel=1e-3)  # the batch moved it
