"""The extension rules against an independent numerical oracle and exact equivalences.

Oracle: ``plan.measure(x, values=True)`` measures ``mean diag(JᵀJ)`` at every value with
autograd (Hutchinson probes) — nothing of the rules' formulas is used. On *linearized* graphs
(no activations, as the paper's ReLU rule assumes; BatchNorm in train mode on a large batch,
so every weighted layer sees a normalized input), the rules' ``m`` must agree with it in
expectation over random weight draws. Tolerance: the geometric mean over draws of
``rule/measured`` within ``TOL`` of 1 at every value that carries gradient (``TOL`` covers the
row-homogeneity approximation ``J_topᵀJ_top ≈ m·I`` at widths 24–48 and the probe noise).

Equivalences are exact (float64 ``rel=1e-9``): two graphs computing the same function get
the same scales.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch

TOL = 0.12
DRAWS = 4
PROBES = 64
BATCH = 128


def prep(net, x, **kw):
    """The paper's conventions unless a test names others: the hand oracles here derive them."""
    kw.setdefault("conventions", "paper")
    return fxbackmatch.prepare(net, x, compile=False, **kw)


def oracle_ratios(make, shape, draws=DRAWS, values=True, **kw) -> dict[str, float]:
    """Geometric mean over weight draws of rule m / measured m, per value (per layer output
    with ``values=False``)."""
    logs: dict[str, list[float]] = {}
    for d in range(draws):
        torch.manual_seed(100 + d)
        net = make()
        x = torch.randn(BATCH, *shape)
        plan = prep(net, x, **kw)
        for row in plan.measure(x, probes=PROBES, seed=d, values=values):
            if row["measured_m"] and row["rule_m"]:
                logs.setdefault(row["node"], []).append(math.log(row["ratio"]))
    return {k: math.exp(sum(v) / len(v)) for k, v in logs.items()}


def assert_oracle(make, shape, values=True, **kw):
    ratios = oracle_ratios(make, shape, values=values, **kw)
    assert ratios, "nothing measured"
    bad = {k: round(v, 3) for k, v in ratios.items() if abs(math.log(v)) > math.log(1 + TOL)}
    assert not bad, f"rule m / measured m off by more than {TOL:.0%}: {bad}"
    return ratios


def bn1(n):
    return nn.BatchNorm1d(n, affine=False)


def bn2(n):
    return nn.BatchNorm2d(n, affine=False)


# ----------------------------------------------------------------------------- graphs
class ResMLP(nn.Module):
    """Two residual blocks (linear, BN) — forks whose factors must add."""

    def __init__(self, w=64):
        super().__init__()
        self.stem, self.b0 = nn.Linear(64, w, bias=False), bn1(w)
        self.f1, self.b1 = nn.Linear(w, w, bias=False), bn1(w)
        self.f2, self.b2 = nn.Linear(w, w, bias=False), bn1(w)
        self.head = nn.Linear(w, 32, bias=False)

    def forward(self, x):
        h = self.b0(self.stem(x))
        h = h + self.b1(self.f1(h))
        h = h + self.b2(self.f2(h))
        return self.head(h)


class TwoHeads(nn.Module):
    def __init__(self, w=32):
        super().__init__()
        self.fc0, self.bn = nn.Linear(64, w, bias=False), bn1(w)
        self.h1, self.h2 = nn.Linear(w, 8, bias=False), nn.Linear(w, 24, bias=False)

    def forward(self, x):
        h = self.bn(self.fc0(x))
        return self.h1(h), self.h2(h)


