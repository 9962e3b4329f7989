"""The mean-field activation rule (``activations="meanfield"``): ``E[φ'(z)²]`` backwards and
``Var[φ(z)]`` / ``E[φ(z)²]`` forwards under a Gaussian pre-activation, by Gauss–Hermite
quadrature — checked against Monte-Carlo moments, against ``relu="exact"`` (its ReLU case),
and against measured Jacobians (``plan.measure``) on Gaussian and real CIFAR-10 inputs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch import Conventions
from fxbackmatch.analysis.meanfield import gaussian_factors, pointwise_callable

MEANFIELD = Conventions(activations="meanfield", relu="exact")
DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.npz"

FUNCTIONS = {
    "relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "elu": F.elu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
    "hardswish": F.hardswish, "mish": F.mish, "softplus": F.softplus,
}


@pytest.mark.parametrize("var", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_quadrature_matches_monte_carlo_moments(name, var):
    """Within 2 % of the moments of 400,000 Gaussian samples (their own error is ~0.3 %)."""
    fn = FUNCTIONS[name]
    got = gaussian_factors(fn, var)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(400_000, generator=g, dtype=torch.float64) * math.sqrt(var)).requires_grad_(True)
    y = fn(z)
    (dy,) = torch.autograd.grad(y.sum(), z)
    y = y.detach()
    assert got.back == pytest.approx(float(dy.square().mean()), rel=0.02)
    assert got.second == pytest.approx(float(y.square().mean()), rel=0.02)
    assert got.var == pytest.approx(float(y.var()), rel=0.02)


def test_relu_gives_relu_exact_values():
    f = gaussian_factors(torch.relu, 1.0)
    assert f.back == pytest.approx(0.5, abs=1e-12)  # an even rule: no node on the kink
    assert f.second == pytest.approx(0.5, rel=1e-4)
    assert f.var == pytest.approx(0.5 - 1 / (2 * math.pi), rel=1e-3)
    assert gaussian_factors(torch.relu, 9.0).var == pytest.approx(9 * (0.5 - 1 / (2 * math.pi)), rel=1e-3)


def test_pointwise_callable_accepts_elementwise_ops_only():
    import torch.fx as fx

    class M(nn.Module):
        def forward(self, x):
            a = torch.special.erf(x)
            b = torch.cumsum(x, -1)
            c = x.softmax(-1)
            d = F.leaky_relu(x, 0.3)
            return a + b + c + d

    gm = fx.symbolic_trace(M())
    nodes = {n.name: n for n in gm.graph.nodes}
    x = nodes["x"]
    erf = pointwise_callable(nodes["special_erf"], gm, x)
    assert erf is not None and torch.allclose(erf(torch.tensor([0.5])), torch.special.erf(torch.tensor([0.5])))
    assert pointwise_callable(nodes["cumsum"], gm, x) is None  # not elementwise
    assert pointwise_callable(nodes["softmax"], gm, x) is None
    leaky = pointwise_callable(nodes["leaky_relu"], gm, x)
    assert leaky(torch.tensor([-1.0])).item() == pytest.approx(-0.3)


class _Chain(nn.Sequential):
    """Linear–BN–φ ×3 then a head: real activations on normalized pre-activations."""

    def __init__(self, act, w=64):
        layers, d = [], 48
        for _ in range(3):
            layers += [nn.Linear(d, w, bias=False), nn.BatchNorm1d(w, affine=False), act()]
            d = w
        super().__init__(*layers, nn.Linear(w, 16, bias=False))


def _ratios(make, x, conventions, probes=64):
    logs: dict[str, list[float]] = {}
    for d in range(2):
        torch.manual_seed(100 + d)
        net = make()
        plan = fxbackmatch.prepare(net, x, compile=False, conventions=conventions)
        for row in plan.measure(x, probes=probes, seed=d):
            if row["measured_m"] and row["rule_m"]:
                logs.setdefault(row["layer"], []).append(math.log(row["ratio"]))
    return {k: math.exp(sum(v) / len(v)) for k, v in logs.items()}


@pytest.mark.parametrize("act", [nn.GELU] + [pytest.param(a, marks=pytest.mark.slow) for a in (nn.ReLU, nn.SiLU, nn.Tanh, nn.ELU)],
                         ids=lambda a: a.__name__)
def test_meanfield_chain_matches_measured_jacobians(act):
    """Rule m / measured m within 15 % at every layer (three stacked activations; the worst,
    SiLU and ELU at the lowest layer, measure 0.89); the paper's identity is further off."""
    torch.manual_seed(0)
    x = torch.randn(128, 48)
    got = _ratios(lambda: _Chain(act), x, MEANFIELD)
    assert len(got) == 4
    bad = {k: round(v, 3) for k, v in got.items() if abs(math.log(v)) > math.log(1.15)}
    assert not bad, bad
    paper = _ratios(lambda: _Chain(act), x, "paper")
    assert max(abs(math.log(v)) for v in paper.values()) > max(abs(math.log(v)) for v in got.values())


