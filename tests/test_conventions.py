"""``fxbackmatch.Conventions``: the approximation switches as one frozen value.

``prepare(model, x, conventions="paper")`` is today's default bit for bit (scripts outside the
repo rely on the name); the old keywords (``relu="exact"``, ...) still work, warn, and give
what the Conventions form gives. The rest of the suite runs with the deprecation an error
(pyproject's ``filterwarnings``), so the library itself never passes the old keywords."""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch import Conventions
from fxbackmatch.analysis.conventions import CONVENTIONS, DEFAULT, FIELDS, LEGACY_FIELDS
from fxbackmatch.models import lenet_bn, resnet18_paper


def _resnet():
    return resnet18_paper(width=0.125)


@pytest.mark.parametrize("build, shape", [(lenet_bn, (2, 3, 32, 32)), (_resnet, (2, 3, 32, 32))],
                         ids=["lenet_bn", "resnet"])
def test_paper_is_conventions_at_their_zero_and_the_default_differs(build, shape):
    """``"paper"`` is ``Conventions()`` bit for bit (the closed-form tests of the paper's nets,
    tests/test_oracle.py, pin its values); the default is another set."""
    torch.manual_seed(0)
    net, x = build(), torch.randn(shape)
    zero = fxbackmatch.prepare(net, x, compile=False, conventions=Conventions())
    paper = fxbackmatch.prepare(net, x, compile=False, conventions="paper")
    default = fxbackmatch.prepare(net, x, compile=False)
    assert paper.code == zero.code
    assert torch.equal(paper.scale_tensor(), zero.scale_tensor())
    assert paper.targets == zero.targets == default.targets
    assert paper.conventions == zero.conventions == Conventions() == CONVENTIONS["paper"]
    assert paper.state_dict() == zero.state_dict()
    assert default.conventions == DEFAULT and default.code != paper.code


class _Net(nn.Module):
    """Small enough to prepare fast, with something for every convention to change: a BN with
    γ ≠ 1 and running variances ≠ 1, ReLUs after it, 3×3 kernels on 2×2 maps (padding), a conv
    with no norm above, an average pool, a linear wider than the batch's rows."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            self.bn.weight.uniform_(0.2, 0.6)
            self.bn.running_var.uniform_(2.0, 5.0)
            self.bn3.weight.uniform_(0.2, 0.6)
            self.bn3.running_var.uniform_(2.0, 5.0)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))  # no norm above c2
        h = torch.relu(self.bn3(self.c3(h)))
        h = self.pool(h)  # 4×4 → 2×2
        return self.fc(h.flatten(1))


#: a non-default valid value per field
CHANGES = {"gamma": "exact", "relu": "exact", "taps": "valid", "span": "batch", "moments": "batch",
           "unnormalized": "virtual", "variance": "measured", "cap": 1.5, "activations": "meanfield", "floor": "init"}


def _prepare(**kw):
    torch.manual_seed(0)
    net = _Net()
    torch.manual_seed(1)
    return fxbackmatch.prepare(net, torch.randn(2, 3, 4, 4), compile=False, **kw)


def test_every_field_has_a_change():
    assert set(CHANGES) == set(FIELDS) == {"gamma", "relu", "taps", "span", "moments", "unnormalized",
                                            "variance", "cap", "activations", "floor"}
    assert set(LEGACY_FIELDS) < set(FIELDS)


@pytest.mark.parametrize("key", sorted(LEGACY_FIELDS))
def test_a_legacy_keyword_warns_and_gives_the_conventions_form(key):
    value = CHANGES[key]
    with pytest.warns(DeprecationWarning, match=key) as record:
        legacy = _prepare(conventions="paper", **{key: value})
    assert all(w.filename == __file__ for w in record if issubclass(w.category, DeprecationWarning))
    assert "Conventions" in str(record[0].message)
    new = _prepare(conventions=Conventions(**{key: value}))
    chained = _prepare(conventions=Conventions.named("paper").replace(**{key: value}))
    paper = _prepare(conventions="paper")
    assert legacy.conventions == new.conventions == chained.conventions == Conventions(**{key: value})
    assert getattr(legacy, key) == getattr(new, key) == value  # the plan's attributes stay
    assert torch.equal(legacy.scale_tensor(), new.scale_tensor())
    assert torch.equal(chained.scale_tensor(), new.scale_tensor())
    assert legacy.code == new.code
    assert legacy.scales() == new.scales()
    # the change matters on this net
    assert not torch.equal(new.scale_tensor(), paper.scale_tensor())


def test_legacy_keywords_merge_over_the_chosen_conventions():
    with pytest.warns(DeprecationWarning, match="relu"):
        plan = _prepare(conventions=Conventions(taps="valid"), relu="exact")
    assert plan.conventions == Conventions(taps="valid", relu="exact")
    with pytest.warns(DeprecationWarning, match="gamma"):
        plan = _prepare(gamma="exact")  # no conventions=: over the default
    assert plan.conventions == DEFAULT.replace(gamma="exact")
    with pytest.raises(TypeError, match="unexpected keyword argument 'floor'"):
        _prepare(floor="init")  # fields added after 0.2 are never keywords


@pytest.mark.parametrize("key", ["activations", "floor"])
def test_new_fields_change_the_scales(key):
    assert not torch.equal(_prepare(conventions=Conventions(**{key: CHANGES[key]})).scale_tensor(),
                           _prepare(conventions="paper").scale_tensor())


def test_meanfield_activations_by_gaussian_integrals():
    """``activations="meanfield"`` after a normalization: the GELU's input is N(0, 1), so the
    head divides by the GELU output's variance ``Var[gelu(z)]`` and the backward factor
    through it is ``E[gelu'(z)²]``: ``scale(W₀) = (ΣW₀²/64) / ((ΣW₃²/64)·E[gelu'(z)²])``.
    The expectations by the trapezoid rule on [−12, 12] (2·10⁵ points), autograd for gelu'."""
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64, requires_grad=True)
    gelu = F.gelu(z)
    slope = torch.autograd.grad(gelu.sum(), z)[0]
    z, gelu = z.detach(), gelu.detach()
    density = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    expect = lambda f: float(torch.trapezoid(f * density, z))  # noqa: E731
    var_gelu = expect(gelu**2) - expect(gelu) ** 2
    slope_sq = expect(slope**2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 64, bias=False), nn.BatchNorm1d(64, affine=False), nn.GELU(),
                        nn.Linear(64, 16, bias=False))
    x = torch.randn(128, 48)  # B·s ≥ every fan-in: no span correction
    got = fxbackmatch.prepare(net, x, compile=False, conventions=Conventions(activations="meanfield")).scales()
    w0, w3 = (float(net[i].weight.detach().double().square().sum()) / 64 for i in (0, 3))
    assert got["3.weight"] == pytest.approx(1 / var_gelu, rel=1e-6)
    assert got["0.weight"] == pytest.approx(w0 / (w3 * slope_sq), rel=1e-6)
    paper = fxbackmatch.prepare(net, x, compile=False, conventions="paper").scales()
    assert paper["0.weight"] == pytest.approx(w0 / w3, rel=1e-9)  # the paper's identity activation


