"""The core pass (issue 2): factors against the paper's closed forms and hand loops."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.models import lenet_bn, vgg_paper

from oracles import coln, lenet_closed_form, rown, sequential_loop


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * torch.rand((), generator=g) * 3)
    return net


def assert_close(got: dict, want: dict, rtol: float = 1e-6):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rtol), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lenet_matches_supplementary_closed_form(seed):
    net = randomize(lenet_bn(), seed)
    plan = fxbackmatch.prepare(net, torch.randn(4, 3, 32, 32), compile=False, conventions="paper")
    assert_close(plan.scales(), lenet_closed_form(net))
    layers = plan.layers
    assert [r.s for r in layers] == [196.0, 25.0, 1.0, 1.0, 1.0]
    assert layers[1].c == pytest.approx(196 / 25)
    assert [r.kind for r in layers] == ["Conv2d", "Conv2d", "Linear", "Linear", "Linear"]
    assert layers[0].weight_shape == (6, 3, 5, 5)
    assert layers[0].input_shape == (4, 3, 32, 32) and layers[0].output_shape == (4, 6, 28, 28)
    # m at fc2's output is ||W_fc3ᵀ||² / ||W_fc2||² (supplementary, first BN step)
    assert layers[3].m == pytest.approx(coln(net[15].weight) / rown(net[12].weight), rel=1e-9)
    assert layers[4].m == 1.0


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_paper_vgg_matches_hand_loop(depth):
    net = randomize(vgg_paper(depth, width=0.125), depth)
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False, conventions="paper")
    want = sequential_loop(net, 32)
    got = plan.scales()
    assert set(want) == {n for n, _ in net.named_parameters()}
    assert_close(got, want)
    assert plan.uncovered == ()


BLOCKS = st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=1, max_size=4)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(blocks=BLOCKS, hw=st.sampled_from([4, 8, 16]), seed=st.integers(0, 1000))
def test_fuzz_conv_bn_relu_stacks_match_the_hand_loop(blocks, hw, seed):
    """Random stacks of the paper's block — conv 3×3 (pad 1, no bias), BN, ReLU, a 2×2 max-pool
    or not, random widths — then Flatten and Linear, with random weights: every weight's scale
    under the paper's conventions equals Algorithm 1 run by hand (``oracles.sequential_loop``)."""
    layers: list[nn.Module] = []
    c, side = 3, hw
    for width, pool in blocks:
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, affine=False), nn.ReLU()]
        c = width
        if pool and side >= 2:
            layers.append(nn.MaxPool2d(2))
            side //= 2
    net = randomize(nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, 4, bias=False)), seed)
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, hw, hw), compile=False, conventions="paper")
    want = sequential_loop(net, hw)
    assert set(want) == {n for n, _ in net.named_parameters()}
    assert_close(plan.scales(), want)


class LeNetFunctional(nn.Module):
    """LeNet-BN with a custom forward and functional calls."""

    def __init__(self):
        super().__init__()
        self.cv1 = nn.Conv2d(3, 6, 5, bias=False)
        self.bn1 = nn.BatchNorm2d(6, affine=False)
        self.cv2 = nn.Conv2d(6, 16, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(16, affine=False)
        self.fc1 = nn.Linear(400, 120, bias=False)
        self.bn3 = nn.BatchNorm1d(120, affine=False)
        self.fc2 = nn.Linear(120, 84, bias=False)
        self.bn4 = nn.BatchNorm1d(84, affine=False)
        self.fc3 = nn.Linear(84, 10, bias=False)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.cv1(x))), 2)
        x = F.max_pool2d(torch.relu(self.bn2(self.cv2(x))), kernel_size=2)
        x = torch.flatten(x, 1)
        x = F.relu(self.bn3(self.fc1(x)))
        x = self.bn4(self.fc2(x)).relu()
        return self.fc3(x)


class LeNetView(LeNetFunctional):
    """The same with x.view and a functional conv on a raw parameter."""

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(F.conv2d(x, self.cv1.weight))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.cv2(x))), 2, 2)
        x = x.view(x.size(0), -1)
        x = F.relu(self.bn3(F.linear(x, self.fc1.weight)))
        x = F.relu(self.bn4(self.fc2(x)))
        return self.fc3(x)


def test_three_ways_identical():
    seq = randomize(lenet_bn(), 7)
    fun, view = LeNetFunctional(), LeNetView()
    names = ["cv1", "cv2", "fc1", "fc2", "fc3"]
    idx = [0, 4, 9, 12, 15]
    for other in (fun, view):
        with torch.no_grad():
            for n, i in zip(names, idx):
                getattr(other, n).weight.copy_(seq[i].weight)
    x = torch.randn(2, 3, 32, 32)
    s0 = fxbackmatch.prepare(seq, x, compile=False).scales()
    for other in (fun, view):
        s = fxbackmatch.prepare(other, x, compile=False).scales()
        for n, i in zip(names, idx):
            assert s[f"{n}.weight"] == s0[f"{i}.weight"]


