"""An op with no rule no longer ends the pass: ``strict=False`` (the default) fills the gap —
the mean-field elementwise rule for pointwise ops, the op's own factor measured on the live
batch for anything else (:mod:`fxbackmatch.analysis.gaps`) — and the composition rules
(:mod:`fxbackmatch.analysis.rules.compose`) cover ``addcmul``, ``addcdiv``, ``lerp``,
``F.normalize``, ``torch.where``, ``clamp`` and vector norms. Every factor is checked against
``mean diag(JᵀJ)`` of the op's Jacobian computed independently by autograd."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.analysis.gaps import ELEMENTWISE_NOTE, MEASURED_NOTE
from fxbackmatch.analysis.registry import REGISTRY, RuleRegistry


# ------------------------------------------------------------------------------- helpers
def _registry_without(*targets) -> RuleRegistry:
    """The default rules, less those of ``targets`` (functions): an op with no rule even
    where a later version registers one."""
    reg = RuleRegistry()
    for r in REGISTRY:
        if r.key[0] == "function" and r.key[1] in targets:
            continue
        reg.register(r.fn, **{r.key[0]: r.key[1]}, transparent=r.transparent, row_norm=r.row_norm,
                     channel_dim=r.channel_dim, norm=r.norm, moment=r.moment, layout=r.layout,
                     structural=r.structural, averages=r.averages, sums=r.sums)
    return reg


def _orthogonal(n_in: int, n_out: int) -> nn.Linear:
    """A bias-free linear layer with orthonormal rows: the rules' ``E[y²] = sum(W²)/out·E[x²]``
    is ``E[x²]``, and the batch's mean square is kept exactly (for ``n_out = n_in``)."""
    lin = nn.Linear(n_in, n_out, bias=False)
    q, _ = torch.linalg.qr(torch.randn(n_in, n_in, dtype=torch.float64))
    with torch.no_grad():
        lin.weight.copy_(q[:n_out].float())
    return lin


def _rows_of_norm(b: int, d: int) -> torch.Tensor:
    """Data whose every row has ``‖x‖² = d``: ``E[x²] = 1`` on the batch, exactly."""
    x = torch.randn(b, d, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True) * math.sqrt(d)).float()


def _exact_m(fn, h: torch.Tensor) -> float:
    """``mean diag(JᵀJ)`` of ``fn`` at ``h`` over ``h``'s entries, from the full Jacobian
    (``torch.autograd.functional.jacobian``; small inputs only)."""
    h = h.detach().double()
    jac = torch.autograd.functional.jacobian(lambda t: fn(t), h)
    jac = jac.reshape(-1, h.numel())
    return float(jac.square().sum(0).mean())


def _m(plan, layer: str) -> float:
    return {r.name: r.m for r in plan.layers}[layer]


