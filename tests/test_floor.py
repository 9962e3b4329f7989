"""The reference floor (``floor="init"``): a weight counts at least as much as at its default
initialization — ``max(sum(W²), numel·v₀)``, ``v₀ = 1/(3·fan_in)`` for torch Linear/Conv (so
``shape[0]/3``), 1 for embeddings, and γ at least 1 with ``gamma="exact"``."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxbackmatch
from fxbackmatch import Conventions
from fxbackmatch.models import lenet_bn

FLOOR = Conventions(floor="init")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(x))


def _scales(net, conventions=FLOOR, compile=False):
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 6, 6), compile=compile, conventions=conventions)
    return plan.scale_tensor()


def test_a_zero_head_has_the_scales_of_a_head_at_its_init_norm():
    """The equivalent network: a head whose sum(W²) is exactly the floor (out/3 = 10/3, the
    expected sum of squares of torch's default init) gives the zero head's scales bit for bit."""
    torch.manual_seed(0)
    zero = _Net()
    with torch.no_grad():
        zero.head.weight.zero_()
    at_floor = _Net()
    at_floor.load_state_dict(zero.state_dict())
    with torch.no_grad():
        w = torch.randn(10, 8, dtype=torch.float64)
        at_floor.head.weight.copy_((w * math.sqrt((10 / 3) / float(w.square().sum()))).float())
        at_floor.head.weight.mul_(math.sqrt((10 / 3) / float(at_floor.head.weight.double().square().sum())))
    got, want = _scales(zero), _scales(at_floor)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.isfinite(got).all() and float(got.max()) < 1e3
    paper = _scales(zero, "paper")
    assert float(paper.max()) > 1e9  # without the floor the layers below a silent head are unbounded


def test_the_floor_never_binds_above_the_init_norm_and_the_compiled_chain_agrees():
    torch.manual_seed(1)
    net = _Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(2.0)  # every weight above its default-init norm
    torch.testing.assert_close(_scales(net), _scales(net, "paper"), rtol=0, atol=0)
    with torch.no_grad():
        net.body[3].weight.mul_(1e-4)  # one weight far below: the floor binds there only
    eager, compiled = _scales(net), _scales(net, compile=True)
    torch.testing.assert_close(eager, compiled, rtol=1e-6, atol=0)  # compiled CPU sums: float32 cascade
    # by hand: the floor reads body.3's ΣW² as 8/3, which enters body.3's own scale (through the
    # BN's row norm) and cancels everywhere below (the BN's row norm against the column norm it
    # passes down): body.3's weight and bias scale by (8/3)/ΣW², every other target is the paper's
    ratio = (8 / 3) / float(net.body[3].weight.detach().double().square().sum())
    targets = fxbackmatch.prepare(net, torch.randn(2, 3, 6, 6), compile=False, conventions=FLOOR).targets
    want = torch.tensor([ratio if n.startswith("body.3.") else 1.0 for n in targets], dtype=torch.float64)
    assert sorted(targets) == sorted(n for n, _ in net.named_parameters())
    torch.testing.assert_close(eager / _scales(net, "paper"), want, rtol=1e-9, atol=0)


def test_the_floor_is_what_the_report_and_code_say():
    plan = fxbackmatch.prepare(lenet_bn(), torch.randn(2, 3, 32, 32), compile=False, conventions=FLOOR)
    assert 'C["lo"]' in plan.code and "max(Σ" in plan.code
    lo = plan._runtime.gen.constants["lo"]
    refs = plan._runtime.gen.weight_refs
    shapes = dict((n, p.shape) for n, p in lenet_bn().named_parameters())
    assert [float(v) for v in lo[: len(refs)]] == pytest.approx([shapes[r][0] / 3 for r in refs])


def test_gamma_exact_counts_gamma_at_least_one():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    with torch.no_grad():
        net[1].weight.fill_(1e-3)  # a near-zero γ (a zero-initialized last BN of a block)
    exact = Conventions(gamma="exact")
    one = fxbackmatch.prepare(net, torch.randn(2, 3, 6, 6), compile=False, conventions=Conventions(floor="init")).scale_tensor()
    floored = fxbackmatch.prepare(net, torch.randn(2, 3, 6, 6), compile=False,
                                  conventions=exact.replace(floor="init")).scale_tensor()
    raw = fxbackmatch.prepare(net, torch.randn(2, 3, 6, 6), compile=False, conventions=exact).scale_tensor()
    torch.testing.assert_close(floored, one, rtol=1e-12, atol=0)  # γ² = 1e-6 counts as 1
    assert float(raw.max()) > 1e5 * float(floored.max()) / 10