class ChunkHeads(nn.Module):
    """Disjoint consumers: two halves of one tensor read by different heads."""

    def __init__(self, w=48):
        super().__init__()
        self.fc0, self.bn = nn.Linear(64, w, bias=False), bn1(w)
        self.h1, self.h2 = nn.Linear(w // 2, 4, bias=False), nn.Linear(w // 2, 40, bias=False)

    def forward(self, x):
        a, b = self.bn(self.fc0(x)).chunk(2, dim=1)
        return self.h1(a), self.h2(b)


class ConvPools(nn.Module):
    """Conv/BN with average pooling, a global mean and a max pool: the linear maps the
    pooling ops are, and the positions max pooling drops. Valid (unpadded) convs: the conv
    rule, like the paper's ``c``, does not count the taps that padding leaves empty."""

    def __init__(self, w=24):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(48, w, 3, bias=False), bn2(w)
        self.c2, self.n2 = nn.Conv2d(w, w, 3, bias=False), bn2(w)
        self.c3, self.n3 = nn.Conv2d(w, w, 1, bias=False), bn2(w)
        self.fc = nn.Linear(w, 10, bias=False)
        self.fc2 = nn.Linear(w * 4, 10, bias=False)

    def forward(self, x):  # 22×22
        h = F.avg_pool2d(self.n1(self.c1(x)), 2)  # 20 → 10
        h = self.n3(self.c3(self.n2(self.c2(h))))  # 8×8
        a = self.fc(h.mean(dim=(2, 3)))
        b = self.fc2(F.max_pool2d(h, 4).flatten(1))  # 2×2 of 8×8 positions carry gradient
        return a, b


class Gate(nn.Module):
    """Squeeze-excitation without the nonlinearities: y = x ⊙ g(pool(x)), g normalized. A 1×1
    conv below keeps positions uncorrelated, as the mean's moment ``E[a²]/K`` assumes."""

    def __init__(self, w=48):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(64, w, 1, bias=False), bn2(w)
        self.se, self.ns = nn.Linear(w, w, bias=False), bn1(w)
        self.c2, self.n2 = nn.Conv2d(w, w, 1, bias=False), bn2(w)
        self.fc = nn.Linear(w, 10, bias=False)

    def forward(self, x):
        h = self.n1(self.c1(x))
        g = self.ns(self.se(h.mean(dim=(2, 3))))
        y = h * g[:, :, None, None]
        y = self.n2(self.c2(y))
        return self.fc(y.mean(dim=(2, 3)))


class SumSlice(nn.Module):
    """A token sum, a CLS-style position pick and a channel slice."""

    def __init__(self, w=32, reconverge=False):
        super().__init__()
        self.reconverge = reconverge
        self.fc0, self.n0 = nn.Linear(48, w, bias=False), nn.LayerNorm(w, elementwise_affine=False)
        self.fc1 = nn.Linear(w, 2 * w, bias=False)
        self.head, self.head2 = nn.Linear(w, 10, bias=False), nn.Linear(w, 10, bias=False)

    def forward(self, x):  # x: B × 6 × 12
        h = self.n0(self.fc0(x))
        t = self.fc1(h)[:, :, :32]  # channel slice
        if self.reconverge:  # both paths end in the same output: their Jacobians add
            return self.head(t[:, 0] + t.sum(dim=1))
        return self.head(t[:, 0]), self.head2(t.sum(dim=1))


@pytest.mark.parametrize(
    "make,shape",
    [(ResMLP, (64,)), (TwoHeads, (64,)), (ChunkHeads, (64,)), (ConvPools, (48, 22, 22)), (Gate, (64, 6, 6))],
    ids=["residual", "two-heads", "chunk-heads", "conv-pools", "gate"],
)
def test_rules_match_measured_jacobians(make, shape):
    assert_oracle(make, shape)


def test_sum_and_slices_match_measured_jacobians():
    assert_oracle(SumSlice, (6, 48))


def test_reconvergent_paths_are_where_the_sum_is_approximate():
    """``JᵀJ = Σ J_iᵀJ_i`` stacks consumers with *separate* outputs. Where two paths end in the
    same output (``t[:, 0] + t.sum(1)``) the Jacobians add, ``(J_1+J_2)ᵀ(J_1+J_2)``, and the
    cross terms count: token 0 has 2² = 4 where the sum rule says 1 + 1. Over 6 tokens the
    rule's 7/6 stands against a measured 9/6 — ratio 7/9 at t. (In a residual block the
    cross terms ``J_fᵀ + J_f`` have mean zero over random weights and the sum is right.)"""
    ratios = oracle_ratios(lambda: SumSlice(reconverge=True), (6, 48))
    assert ratios["getitem"] == pytest.approx(7 / 9, rel=TOL)


def test_oracle_detects_a_wrong_rule():
    """The oracle is not a tautology: the 0.1 fork rule (Σ√m/Σ1/√m) fails it on a residual net."""
    from fxbackmatch.analysis.expr import Mono
    from fxbackmatch.analysis.records import Flow

    def power(m, k):
        return Mono(tuple((i, p * k) for i, p in m.powers), m.log_const * k)

    def old_combine(self, node, flows):
        if len(flows) == 1:
            return flows[0]
        num = self.atoms.sum_of((1.0, power(f.m, 0.5)) for f in flows)
        den = self.atoms.sum_of((1.0, power(f.m, -0.5)) for f in flows)
        return Flow(num / den, 1.0, 1.0)

    from fxbackmatch.analysis import walk as analysis

    saved = analysis._Walker._combine
    analysis._Walker._combine = old_combine
    try:
        ratios = oracle_ratios(ResMLP, (64,), draws=2)
    finally:
        analysis._Walker._combine = saved
    assert min(ratios.values()) < 1 / (1 + TOL)


class PaddedSmallMaps(nn.Module):
    """'Same' convs on maps about as small as their kernels (4×4 and 1×1), where zero padding
    leaves taps empty: a 3×3 conv on 4×4 reads real input in (10/12)² of its (output, tap)
    pairs, a 5×5 conv on 4×4 in (14/20)², a 3×3 conv on a 1×1 map only with its centre tap."""

    def __init__(self, w=24):
        super().__init__()
        self.c1 = nn.Conv2d(48, w, 3, padding=1, bias=False)
        self.c2, self.n2 = nn.Conv2d(w, w, 5, padding=2, bias=False), bn2(w)
        self.c3, self.n3 = nn.Conv2d(w, w, 3, padding=1, bias=False), bn2(w)
        self.fc = nn.Linear(w, 10, bias=False)

    def forward(self, x):  # 4×4
        h = self.n2(self.c2(self.c1(x)))  # no BN between c1 and c2: c1's output m shows the taps
        h = self.n3(self.c3(F.avg_pool2d(h, 4)))  # 1×1 map
        return self.fc(h.flatten(1))


def test_valid_taps_match_measured_jacobians():
    """``taps="valid"`` counts only the (output, tap) pairs that read real input: the oracle
    agrees at every value. The paper's convention (``taps="all"``, the default) is measurably
    off at these sizes: at c2's output (the BN above divides by ``Var`` of c2's output, which
    the paper's rule over-counts by both convs' valid fractions) by (10/12)²·(14/20)² = 0.34."""
    got = assert_oracle(PaddedSmallMaps, (48, 4, 4), conventions=fxbackmatch.Conventions(taps="valid"))
    assert len(got) >= 6
    paper = oracle_ratios(PaddedSmallMaps, (48, 4, 4), draws=2)
    assert paper["c2"] == pytest.approx((10 / 12) ** 2 * (14 / 20) ** 2, rel=TOL)


def test_valid_taps_leave_the_paper_vgg_scales_alone():
    """With a BN above every conv and every tap reading real input somewhere (maps ≥ 2×2), the
    valid fraction cancels between the BN's ``Var`` and the conv's ``c`` and ``s``: the paper's
    VGG-16 gets the same scales either way (its reported ``s`` and ``c`` differ)."""
    from fxbackmatch.models import vgg_paper

    torch.manual_seed(0)
    net, x = vgg_paper("vgg16"), torch.randn(4, 3, 32, 32)
    paper, valid = prep(net, x), prep(net, x, conventions=fxbackmatch.Conventions(taps="valid"))
    for k, v in paper.scales().items():
        _same(valid.scales()[k], v, rel=1e-12)
    assert [r.s for r in valid.layers][-2] == pytest.approx(4 / 9)  # 2×2 map, pooled to 1 location: 4/9 of taps


class ReluChain(nn.Sequential):
    """Linear–BN–ReLU ×4 with real ReLUs: what the paper linearizes (eq. 31)."""

    def __init__(self, w=64):
        layers, d = [], 64
        for _ in range(4):
            layers += [nn.Linear(d, w, bias=False), bn1(w), nn.ReLU()]
            d = w
        super().__init__(*layers, nn.Linear(w, 32, bias=False))


def test_relu_exact_matches_measured_jacobians_on_real_relus():
    """``relu="exact"``: a ReLU of a normalized pre-activation passes gradient at half of its
    entries (``m ← m/2``) and has ``Var = 1/2 − 1/2π``: on a real BN–ReLU chain the rules then
    agree with the measured Jacobians at every layer (the oracle, unlinearized). The paper's
    identity is measurably off there (``2·(1/2 − 1/2π) = 1 − 1/π`` per stage, partly cancelling).
    Compared at the layers' outputs: at a ReLU's own input the measured mean runs over the
    entries it lets through, the rule's over all of them (a factor 2 by definition)."""
    got = assert_oracle(ReluChain, (64,), values=False, conventions=fxbackmatch.Conventions(relu="exact"))
    assert len(got) == 5
    paper = oracle_ratios(ReluChain, (64,), draws=2, values=False)
    assert min(paper.values()) < 1 / (1 + 2 * TOL)


def _measured_weight_curvature(net, x, name, probes=PROBES) -> float:
    """Mean over the elements that carry gradient of ``diag(J_WᵀJ_W)/B`` for parameter
    ``name`` (Hutchinson probes at the output): the curvature a scale of 1/it matches."""
    from fxbackmatch.measure.factors import carrying_mean

    w = dict(net.named_parameters())[name]
    out = net(x)
    acc = torch.zeros_like(w, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(probes):
        z = torch.randint(0, 2, out.shape, generator=gen).to(out.dtype) * 2 - 1
        (g,) = torch.autograd.grad(out, w, z, retain_graph=True)
        acc += g.double().square()
    return carrying_mean(acc / probes) / x.shape[0]


def test_valid_taps_weight_scale_matches_measured_weight_curvature():
    """A weight's scale is ``1/(m·s·E[a²])``, its measured curvature ``mean diag(J_WᵀJ_W)``
    per sample: their product is 1 where the rule is exact. On the 1×1 map only the centre tap
    of c3 carries gradient, read once per sample (``s = 1``); the paper's convention divides
    by the row norm of all 9 taps in the BN above, so its scale is 9× too large."""
    logs: dict[str, list[float]] = {"valid": [], "all": []}
    for d in range(DRAWS):
        torch.manual_seed(200 + d)
        net = PaddedSmallMaps()
        x = torch.randn(BATCH, 48, 4, 4)
        curv = _measured_weight_curvature(net, x, "c3.weight")
        for taps in logs:
            logs[taps].append(math.log(prep(net, x, conventions=fxbackmatch.Conventions(taps=taps)).scales()["c3.weight"] * curv))
    valid, paper = (math.exp(sum(v) / len(v)) for v in logs.values())
    assert valid == pytest.approx(1.0, rel=TOL)
    assert paper == pytest.approx(9.0, rel=TOL)


def test_gamma_one_counts_gamma_as_one_both_ways():
    """``gamma="one"`` (default) is the network the paper trains: BN without γ. Forward moments
    and the backward chain both count γ as 1, so ResNet-18 with zero-initialized residual γ
    gets exactly the scales of the same weights with γ = 1 — a zero γ neither silences the
    stream forward nor counts backward. (0.1 counted actual γ forward and 1 backward: each
    silent branch then added a full branch's ``m`` below, while the stream's ``E[a²]`` stayed
    1 — ConvNeXt-L's stem scale fell to 6e-10.) ``gamma="exact"`` tells them apart."""
    import torchvision

    x = torch.randn(2, 3, 32, 32)
    scales = {}
    for zero in (False, True):
        torch.manual_seed(0)
        net = torchvision.models.resnet18(num_classes=10, zero_init_residual=zero)
        scales[zero] = prep(net, x).scales()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxbackmatch.ScaleRangeWarning)  # exact: γ = 0 floors at 1e-12
            scales["exact", zero] = prep(net, x, conventions=fxbackmatch.Conventions(gamma="exact")).scales()
    for k, v in scales[False].items():
        _same(scales[True][k], v)
    assert scales["exact", True]["conv1.weight"] != pytest.approx(scales["exact", False]["conv1.weight"], rel=1e-3)


# ----------------------------------------------------------------------- equivalences
def _same(a: float, b: float, rel: float = 1e-9):
    assert a == pytest.approx(b, rel=rel)


def test_avg_pool_equals_frozen_depthwise_conv():
    torch.manual_seed(0)
    c1, n1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), bn2(8)
    head = nn.Linear(8 * 4 * 4, 10, bias=False)
    dw = nn.Conv2d(8, 8, 2, stride=2, groups=8, bias=False)
    nn.init.constant_(dw.weight, 0.25)
    dw.weight.requires_grad_(False)
    x = torch.randn(4, 3, 8, 8)
    for pool, k in ((nn.AvgPool2d(2), None), (nn.AdaptiveAvgPool2d(4), None)):
        a = prep(nn.Sequential(c1, n1, pool, nn.Flatten(), head), x).scales()
        b = prep(nn.Sequential(c1, n1, dw, nn.Flatten(), head), x).scales()
        _same(a["0.weight"], b["0.weight"])
    # global pool 8×8 ≡ frozen 8×8 depthwise conv with weights 1/64
    g = nn.Conv2d(8, 8, 8, groups=8, bias=False)
    nn.init.constant_(g.weight, 1 / 64)
    g.weight.requires_grad_(False)
    head2 = nn.Linear(8, 10, bias=False)
    a = prep(nn.Sequential(c1, n1, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head2), x).scales()
    b = prep(nn.Sequential(c1, n1, g, nn.Flatten(), head2), x).scales()
    _same(a["0.weight"], b["0.weight"])