# ------------------------------------------------------------- the default fills the gaps
class Gappy(nn.Module):
    """(i) an elementwise op with no rule, (ii) an addcmul affine, (iii) a layer scale read
    through ``.view``, (iv) F.normalize, (v) a cumsum."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(8, d)
        self.alpha = nn.Parameter(torch.ones(1, 1, d))
        self.beta = nn.Parameter(torch.zeros(1, 1, d))
        self.gamma = nn.Parameter(torch.full((d,), 0.5))
        self.fc2 = nn.Linear(d, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = torch.special.erf(self.fc1(x))  # (i)
        h = torch.addcmul(self.beta, self.alpha, h)  # (ii) ResMLP's Affine
        h = h * self.gamma.view(1, 1, -1)  # (iii)
        h = F.normalize(self.fc2(h), dim=-1)  # (iv)
        return self.head(torch.cumsum(h, dim=-1))  # (v)


@pytest.mark.parametrize("conventions", ["default", "paper"])
def test_prepare_fills_every_gap_by_default_and_covers_every_parameter(conventions):
    torch.manual_seed(0)
    net, x = Gappy(), torch.randn(4, 6, 8)
    reg = _registry_without(torch.special.erf)
    plan = fxbackmatch.prepare(net, x, compile=False, registry=reg, conventions=conventions)
    assert plan.uncovered == ()
    notes = "\n".join(plan.notes)
    assert "special_erf" in notes and ELEMENTWISE_NOTE in notes
    assert "cumsum" in notes and MEASURED_NOTE in notes
    assert plan.roles["alpha"] == "norm_scale" and plan.roles["beta"] == "bias" and plan.roles["gamma"] == "norm_scale"
    scales = plan.scales()
    assert set(scales) == {n for n, _ in net.named_parameters()}
    # the cumsum's factor is measured, upstream-weighted (measure.local): with g = headᵀv, v
    # Rademacher, Σ_g = WᵀW and the factor is tr(Σ_g·J·Jᵀ)/tr(Σ_g), J the cumsum's triangle
    w = net.head.weight.detach().double()
    tri = torch.tril(torch.ones(16, 16, dtype=torch.float64))
    closed = float(torch.trace(w.T @ w @ tri @ tri.T) / torch.trace(w.T @ w))
    (measured,) = [float(v) for k, v in plan._measured.items() if k.startswith("fxbackmatch.local:cumsum")]
    assert measured == pytest.approx(closed, rel=0.01)  # a probe estimate (seen: 2e-4)
    # oracle: the same net with the default erf rule and a hand-written cumsum rule carrying
    # that factor gives the same scale to every parameter (the gaps change nothing else)
    hand = _registry_without()

    @hand.register(function=torch.cumsum)
    def cumsum_rule(ctx):
        ctx.pass_to(ctx.inputs[0], ctx.m_out * measured, ctx.frac_out)

    expected = fxbackmatch.prepare(net, x, compile=False, registry=hand, conventions=conventions).scales()
    assert expected["fc1.weight"] != pytest.approx(expected["head.weight"], rel=0.1)  # the chain is not flat
    for name, v in expected.items():
        assert scales[name] == pytest.approx(v, rel=1e-9), name
    # a measured atom: refreshed on every batch the plan sees
    plan.refresh(torch.randn(4, 6, 8))
    assert all(math.isfinite(v) and v > 0 for v in plan.scales().values())


def test_strict_refuses_naming_the_node_and_the_rule_to_register():
    torch.manual_seed(0)
    reg = _registry_without(torch.special.erf)
    with pytest.raises(fxbackmatch.UnsupportedOpError) as e:
        fxbackmatch.prepare(Gappy(), torch.randn(4, 6, 8), registry=reg, strict=True)
    msg = str(e.value)
    assert "%cumsum" in msg and "register_rule(function=cumsum)" in msg and "strict=False" in msg

    class Erf(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.special.erf(self.fc(x))

    with pytest.raises(fxbackmatch.UnsupportedOpError) as e:
        fxbackmatch.prepare(Erf(), torch.randn(2, 4), registry=reg, strict=True)
    assert "%special_erf" in str(e.value) and "register_rule(function=special_erf)" in str(e.value)


# -------------------------------------------------------------- a parameter through a view
class LayerScale2d(nn.Module):
    """timm's LayerScale2d: ``x * gamma.view(1, -1, 1, 1)`` (or in place)."""

    def __init__(self, c: int, inplace: bool = False, flat: bool = False):
        super().__init__()
        self.inplace, self.flat = inplace, flat
        self.gamma = nn.Parameter(0.1 * torch.ones((1, c, 1, 1) if flat else (c,)))

    def forward(self, x):
        g = self.gamma if self.flat else self.gamma.view(1, -1, 1, 1)
        return x.mul_(g) if self.inplace else x * g


