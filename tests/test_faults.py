"""Faults and odd inputs (issue 7): non-finite values, moved/converted models, wrappers,
frozen and tied parameters, channels_last, low precision, random nets."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxbackmatch
from fxbackmatch.models import lenet_bn


def _vec(plan):
    s = plan.scales()
    return torch.tensor([s[n] for n in plan.targets], dtype=torch.float64)


def test_nan_gradient_is_not_hidden_nor_spread():
    torch.manual_seed(0)
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    net(torch.randn(4, 3, 32, 32)).sum().backward()
    net[9].weight.grad[0, 0] = float("nan")
    net[12].weight.grad[0, 0] = float("inf")
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    s = plan.scales()
    plan.rescale_grads_()
    assert torch.isnan(net[9].weight.grad[0, 0]) and torch.isinf(net[12].weight.grad[0, 0])
    for n, p in net.named_parameters():
        finite = torch.isfinite(before[n])
        torch.testing.assert_close(p.grad[finite], before[n][finite] * s[n])
    assert all(math.isfinite(v) for v in s.values())  # scales depend on weights only


def test_non_finite_weight_raises_in_eager_paths():
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    with torch.no_grad():
        net[12].weight[0, 0] = float("inf")
    for call in (plan.scales, plan.check_finite, lambda: str(plan)):
        with pytest.raises(fxbackmatch.NonFiniteWeightError, match="'12.weight'"):
            call()
    v = plan.scale_tensor()  # no host sync: reported as non-finite values instead
    assert not torch.isfinite(v).all() and torch.isfinite(v[plan.targets.index("15.weight")])


def test_model_converted_with_to_is_followed_with_at_most_one_recompile():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    plan = fxbackmatch.prepare(net, torch.randn(4, 6))
    plan.scale_tensor()
    g0 = counters["stats"]["unique_graphs"]
    net.double()
    v = plan.scale_tensor()
    # small models compile the norms too (one recompile for the new dtype); large ones compile
    # only the float64 chain (none)
    assert counters["stats"]["unique_graphs"] <= g0 + 1
    g1 = counters["stats"]["unique_graphs"]
    for _ in range(3):
        plan.scale_tensor()
    assert counters["stats"]["unique_graphs"] == g1
    torch.testing.assert_close(v, _vec(plan), rtol=1e-9, atol=0)
    net(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    g = net[0].weight.grad.clone()
    plan.rescale_grads_()
    assert net[0].weight.grad.dtype == torch.float64
    torch.testing.assert_close(net[0].weight.grad, g * plan.scales()["0.weight"])


def test_a_bfloat16_model_gets_the_float64_reference_scales():
    """A model in bfloat16 on the CPU through a compiled plan (whose norms ``norms.sumsq``
    adds in float32): its scales equal the eager float64 reference over the same bfloat16
    values to 1e-5 under the paper's conventions (every scale a product of norms), before and
    after a weight changes; the rescaled gradients are the bfloat16 gradients times those
    scales (to one bfloat16 rounding)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(32 * 12 * 12, 10)).to(torch.bfloat16)
    x = torch.randn(8, 3, 16, 16, dtype=torch.bfloat16)
    plan = fxbackmatch.prepare(net, x, conventions="paper")
    before = plan.scale_tensor()
    torch.testing.assert_close(before, _vec(plan), rtol=1e-5, atol=0)
    with torch.no_grad():
        net[2].weight.mul_(2)  # the norms are read: conv 2's and the layers below it move
    after = plan.scale_tensor()
    torch.testing.assert_close(after, _vec(plan), rtol=1e-5, atol=0)
    assert ((after - before).abs() > 1e-3 * before).sum() >= 2
    nn.functional.cross_entropy(net(x).float(), torch.randint(0, 10, (8,))).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    plan.rescale_grads_()
    for n, p in net.named_parameters():
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad, grads[n] * plan.scales()[n], rtol=1e-2, atol=0)


def test_wrapped_models_give_the_same_plan():
    import torch.distributed as dist

    torch.manual_seed(0)
    net = lenet_bn()
    x = torch.randn(2, 3, 32, 32)
    ref = fxbackmatch.prepare(net, x, compile=False)
    via_compile = fxbackmatch.prepare(torch.compile(net), x, compile=False)
    assert via_compile.scales() == ref.scales()
    assert [r.name for r in via_compile.layers] == [r.name for r in ref.layers]
    if not dist.is_available():
        pytest.skip("torch.distributed is not available: the DDP half is not checked")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(net)
        via_ddp = fxbackmatch.prepare(ddp, x, compile=False)
        assert via_ddp.scales() == ref.scales() and via_ddp.state_dict() == ref.state_dict()
    finally:
        dist.destroy_process_group()