def test_channel_slice_equals_the_smaller_layer():
    torch.manual_seed(0)
    small = nn.Linear(6, 5, bias=False)
    big = nn.Linear(6, 10, bias=False)
    with torch.no_grad():  # rows 5:10 repeat rows 0:5, so row norms are homogeneous exactly
        big.weight.copy_(torch.cat([small.weight, small.weight]))
    stem, n0, head = nn.Linear(4, 6, bias=False), bn1(6), nn.Linear(5, 3, bias=False)

    class Sliced(nn.Module):
        def __init__(self, fc):
            super().__init__()
            self.stem, self.n0, self.fc, self.head = stem, n0, fc, head

        def forward(self, x):
            return self.head(self.fc(self.n0(self.stem(x)))[:, :5])

    x = torch.randn(8, 4)
    a = prep(Sliced(big), x).scales()
    b = prep(Sliced(small), x).scales()
    _same(a["fc.weight"], b["fc.weight"])
    _same(a["stem.weight"], b["stem.weight"])


def test_split_and_recat_change_nothing():
    torch.manual_seed(0)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), bn2(8)
            self.c2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)

        def forward(self, x):
            return self.c2(self.n1(self.c1(x)))

    class SplitCat(Plain):
        def forward(self, x):
            a, b = self.n1(self.c1(x)).split(4, dim=1)
            return self.c2(torch.cat([a, b], dim=1))

    class ChunkCat(Plain):
        def forward(self, x):
            parts = torch.chunk(self.n1(self.c1(x)), 4, dim=1)
            return self.c2(torch.cat(parts, dim=1))

    p = Plain()
    x = torch.randn(2, 3, 6, 6)
    ref = prep(p, x).scales()
    for cls in (SplitCat, ChunkCat):
        q = cls()
        q.load_state_dict(p.state_dict())
        got = prep(q, x).scales()
        for k in ref:
            _same(got[k], ref[k])