@pytest.mark.parametrize("inplace", [False, True])
def test_a_layer_scale_read_through_view_is_that_parameter(inplace):
    """Strict mode prepares (no UncoveredParameterError): γ is a layer scale, with the same
    scales as γ stored in the broadcast shape itself."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), LayerScale2d(8, inplace), nn.Conv2d(8, 4, 1))
    flat = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), LayerScale2d(8, flat=True), nn.Conv2d(8, 4, 1))
    flat.load_state_dict({k: v.reshape(flat.state_dict()[k].shape) for k, v in net.state_dict().items()})
    x = torch.randn(2, 3, 8, 8)
    plan = fxbackmatch.prepare(net, x, compile=False, strict=True, conventions="paper")
    ref = fxbackmatch.prepare(flat, x, compile=False, strict=True, conventions="paper")
    assert plan.uncovered == () and plan.roles["1.gamma"] == "norm_scale"
    got, want = plan.scales(), ref.scales()
    assert all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want)


# ------------------------------------------------------------------ elementwise, no rule
class Elementwise(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.fc = _orthogonal(d, d)

    def forward(self, x):
        return torch.special.erf(self.fc(x))


def test_an_unknown_elementwise_op_gets_the_mean_field_factor():
    """``erf'(z)² = (4/π)·e^{−2z²}``, so under ``z ~ N(0, 1)`` (an orthonormal layer of
    unit data) ``E[erf'(z)²] = (4/π)/√5``; the Jacobian of erf on a Gaussian batch has that mean
    diagonal (1024 entries: ~1 % sampling error). Under the paper's conventions an activation is
    the identity."""
    torch.manual_seed(0)
    net, x = Elementwise(), torch.randn(64, 16)
    reg = _registry_without(torch.special.erf)
    plan = fxbackmatch.prepare(net, x, compile=False, registry=reg)
    closed = 4 / math.pi / math.sqrt(5)
    assert _m(plan, "fc") == pytest.approx(closed, rel=1e-6)
    assert _m(plan, "fc") == pytest.approx(_exact_m(torch.special.erf, net.fc(x)), rel=0.05)
    paper = fxbackmatch.prepare(net, x, compile=False, registry=reg, conventions="paper")
    assert _m(paper, "fc") == 1.0
    assert any(ELEMENTWISE_NOTE in n for n in plan.notes)


class Center(nn.Module):
    """``x − mean(x)``: commutes with reversing its input, yet is no elementwise op."""

    def forward(self, x):
        return x - x.mean(-1, keepdim=True)


def test_a_permutation_equivariant_op_is_measured_not_taken_for_elementwise():
    """``J = I − 11ᵀ/d`` is a projector: ``mean diag(JᵀJ) = 1 − 1/d``. (Its ``Σφ`` has slope 0,
    which the mean-field rule would have returned.) Measured with 256 probes on 32×16 entries."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16, bias=False), Center())
    x = torch.randn(32, 8)
    # capture="fx" keeps the leaf opaque (auto would let torch.export see into it)
    plan = fxbackmatch.prepare(net, x, compile=False, leaf_modules=[Center], conventions="paper", probes=256,
                               capture="fx")
    assert any("'1'" in n and MEASURED_NOTE in n for n in plan.notes)
    assert _m(plan, "0") == pytest.approx(1 - 1 / 16, rel=0.05)
    assert _exact_m(lambda t: t - t.mean(-1, keepdim=True), net[0](x)) == pytest.approx(1 - 1 / 16, rel=1e-9)


# ----------------------------------------------------------------------------- addcmul
class Affine(nn.Module):
    """ResMLP's Affine, fused (``torch.addcmul``) or written out."""

    def __init__(self, d: int, fused: bool, value: float = 1.0):
        super().__init__()
        self.fused, self.value = fused, value
        self.alpha = nn.Parameter(1 + 0.3 * torch.randn(1, 1, d))
        self.beta = nn.Parameter(0.1 * torch.randn(1, 1, d))

    def forward(self, x):
        if self.fused:
            return torch.addcmul(self.beta, self.alpha, x, value=self.value)
        return self.beta + self.alpha * x


@pytest.mark.parametrize("gamma", ["one", "exact"])
def test_addcmul_affine_is_the_sum_and_product_written_out(gamma):
    torch.manual_seed(0)
    conv = fxbackmatch.Conventions(gamma=gamma)
    fused = nn.Sequential(nn.Linear(8, 16), Affine(16, True), nn.Linear(16, 4))
    plain = nn.Sequential(nn.Linear(8, 16), Affine(16, False), nn.Linear(16, 4))
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 8)
    got = fxbackmatch.prepare(fused, x, compile=False, strict=True, conventions=conv).scales()
    want = fxbackmatch.prepare(plain, x, compile=False, strict=True, conventions=conv).scales()
    # the head's weight divides by E[a²] of its input, which the addcmul rule estimates
    # (mean(β²) + mean(α²)·E[x²]) and the written-out sum with a parameter does not (1)
    assert {k: v for k, v in got.items() if k != "2.weight"} == pytest.approx(
        {k: v for k, v in want.items() if k != "2.weight"}, rel=1e-12)
    # that estimate by hand (a bias-free first layer: E[x²] = ΣW₁²/16 under a unit input moment;
    # s = 5 positions; the head's m = 1): a rule squaring mean(α), dropping mean(β²) or
    # ignoring gamma would miss it
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16, bias=False), Affine(16, True), nn.Linear(16, 4))
    head = fxbackmatch.prepare(net, x, compile=False, strict=True, conventions=conv).scales()["2.weight"]
    alpha, beta = net[1].alpha.detach().double(), net[1].beta.detach().double()
    e_x2 = float(net[0].weight.detach().double().square().sum()) / 16
    mean_a2 = float(alpha.square().mean()) if gamma == "exact" else 1.0
    assert head == pytest.approx(1 / (5 * (float(beta.square().mean()) + mean_a2 * e_x2)), rel=1e-12)