def test_bad_values_raise_clear_errors():
    with pytest.raises(ValueError, match=r"relu must be one of \('paper', 'exact'\), got 'bogus'"):
        Conventions(relu="bogus")
    with pytest.raises(ValueError, match="variance must be one of"):
        Conventions(variance="running")
    with pytest.raises(ValueError, match="moments must be one of"):
        Conventions(moments="measured")  # factors="measured" sets that, not a convention
    for cap in (0.5, 1.0, math.inf, math.nan, "10"):
        with pytest.raises(ValueError, match="cap must be a finite number > 1"):
            Conventions(cap=cap)
    with pytest.raises(ValueError, match="span must be one of"):
        Conventions().replace(span="wide")
    with pytest.raises(TypeError, match="no field 'relux'"):
        Conventions().replace(relux="exact")
    with pytest.raises(ValueError, match=r"unknown conventions 'papr'.*\['default', 'paper'\]"):
        Conventions.named("papr")
    net, x = lenet_bn(), torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"unknown conventions 'exact'.*\['default', 'paper'\]"):
        fxbackmatch.prepare(net, x, conventions="exact")
    with pytest.raises(TypeError, match="conventions must be"):
        fxbackmatch.prepare(net, x, conventions={"relu": "exact"})
    with pytest.raises(TypeError, match=r"^prepare\(\) got an unexpected keyword argument 'reluu'$"):
        fxbackmatch.prepare(net, x, reluu="exact")
    with pytest.warns(DeprecationWarning, match="gamma"), pytest.raises(ValueError, match="gamma must be one of"):
        fxbackmatch.prepare(net, x, gamma="half")


def test_the_signature_is_small_and_has_no_convention_keywords():
    params = inspect.signature(fxbackmatch.prepare).parameters
    assert len(params) <= 18
    assert params["conventions"].default == "default"
    assert params["conventions"].kind is inspect.Parameter.KEYWORD_ONLY
    assert not set(FIELDS) & set(params)
    assert list(params.values())[-1].kind is inspect.Parameter.VAR_KEYWORD


def test_conventions_are_frozen_hashable_and_documented():
    c = Conventions(relu="exact")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.relu = "paper"
    assert hash(c) == hash(Conventions(relu="exact")) and c != Conventions()
    assert {c: 1, Conventions(): 2}[Conventions(relu="exact")] == 1
    assert c.replace(relu="paper") == Conventions() and c.relu == "exact"
    assert Conventions.named("paper") is CONVENTIONS["paper"]
    assert "Conventions" in fxbackmatch.__all__
    assert [f.name for f in dataclasses.fields(Conventions)] == list(FIELDS)
    assert Conventions() == Conventions(gamma="one", relu="paper", taps="all", span="full", moments="derived",
                                        unnormalized="exact", variance="weights", cap=None, activations="paper",
                                        floor="none")
    assert Conventions.named("default") is DEFAULT != Conventions()