@pytest.mark.parametrize("silent", ["zero-constant", "zero-gamma-exact"])
def test_zero_residual_branch_equals_no_branch(silent):
    torch.manual_seed(0)
    k = 0.0 if silent == "zero-constant" else 1.0

    class Block(nn.Module):
        def __init__(self, branch: bool):
            super().__init__()
            self.branch = branch
            self.stem, self.n0 = nn.Linear(8, 16, bias=False), bn1(16)
            self.f, self.nf = nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16)
            nn.init.zeros_(self.nf.weight)  # zero-initialized residual BN γ
            self.head = nn.Linear(16, 4, bias=False)

        def forward(self, x):
            h = self.n0(self.stem(x))
            if self.branch:
                h = h + self.nf(self.f(h)) * k  # the branch is silent: J = 0
            return self.head(h)

    with_b, without = Block(True), Block(False)
    without.load_state_dict(with_b.state_dict())
    x = torch.randn(8, 8)
    kw = {"conventions": fxbackmatch.Conventions(gamma="exact")} if silent == "zero-gamma-exact" else {}
    a = prep(with_b, x, **kw).scales()
    b = prep(without, x, **kw).scales()
    _same(a["stem.weight"], b["stem.weight"], rel=1e-6)  # γ = 0 counts as EPS = 1e-12
    _same(a["head.weight"], b["head.weight"])