def test_addcmul_factors_equal_the_jacobians():
    """``y = β + v·α⊙h``: ``J_h = v·diag(α)``, ``mean diag = v²·mean(α²)`` (``gamma="exact"``);
    ``y = c + v·a⊙b`` with ``a, b, c`` orthonormal maps of rows of norm √d: ``J_a = v·diag(b)``,
    whose mean diagonal ``v²·mean(b²) = v²`` is what the rule derives (``E[b²] = 1``), exactly."""
    torch.manual_seed(0)
    v = 0.5
    net = nn.Sequential(nn.Linear(8, 16, bias=False), Affine(16, True, value=v))
    x = torch.randn(3, 8)
    plan = fxbackmatch.prepare(net, x, compile=False, strict=True, conventions=fxbackmatch.Conventions(gamma="exact"))
    alpha, beta = net[1].alpha.detach(), net[1].beta.detach()
    exact = _exact_m(lambda h: torch.addcmul(beta.double(), alpha.double(), h, value=v), net[0](x))
    assert _m(plan, "0") == pytest.approx(exact, rel=1e-6)
    assert exact == pytest.approx(v * v * float(alpha.double().square().mean()), rel=1e-9)

    class Gated(nn.Module):
        def __init__(self, d=12):
            super().__init__()
            self.a, self.b, self.c = _orthogonal(d, d), _orthogonal(d, d), _orthogonal(d, d)

        def forward(self, x):
            return torch.addcmul(self.c(x), self.a(x), self.b(x), value=v)

    g, x = Gated(), _rows_of_norm(10, 12)
    plan = fxbackmatch.prepare(g, x, compile=False, strict=True, conventions="paper")
    b = g.b(x).detach().double()
    exact_a = _exact_m(lambda a: torch.addcmul(g.c(x).detach().double(), a, b, value=v), g.a(x))
    assert _m(plan, "a") == pytest.approx(exact_a, rel=1e-5) and exact_a == pytest.approx(v * v, rel=1e-5)
    assert _m(plan, "c") == 1.0