def test_rescale_grads_multiplies_exactly():
    net = randomize(lenet_bn(), 3)
    x = torch.randn(8, 3, 32, 32)
    plan = fxbackmatch.prepare(net, x, compile=False)
    net(x).square().mean().backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    scales = plan.scales()
    plan.rescale_grads_()
    for n, p in net.named_parameters():
        want = before[n] * torch.tensor(scales[n], dtype=torch.float64).float()
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=0)


def test_prepare_does_not_change_the_model():
    net = randomize(lenet_bn(), 5)
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fxbackmatch.prepare(net, torch.randn(4, 3, 32, 32))
    after = net.state_dict()
    assert net.training and all(m.training for m in net.modules())
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert int(after["1.num_batches_tracked"]) == 0
    net.eval()
    fxbackmatch.prepare(net, torch.randn(4, 3, 32, 32))
    assert not any(m.training for m in net.modules())


def test_lazy_prepare_from_first_forward():
    net = randomize(lenet_bn(), 1)
    plan = fxbackmatch.prepare(net, compile=False, conventions="paper")
    assert not plan.ready
    with pytest.raises(fxbackmatch.PlanNotReadyError, match="forward"):
        plan.scales()
    with pytest.raises(fxbackmatch.PlanNotReadyError):
        plan.rescale_grads_()
    x = torch.randn(4, 3, 32, 32)
    y = net(x)
    assert plan.ready and plan.input_shapes == ((4, 3, 32, 32),)
    assert len(net._forward_pre_hooks) == 0
    assert_close(plan.scales(), lenet_closed_form(net))
    torch.testing.assert_close(net(x), y)


def test_scales_update_with_weights_and_stay_finite_for_zero_weights():
    net = randomize(lenet_bn(), 2)
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    s1 = plan.scales()
    with torch.no_grad():
        net[15].weight.mul_(2.0)
    s2 = plan.scales()
    # fc2's scale is divided by ||W_fc3ᵀ||², which grew 4×
    assert s2["12.weight"] == pytest.approx(s1["12.weight"] / 4, rel=1e-9)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    s3 = plan.scales()
    assert all(math.isfinite(v) and v > 0 for v in s3.values())
    assert torch.isfinite(plan.scale_tensor()).all()
    # oracle: the default floor reads a zero weight as one of ΣW² = out/3 — a twin whose conv and
    # linear weights hold exactly that norm (constant entries, nothing floored) has the same scales
    import copy

    twin = copy.deepcopy(net)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.fill_(math.sqrt(m.weight.shape[0] / 3 / m.weight.numel()))
    want = fxbackmatch.prepare(twin, torch.randn(2, 3, 32, 32), compile=False).scales()
    assert s3 == pytest.approx(want, rel=1e-6)  # the constants' float32 rounding: ~1e-7
    assert len(set(s3.values())) > 1  # not one value for all
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1e-30)
    assert all(math.isfinite(v) and v > 0 for v in plan.scales().values())


def test_biases_and_affine_bn_roles_and_adapt_weights():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
    )
    randomize(net, 4)
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False, conventions="paper")
    assert plan.roles == {
        "0.weight": "weight", "0.bias": "bias", "1.weight": "norm_scale",
        "1.bias": "norm_shift", "5.weight": "weight", "5.bias": "bias",
    }
    s = plan.scales()
    fc, bn, cv = net[5].weight, net[1].weight, net[0].weight
    gamma2 = float(bn.detach().double().pow(2).mean())
    assert s["5.bias"] == 1.0
    assert s["5.weight"] == 1.0  # gamma="one": γ counts as 1 in its input's E[a²] too
    exact = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False, conventions=fxbackmatch.Conventions(gamma="exact")).scales()
    assert exact["5.weight"] == pytest.approx(1 / gamma2, rel=1e-9)  # E[a²] = mean(γ²)
    m_bn_out = coln(fc)  # fc consumes flatten(pool(relu(bn)))
    s_bn = 16  # 4×4 locations after the pool carry gradient
    assert s["1.weight"] == pytest.approx(1 / (m_bn_out * s_bn), rel=1e-9)
    assert s["1.bias"] == s["1.weight"]
    # default gamma="one": γ is 1 in the chain (the paper's BN without trainable affine)
    m_cv_out = m_bn_out / rown(cv)
    assert s["0.weight"] == pytest.approx(1 / (m_cv_out * 16), rel=1e-9)
    assert s["0.bias"] == s["0.weight"]
    s_exact = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False, conventions=fxbackmatch.Conventions(gamma="exact")).scales()
    assert s_exact["0.weight"] == pytest.approx(1 / (m_cv_out * gamma2 * 16), rel=1e-9)
    assert s_exact["1.weight"] == s["1.weight"]  # γ's own scale does not depend on the mode
    plan_w = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8), compile=False, adapt="weights", conventions="paper")
    sw = plan_w.scales()
    assert sw["0.bias"] == sw["1.weight"] == sw["1.bias"] == sw["5.bias"] == 1.0
    assert sw["0.weight"] == pytest.approx(s["0.weight"], rel=1e-12)