def test_unused_output_equals_no_output_once_loss_outputs_named():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self, extra: bool):
            super().__init__()
            self.extra = extra
            self.fc0, self.n0, self.fc1 = nn.Linear(6, 12, bias=False), bn1(12), nn.Linear(12, 3, bias=False)

        def forward(self, x):
            feat = self.n0(self.fc0(x))
            logits = self.fc1(feat)
            return (logits, feat) if self.extra else logits

    a_net, b_net = Net(True), Net(False)
    b_net.load_state_dict(a_net.state_dict())
    x = torch.randn(8, 6)
    every = prep(a_net, x).scales()
    named = prep(a_net, x, outputs=0)
    plain = prep(b_net, x).scales()
    _same(named.scales()["fc0.weight"], plain["fc0.weight"])
    assert every["fc0.weight"] != pytest.approx(plain["fc0.weight"], rel=1e-3)  # it matters
    assert named.to_dict()["outputs"] == ["0"]
    with pytest.raises(ValueError, match="no element 'logits'"):
        prep(a_net, x, outputs="logits")


def test_dict_output_selected_by_key():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.n0, self.fc1 = nn.Linear(6, 12, bias=False), bn1(12), nn.Linear(12, 3, bias=False)

        def forward(self, x):
            feat = self.n0(self.fc0(x))
            return {"logits": self.fc1(feat), "features": feat}

    net = DictNet()
    x = torch.randn(8, 6)
    s = prep(net, x, outputs="logits").scales()
    m = float(net.fc1.weight.detach().double().pow(2).sum() / 12)
    row = float(net.fc0.weight.detach().double().pow(2).sum() / 12)
    _same(s["fc0.weight"], row / m)  # m = ||fc1ᵀ||²/Var, Var = ||fc0||²row