# --------------------------------------------------------------------------- normalize
class Normalized(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = _orthogonal(d, d)

    def forward(self, x):
        return F.normalize(self.fc(x), dim=-1)


def test_normalize_factor_is_d_minus_1_over_d_squared_e_x2():
    """Per vector ``mean diag(JᵀJ) = (d−1)/(d·‖x‖²)`` (the projector ``(I − x̂x̂ᵀ)/‖x‖²``):
    exact against the Jacobian. With every ``‖x‖² = d·E[x²]`` the rule's
    ``(d−1)/(d²·E[x²])`` is exact; on Gaussian rows it is below the mean of ``1/‖x‖²`` by
    the documented ``(d−2)/d`` (``E[1/χ²_d] = 1/(d−2)``)."""
    torch.manual_seed(0)
    d = 8
    h = torch.randn(5, d)
    per_vector = float(((d - 1) / (d * h.double().square().sum(1))).mean())
    assert _exact_m(lambda t: F.normalize(t, dim=-1), h) == pytest.approx(per_vector, rel=1e-9)

    net, x = Normalized(d), _rows_of_norm(6, d)
    plan = fxbackmatch.prepare(net, x, compile=False, strict=True, conventions="paper")
    assert _m(plan, "fc") == pytest.approx((d - 1) / d**2, rel=1e-6)  # the float32 weights: sum(W²) = d
    assert _exact_m(lambda t: F.normalize(t, dim=-1), net.fc(x)) == pytest.approx((d - 1) / d**2, rel=1e-5)

    d = 64
    net, x = Normalized(d), torch.randn(2048, d)
    plan = fxbackmatch.prepare(net, x, compile=False, strict=True, conventions="paper")
    batch = float(((d - 1) / (d * net.fc(x).detach().double().square().sum(1))).mean())
    assert _m(plan, "fc") == pytest.approx(batch * (d - 2) / d, rel=0.02)


# ------------------------------------------------------- where, lerp, addcdiv, clamp, norms
class Binary(nn.Module):
    """``op(a(x), b(x), x)`` with two orthonormal layers; the op's output is the loss output."""

    def __init__(self, op, d: int = 6):
        super().__init__()
        self.op, self.a, self.b = op, _orthogonal(d, d), _orthogonal(d, d)

    def forward(self, x):
        return self.op(self.a(x), self.b(x), x)


#: (name, op, layer, the op as a function of that layer's output, strict): where a factor
#: is measured the Jacobian is diagonal (or one output per entry), so that Rademacher probes
#: give it exactly
CASES = [
    ("where", lambda a, b, x: torch.where(x > 0.3, a, b), "a", lambda a, b, x: torch.where(x > 0.3, a, b), True),
    ("where other", lambda a, b, x: torch.where(x > 0.3, a, b), "b", lambda b, a, x: torch.where(x > 0.3, a, b), True),
    ("where method", lambda a, b, x: a.where(x > 0.3, b), "a", lambda a, b, x: torch.where(x > 0.3, a, b), True),
    ("lerp number", lambda a, b, x: torch.lerp(a, b, 0.3), "a", lambda a, b, x: torch.lerp(a, b, 0.3), True),
    ("lerp end", lambda a, b, x: a.lerp(b, 0.3), "b", lambda b, a, x: torch.lerp(a, b, 0.3), True),
    ("lerp tensor", lambda a, b, x: torch.lerp(a, b, torch.sigmoid(x)), "a",
     lambda a, b, x: torch.lerp(a, b, torch.sigmoid(x)), True),
    ("addcdiv", lambda a, b, x: torch.addcdiv(x, a, b.abs() + 1, value=0.7), "a",
     lambda a, b, x: torch.addcdiv(x, a, b.abs() + 1, value=0.7), False),
    ("norm 2", lambda a, b, x: torch.norm(a, dim=-1), "a", lambda a, b, x: torch.norm(a, dim=-1), True),
    ("norm method", lambda a, b, x: a.norm(p=2, dim=-1, keepdim=True), "a",
     lambda a, b, x: a.norm(p=2, dim=-1, keepdim=True), True),
    ("vector_norm 1", lambda a, b, x: torch.linalg.vector_norm(a, 1, dim=-1), "a",
     lambda a, b, x: torch.linalg.vector_norm(a, 1, dim=-1), True),
    ("vector_norm 3", lambda a, b, x: torch.linalg.vector_norm(a, 3, dim=-1), "a",
     lambda a, b, x: torch.linalg.vector_norm(a, 3, dim=-1), True),
    ("clamp, tensor bound", lambda a, b, x: torch.clamp(a, min=b), "a", lambda a, b, x: torch.clamp(a, min=b), True),
]


@pytest.mark.parametrize("name,op,layer,as_fn,strict", CASES, ids=[c[0] for c in CASES])
def test_composition_factors_equal_the_jacobians(name, op, layer, as_fn, strict):
    torch.manual_seed(0)
    net, x = Binary(op), torch.randn(7, 6)
    plan = fxbackmatch.prepare(net, x, compile=False, strict=strict, conventions="paper", probes=8)
    other = "b" if layer == "a" else "a"
    h, o = getattr(net, layer)(x).detach().double(), getattr(net, other)(x).detach().double()
    exact = _exact_m(lambda t: as_fn(t, o, x.double()), h)
    rec = {r.name: r for r in plan.layers}[layer]
    assert rec.m * rec.s == pytest.approx(exact, rel=1e-6), (rec.m, rec.s, exact)


def test_the_infinity_norm_keeps_m_at_a_share_of_the_positions():
    """``‖a‖_∞``: slope 1 at each row's largest entry — ``m`` kept, ``1/K`` of the positions
    carry gradient (the max-pool convention): ``m·s = 1/K``, the Jacobian's mean diagonal."""
    torch.manual_seed(0)
    net = Binary(lambda a, b, x: torch.linalg.vector_norm(a, math.inf, dim=-1))
    x = torch.randn(7, 6)
    plan = fxbackmatch.prepare(net, x, compile=False, strict=True, conventions="paper")
    rec = {r.name: r for r in plan.layers}["a"]
    assert rec.m == 1.0 and rec.s == pytest.approx(1 / 6)
    assert _exact_m(lambda t: torch.linalg.vector_norm(t, math.inf, dim=-1), net.a(x)) == pytest.approx(1 / 6)


def test_clamp_is_the_identity_of_the_paper_and_the_share_inside_under_the_mean_field():
    """``clamp(z, −½, ½)``: the paper's activations pass ``m`` (as its ReLU, eq. 31); the
    mean field gives ``P(|z| < ½) = erf(½/√2)`` for ``z ~ N(0, 1)`` — the share of a Gaussian
    batch inside, which is the Jacobian's mean diagonal (4096 entries: ~1 %)."""
    torch.manual_seed(0)

    class Clamp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _orthogonal(16, 16)

        def forward(self, x):
            return self.fc(x).clamp(-0.5, 0.5)

    net, x = Clamp(), torch.randn(256, 16)
    paper = fxbackmatch.prepare(net, x, compile=False, strict=True, conventions="paper")
    assert _m(paper, "fc") == 1.0
    mf = fxbackmatch.prepare(net, x, compile=False, strict=True)
    exact = _exact_m(lambda t: t.clamp(-0.5, 0.5), net.fc(x)[:64])
    assert _m(mf, "fc") == pytest.approx(math.erf(0.5 / math.sqrt(2)), rel=0.01)
    share = float(((net.fc(x).abs() < 0.5).double().mean()))
    assert _m(mf, "fc") == pytest.approx(share, rel=0.06) and exact == pytest.approx(
        float((net.fc(x)[:64].abs() < 0.5).double().mean()), rel=1e-9)


# ------------------------------------------------------------- a GRN (ConvNeXt-V2, timm)
class GlobalResponseNorm(nn.Module):
    """timm's GlobalResponseNorm (channels last): a norm, a division, an addcmul of views."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), x * x_n)


def test_timm_global_response_norm_prepares_strict_and_covered():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), GlobalResponseNorm(16), nn.Linear(16, 4))
    plan = fxbackmatch.prepare(net, torch.randn(2, 5, 5, 8), compile=False, strict=True)
    assert plan.uncovered == ()
    assert plan.roles["1.weight"] == "norm_scale" and plan.roles["1.bias"] == "bias"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_response_norm_factor_against_the_exact_jacobian(seed):
    """With random γ and β, the rules' ``m`` below a GRN and its head (the paper's set: no
    floor) against ``mean diag(JᵀJ)`` of GRN→head from the full Jacobian at the live input.
    The rules average over what the exact value sees per position: 0.71–1.27 on these seeds."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), GlobalResponseNorm(16), nn.Linear(16, 4))
    with torch.no_grad():
        net[1].weight.normal_()
        net[1].bias.normal_()
    x = torch.randn(2, 5, 5, 8)
    plan = fxbackmatch.prepare(net, x, compile=False, strict=True, conventions="paper")
    head = copy.deepcopy(net[1:]).double()
    exact = _exact_m(head, net[0](x))
    assert 0.6 < _m(plan, "0") / exact < 1.5, (_m(plan, "0"), exact)