@pytest.mark.parametrize(
    "conv, hw, s, c",
    [
        (nn.Conv2d(4, 8, 3, stride=2, padding=1), 8, 16, 4.0),  # every input read: c = 64/16
        (nn.Conv2d(4, 8, 1, stride=2), 8, 16, 1.0),  # a 1×1 stride-2 conv reads a quarter
        (nn.Conv2d(4, 8, 3, padding=2, dilation=2), 8, 64, 1.0),
        (nn.Conv2d(4, 8, 3, padding=1, groups=4), 8, 64, 1.0),
        (nn.Conv1d(4, 8, 3, stride=2), 9, 4, 9 / 4),
        (nn.Conv3d(4, 8, 3, padding=1), 4, 64, 1.0),
    ],
)
def test_conv_geometry(conv, hw, s, c):
    dims = conv.weight.dim() - 2
    # conv -> BN -> ReLU -> conv3x3(same) so the conv's input factor is observable
    nxt = type(conv)(8, 2, 3, padding=1, bias=False)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](8, affine=False)
    net = nn.Sequential(conv, bn, nn.ReLU(), nxt)
    randomize(net, 9)
    plan = fxbackmatch.prepare(net, torch.randn((2, 4) + (hw,) * dims), compile=False, conventions="paper")
    rec = plan.layers[0]
    assert rec.s == s and rec.c == pytest.approx(c)
    s_out = plan.layers[1].s
    assert s_out == math.prod(plan.layers[1].output_shape[2:]) == s
    assert plan.layers[1].c == pytest.approx(1.0)  # the 3×3 'same' conv reads all inputs
    # m at the conv's output: ||W_nxt,col||² / c_nxt (=1), then the BN divides by ||W_conv,row||²
    m = coln(nxt.weight) / rown(conv.weight)
    sc = plan.scales()
    assert sc["3.weight"] == pytest.approx(1 / s_out, rel=1e-9)
    assert plan.layers[0].m == pytest.approx(m, rel=1e-9)
    assert sc["0.weight"] == pytest.approx(1 / (m * s), rel=1e-9)
    assert sc["0.bias"] == sc["0.weight"]


def test_linear_on_3d_input_shares_over_tokens():
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))
    randomize(net, 1)
    plan = fxbackmatch.prepare(net, torch.randn(2, 7, 6), compile=False, conventions="paper")
    assert [r.s for r in plan.layers] == [7.0, 7.0]
    s = plan.scales()
    # no norm between them: the top layer's input has E[a²] = ‖W0‖²row (eq. 13, E aaᵀ ≈ E[a²]·I)
    assert s["2.weight"] == pytest.approx(1 / (7 * rown(net[0].weight)), rel=1e-9)
    assert s["0.weight"] == pytest.approx(1 / (7 * coln(net[2].weight)), rel=1e-9)


def test_prepare_does_not_run_user_forward_hooks():
    net = lenet_bn()
    seen = []
    h1 = net[0].register_forward_hook(lambda m, a, out: seen.append(out))
    h2 = net.register_forward_pre_hook(lambda m, a: seen.append(a))
    fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    assert seen == []
    net(torch.randn(2, 3, 32, 32))
    assert len(seen) == 2  # the hooks are back
    h1.remove()
    h2.remove()


def test_sumsq_many_against_float64_sums():
    """The runtime's norm reader (BLAS dot for CPU float32/64, ``_foreach_norm`` otherwise)
    against plain float64 sums: contiguous, transposed (not contiguous), float64, bfloat16,
    empty and scalar tensors."""
    from fxbackmatch.runtime.norms import sumsq_many

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(64, 3, 5, 5, generator=g), torch.randn(30, 70, generator=g).t(),
          torch.randn(1000, dtype=torch.float64, generator=g), torch.randn(40, 40, generator=g).bfloat16(),
          torch.zeros(0), torch.tensor(3.0)]
    got = sumsq_many(ts)
    for t, s in zip(ts, got):
        assert s.dtype == torch.float64 and s.dim() == 0
        want = t.double().square().sum()
        torch.testing.assert_close(s, want, rtol=1e-6 if t.dtype != torch.bfloat16 else 1e-3, atol=0.0)