# ----------------------------------------------------------------- hand computations
def coln(w):
    return float(w.detach().double().pow(2).sum() / w.shape[1])


def rown(w):
    return float(w.detach().double().pow(2).sum() / w.shape[0])


def test_residual_factors_add_by_hand():
    torch.manual_seed(1)
    net = ResMLP()
    s = prep(net, torch.randn(8, 64)).scales()
    m3 = coln(net.head.weight)  # at the last sum
    var2 = rown(net.f2.weight) * 2  # f2 reads h0 + b1(…): E[h²] = 1 + 1
    m2 = m3 + m3 / var2 * coln(net.f2.weight)  # skip + branch
    # f2's own normal matrix E aaᵀ ≈ E[h²]·I = 2·I (eq. 13): its scale divides by 2 as well
    _same(s["f2.weight"], var2 / m3 / 2)
    _same(s["f1.weight"], rown(net.f1.weight) / m2)
    m1 = m2 + m2 / rown(net.f1.weight) * coln(net.f1.weight)
    _same(s["stem.weight"], rown(net.stem.weight) / m1)


def test_shared_weight_sums_uses():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.head(self.fc(self.fc(x)))

    torch.manual_seed(0)
    net = Shared()
    plan = prep(net, torch.randn(3, 4))
    m_outer = coln(net.head.weight)
    m_inner = m_outer * coln(net.fc.weight)
    # the outer use reads fc(x): E[a²] = ‖W‖²row enters that use's normal matrix
    _same(plan.scales()["fc.weight"], 1 / (m_outer * rown(net.fc.weight) + m_inner))
    assert len([r for r in plan.layers if r.params and r.params[0][0] == "fc.weight"]) == 2