# -------------------------------------------- what no rule covers: measured, how well
class CumsumNet(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(16, d, bias=False)
        self.fc2 = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, 10, bias=False)

    def forward(self, x):
        return self.head(self.fc2(torch.cumsum(self.fc1(x), dim=-1)))


def test_a_cumsum_region_is_measured_near_the_exact_factor():
    """``fc1``'s ``m`` three ways, against the exact ``mean diag(JᵀJ)`` of the outputs with
    respect to its output (per-sample Jacobians): the chain derived around the cumsum with its
    factor measured (the default) within 15 %; the whole graph measured
    (``factors="measured"``, ``plan.measure``) within 5 %; the old pass-through (cumsum as
    the identity) off by ``≈ (d+1)/2``. The cumsum alone has ``mean diag(CᵀC) = (d+1)/2``, but
    ``CᵀC`` is far from a multiple of ``I`` — the probes carry the gradient that reaches it,
    so its alignment with ``fc2`` and the head is measured, not assumed isotropic."""
    torch.manual_seed(0)
    d = 32
    net, x = CumsumNet(d), torch.randn(256, 16)
    plan = fxbackmatch.prepare(net, x, compile=False, conventions="paper", probes=64)
    h = net.fc1(x).detach()
    jac = torch.func.vmap(torch.func.jacrev(lambda t: net.head(net.fc2(torch.cumsum(t, dim=-1)))))(h)
    exact = float(jac.detach().double().square().sum((1, 2)).mean() / d)
    row = next(r for r in plan.measure(x, probes=64) if r["layer"] == "fc1")
    assert row["rule_m"] == pytest.approx(_m(plan, "fc1"))
    assert row["rule_m"] == pytest.approx(exact, rel=0.15)
    assert row["measured_m"] == pytest.approx(exact, rel=0.05)
    w_head, w2 = net.head.weight.detach().double(), net.fc2.weight.detach().double()
    passthrough = float(w_head.square().sum() / d * w2.square().sum() / d)
    assert exact / passthrough > (d + 1) / 4