def test_relu_meanfield_equals_relu_exact_on_a_bn_chain():
    torch.manual_seed(0)
    net, x = _Chain(nn.ReLU), torch.randn(8, 48)
    a = fxbackmatch.prepare(net, x, compile=False, conventions=MEANFIELD).scale_tensor()
    b = fxbackmatch.prepare(net, x, compile=False, conventions=Conventions(relu="exact")).scale_tensor()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=0)


@pytest.mark.slow
@pytest.mark.skipif(not DATA.exists(), reason="the shared CIFAR-10 pack is not beside the repository")
def test_meanfield_on_real_cifar_batches_against_plan_measure():
    """A conv–BN net with GELU and SiLU on 128 real CIFAR-10 images against ``plan.measure``.
    Real images are spatially correlated, which the conv rules' independent-position
    approximation misses whatever the activation (with identity activations the rule's m is
    0.26 / 0.53 / 0.76 of the measured one at the three convs); so the activation's own factor
    is judged against that baseline: mean-field is within 30 % of it at every conv and closer
    than the paper's identity overall (measured: 1.25 / 1.28 / 1.16 against 1.72 / 0.80 / 0.80);
    on Gaussian inputs, where the conv rules are exact, it is within 12 %."""
    from fxbackmatch.train.data import load_npz

    data = load_npz(DATA, subset=200)
    x = data.normalize(data.train_x[:128])

    def make(a1=nn.GELU, a2=nn.SiLU):
        return lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, affine=False), a1(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, affine=False), a2(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, affine=False), a1(),
            nn.Flatten(), nn.Linear(16 * 32 * 32, 10, bias=False))

    base = _ratios(make(nn.Identity, nn.Identity), x, "paper", probes=32)
    got = {k: v / base[k] for k, v in _ratios(make(), x, MEANFIELD, probes=32).items()}
    paper = {k: v / base[k] for k, v in _ratios(make(), x, "paper", probes=32).items()}
    assert len(got) == 4
    bad = {k: round(v, 3) for k, v in got.items() if abs(math.log(v)) > math.log(1.3)}
    assert not bad, bad
    assert sum(abs(math.log(v)) for v in got.values()) < sum(abs(math.log(v)) for v in paper.values())
    gauss = _ratios(make(), torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0)), MEANFIELD, probes=32)
    assert all(abs(math.log(v)) < math.log(1.12) for v in gauss.values()), gauss


def test_dropout_in_training_counts_one_over_keep_both_ways():
    """``J = diag(mask/q)``: ``m ← m/q`` below and ``E[y²] = E[x²]/q`` above (exact), against
    the same net with the dropout removed; in eval mode, and in the paper's set, the identity."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3, bias=False))
    drop = nn.Sequential(base[0], base[1], nn.Dropout(0.2), base[2])
    x = torch.randn(4, 6)
    conv = Conventions(activations="meanfield")
    s0 = fxbackmatch.prepare(base, x, compile=False, conventions=conv).scales()
    s1 = fxbackmatch.prepare(drop, x, compile=False, conventions=conv).scales()
    assert s1["0.weight"] == pytest.approx(s0["0.weight"] * 0.8, rel=1e-12)  # m/q below
    assert s1["3.weight"] == pytest.approx(s0["2.weight"] * 0.8, rel=1e-12)  # E[a²]/q above
    drop.eval()
    s2 = fxbackmatch.prepare(drop, x, compile=False, conventions=conv).scales()
    assert s2["0.weight"] == pytest.approx(s0["0.weight"], rel=1e-12)