def test_layer_scale_uses_variance_of_the_scaled_tensor():
    class LS(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.n0 = nn.Linear(4, 6, bias=False), bn1(6)
            self.fc = nn.Linear(6, 6, bias=False)
            self.gamma = nn.Parameter(torch.full((6,), 1e-6))
            self.beta = nn.Parameter(torch.zeros(6))
            self.head = nn.Linear(6, 2, bias=False)

        def forward(self, x):
            h = self.n0(self.fc0(x))
            return self.head(h + self.fc(h) * self.gamma + self.beta)

    torch.manual_seed(0)
    net = LS()
    x = torch.randn(3, 4)
    plan = prep(net, x)
    s = plan.scales()
    m = coln(net.head.weight)
    _same(s["beta"], 1 / m)
    _same(s["gamma"], 1 / (m * rown(net.fc.weight)))  # E[x²] of fc's output = ||W||²row
    _same(s["fc.weight"], 1 / m)  # γ treated as 1 (gamma="one")
    # the exact form: m·mean(γ²) below γ — a 1e-6 layer scale makes fc's scale 1e12
    ex = prep(net, x, conventions=fxbackmatch.Conventions(gamma="exact")).scales()
    _same(ex["fc.weight"], 1 / (m * float(net.gamma[0]) ** 2), rel=1e-6)


def test_gate_operands_by_hand():
    torch.manual_seed(0)
    net = Gate()
    x = torch.randn(4, 64, 6, 6)
    s = prep(net, x).scales()
    m_y = coln(net.fc.weight) / 36 ** 2 / rown(net.c2.weight) * coln(net.c2.weight)  # at y
    # g is broadcast over 36 positions of h, whose E[h²] = 1 (BN): m_g = 36·m_y; the BN on
    # se's output divides by Var = ||se||²row · E[mean²] = ||se||²row / 36, and se's own
    # normal matrix has E[mean²] = 1/36
    _same(s["se.weight"], rown(net.se.weight) / 36 / (36 * m_y) * 36)


def test_out_of_range_scales_warn_and_cap_bounds_them():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0 = nn.Linear(4, 4, bias=False)
            self.fc1 = nn.Linear(4, 2, bias=False)
            nn.init.constant_(self.fc1.weight, 1e-5)

        def forward(self, x):
            return self.fc1(self.fc0(x))

    x = torch.randn(3, 4)
    with pytest.warns(fxbackmatch.ScaleRangeWarning, match="fc0.weight"):
        plan = prep(Tiny(), x)
    assert plan.flags and "layer 'fc0'" in plan.flags[0]
    assert any("no norm above" in r.notes for r in plan.layers if r.name == "fc0")
    capped = prep(Tiny(), x, conventions=fxbackmatch.Conventions(cap=1e3))
    assert capped.scales()["fc0.weight"] == pytest.approx(1e3)
    torch.testing.assert_close(capped.scale_tensor().max().item(), 1e3, rtol=1e-9, atol=0)


def test_measure_leaves_the_model_alone_and_matches_the_paper_lenet():
    from fxbackmatch.models import lenet_bn

    torch.manual_seed(0)
    net = lenet_bn()
    x = torch.randn(64, 3, 32, 32)
    plan = prep(net, x[:2])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rows = plan.measure(x, probes=8)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN stats restored
    assert all(p.grad is None for p in net.parameters())  # no .grad touched
    assert [r["layer"] for r in rows] == [r.name for r in plan.layers]
    assert rows[-1]["rule_m"] == 1.0 and rows[-1]["measured_m"] == pytest.approx(1.0)  # the output
    # the paper's approximations on its own LeNet: ReLU masks and Var ≈ ‖W‖²row drift a little
    # per layer (docs/derivations.md); this seed with 8 probes: 0.67–1.39
    assert all(0.6 < r["ratio"] < 1.5 for r in rows), [r["ratio"] for r in rows]


def test_generated_code_states_each_chain_in_words():
    net = TwoHeads()
    plan = fxbackmatch.prepare(net, torch.randn(4, 64))
    code = plan.code
    assert "fork at 'bn': Σ m_i" in code  # the fork, as a sum atom of the two heads' norms
    assert "Σh1.weight²" in code and "Σh2.weight²" in code
    line = next(l for l in code.splitlines() if "] fc0.weight:" in l)
    assert "m = " in line and "s = 1" in line and "S" in line  # refers to a sum atom
    torch.testing.assert_close(
        plan.scale_tensor(), torch.tensor([plan.scales()[n] for n in plan.targets], dtype=torch.float64),
        rtol=1e-6, atol=0,
    )