# --------------------------------------------------- factors="measured": a measured zero
def _zero_head() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nn.init.zeros_(net[2].weight)
    return net


def test_a_measured_zero_uses_the_derived_m_and_says_so():
    """A zero-initialized head passes no gradient: the measured ``m`` below it is 0. The
    plan uses the layer's derived ``m`` (with the default reference floor, positive) instead
    of a hidden 1, notes it, and takes the measurement once it is positive."""
    net, x = _zero_head(), torch.randn(32, 8)
    plan = fxbackmatch.prepare(net, x, compile=False, factors="measured")
    derived = fxbackmatch.prepare(net, x, compile=False)
    key = "fxbackmatch.measured:" + {r.name: r.node for r in plan.layers}["0"]
    used = float(plan._measured[key])
    assert used == pytest.approx(_m(derived, "0"), rel=1e-9) and used != 1.0
    assert any("layer '0': measured m is 0" in n and "derived m is used" in n for n in plan.notes)
    with torch.no_grad():
        net[2].weight.normal_()
    got = plan.refresh(x, probes=256)
    node = {r.name: r.node for r in plan.layers}["0"]
    assert float(plan._measured[key]) == pytest.approx(got[node]) and got[node] > 0
    # by hand: J = W₂·diag(1[z > 0]) at z = net[0](x), so diag(JᵀJ) is Σ_o W₂[o, i]² where the
    # ReLU passes, and m is its mean over the entries that carry gradient (seen: 0.1 % off)
    z = net[0](x).detach()
    column = net[2].weight.detach().double().square().sum(0).expand(z.shape)
    assert got[node] == pytest.approx(float(column[z > 0].mean()), rel=0.02)
    assert not any("measured m is 0" in n for n in plan.notes)  # the note goes with the state


def test_a_measured_zero_on_a_zero_weight_keeps_the_last_value_and_says_so():
    """Without the floor the derived ``m`` rests on the zero weight itself (``sum(W²) = 0``):
    the last value stays — 1 before any measurement — and the report says so."""
    net, x = _zero_head(), torch.randn(32, 8)
    plan = fxbackmatch.prepare(net, x, compile=False, factors="measured", conventions="paper")
    key = "fxbackmatch.measured:" + {r.name: r.node for r in plan.layers}["0"]
    assert float(plan._measured[key]) == 1.0
    assert any("layer '0'" in n and "rests on a zero weight" in n for n in plan.notes)