def test_compiled_cpu_sumsq_is_a_float32_cascade_within_2e_6_of_float64():
    """Compiled on the CPU, ``sumsq`` of a float32 tensor sums in float32 (inductor's cascade
    sums; widening each element made the update 1.3× on AVX-512), with no float64 conversion in
    its kernel (the float64 path has one): within 2e-6 of the float64
    sum on 3 M elements spanning six decades and on weight-like data (seen: 5.6e-7 and 4.7e-7,
    where the BLAS dot of ``sumsq_many`` gives 1.9e-7 and 1.2e-6), and float64 tensors keep
    float64 (a value float32 cannot hold would show)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from fxbackmatch.runtime.norms import sumsq

    g = torch.Generator().manual_seed(0)
    fn = torch.compile(lambda t: sumsq(t), fullgraph=True, dynamic=False)
    widen = re.compile(r"at::vec::convert<double")  # each vector of elements widened in the loop
    _, code32 = run_and_get_code(fn, torch.randn(4096, generator=g))
    _, code64 = run_and_get_code(torch.compile(lambda t: t.to(torch.float64).square().sum()), torch.randn(4096))
    assert not any(widen.search(c) for c in code32) and any(widen.search(c) for c in code64)
    for x in (torch.randn(3_000_000, generator=g) * torch.logspace(-3, 3, 3_000_000),
              torch.randn(512, 512, 3, 3, generator=g) * 0.02):
        got, want = fn(x), x.double().square().sum()
        assert got.dtype == torch.float64 and got.dim() == 0
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    x64 = torch.full((1000,), 1 + 2**-40, dtype=torch.float64)
    torch.testing.assert_close(fn(x64), x64.square().sum(), rtol=1e-15, atol=0)
    assert float(fn(x64)) != 1000.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_cpu_sumsq_of_half_precision_adds_in_float32(dtype):
    """Compiled on the CPU, ``sumsq`` of a bfloat16/float16 tensor widens each element to
    float32 and adds in inductor's cascade sums, not in float64 (4.4–4.7× slower: the widening
    the control kernel below shows), and lands within 1e-5 of the float64 sum of the same
    values (seen up to 3.4e-6: the squares are exact in float32, but their additions round with
    a bias that float32 weights' squares do not give)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from fxbackmatch.runtime.norms import sumsq

    g = torch.Generator().manual_seed(1)
    widen = re.compile(r"at::vec::convert<double")  # each vector of elements widened in the loop
    fn = torch.compile(lambda t: sumsq(t), fullgraph=True, dynamic=False)
    x = (torch.randn(512, 512, 3, 3, generator=g) * 0.02).to(dtype)
    got, code = run_and_get_code(fn, x)
    _, control = run_and_get_code(torch.compile(lambda t: t.to(torch.float64).square().sum()), x[:4])
    assert any(widen.search(c) for c in control)  # the old path, which the regex sees
    assert not any(widen.search(c) for c in code) and any("cascade_sum_combine" in c for c in code)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, x.double().square().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["plain", "zero", "inf", "nan"])
def test_host_chain_equals_the_generated_chain(case):
    """On the CPU, large models evaluate the chain on Python floats (``HostChain``): equal
    to the generated ``factors_from_base`` to 1e-12 on ResNet-18's 16 fork stages (with
    ``gamma="exact"``: γ's atoms keep every fork sum symbolic; with ``"one"`` its square
    convs' norms cancel and the sums fold to constants), with a zero, an infinite or a NaN
    norm reaching exactly the same scales."""
    import math

    import torchvision

    from fxbackmatch.runtime.chain import HostChain, _base

    torch.manual_seed(0)
    plan = fxbackmatch.prepare(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), conventions=fxbackmatch.Conventions(gamma="exact"))
    rt, gen = plan._runtime, plan._runtime.gen
    host = HostChain.of(gen)
    assert host is not None and gen.n_stages == 16
    base = _base(rt.weights, [], [rt.buffers[r] for r in rt.stat_refs], gen.stat_inverse, gen.n_grad_sq)
    base[3 if case == "zero" else 5] = {"plain": base[5], "zero": 0.0, "inf": math.inf, "nan": math.nan}[case]
    want = gen.from_base(base, gen.constants_on(torch.device("cpu")))
    got = torch.tensor(host(base.tolist()), dtype=torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-12, atol=0)
    assert case == "plain" or case == "zero" or not fin.all()