def test_frozen_parameters_keep_their_factor_in_the_chain():
    torch.manual_seed(0)
    net = lenet_bn()
    ref = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False).scales()
    net[12].weight.requires_grad_(False)
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    s = plan.scales()
    assert "12.weight" not in s and "12.weight" not in plan.targets and plan.uncovered == ()
    for n in ("0.weight", "4.weight", "9.weight", "15.weight"):
        assert s[n] == ref[n]
    assert "frozen weight" in plan.layers[3].notes


def test_channels_last_and_low_precision():
    torch.manual_seed(0)
    net = lenet_bn()
    ref = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False).scales()
    cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    s = fxbackmatch.prepare(cl, x, compile=False).scales()
    for n in ref:
        assert s[n] == pytest.approx(ref[n], rel=1e-12)
    for dtype in (torch.bfloat16, torch.float16):
        low = copy.deepcopy(net).to(dtype)
        plan = fxbackmatch.prepare(low, torch.randn(2, 3, 32, 32, dtype=dtype), compile=False)
        v = plan.scale_tensor()
        torch.testing.assert_close(v, _vec(plan), rtol=1e-9, atol=0)  # both read the rounded weights
        assert torch.isfinite(v).all()
        low[0].weight.grad = torch.ones_like(low[0].weight)
        plan.rescale_grads_()
        assert low[0].weight.grad.dtype == dtype
        torch.testing.assert_close(low[0].weight.grad.float(), torch.full_like(low[0].weight, float(v[0])).to(dtype).float())


def test_plan_state_loads_without_pickle(tmp_path):
    """A plan's state dict is primitives and tensors only: it loads with ``weights_only=True``
    (no code runs on load) and restores the plan."""
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    path = tmp_path / "plan.pt"
    torch.save(plan.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state == plan.state_dict()  # the round trip keeps every entry
    fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False).load_state_dict(state)


LAYERS = st.lists(st.sampled_from(["conv", "conv_s2", "dwconv", "pool", "avgpool", "relu", "gelu", "bn", "res"]), min_size=1, max_size=6)


def _random_net(spec: list[str], width: int, hw: int) -> tuple[nn.Module, int]:
    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return x + F.relu(self.bn(self.conv(x)))

    layers: list[nn.Module] = []
    c, side = 3, hw
    for kind in spec:
        if kind == "conv":
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            c = width
        elif kind == "conv_s2" and side >= 4:
            layers.append(nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False))
            c, side = width, side // 2
        elif kind == "dwconv":
            layers.append(nn.Conv2d(c, c, 3, padding=1, groups=c))
        elif kind in ("pool", "avgpool") and side >= 2:
            layers.append(nn.MaxPool2d(2) if kind == "pool" else nn.AvgPool2d(2))
            side //= 2
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "gelu":
            layers.append(nn.GELU())
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c, affine=bool(len(layers) % 2)))
        elif kind == "res":
            layers.append(Res(c))
    layers += [nn.Flatten(), nn.Linear(c * side * side, 4)]
    return nn.Sequential(*layers), side


@settings(max_examples=25, deadline=None, derandomize=True)
@given(spec=LAYERS, width=st.integers(2, 6), hw=st.sampled_from([4, 8]), seed=st.integers(0, 1000))
def test_fuzz_generated_code_agrees_with_reference(spec, width, hw, seed):
    torch.manual_seed(seed)
    net, _ = _random_net(spec, width, hw)
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, hw, hw), compile=False)
    v = plan.scale_tensor()
    assert torch.isfinite(v).all() and (v > 0).all()
    torch.testing.assert_close(v, _vec(plan), rtol=1e-9, atol=0)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(spec=LAYERS, seed=st.integers(0, 1000))
def test_fuzz_compiled_agrees_with_reference(spec, seed):
    torch.manual_seed(seed)
    net, _ = _random_net(spec, 4, 8)
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 8, 8))
    v = plan.scale_tensor()
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, _vec(plan), rtol=1e-6, atol=0)
