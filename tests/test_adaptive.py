"""Step-length mode for adaptive optimizers (issue 12), against hand-written Adam/AdamW/LAMB."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fxbackmatch
from fxbackmatch.apply.length import rescale_updates_
from fxbackmatch.models import lenet_bn

STEPS = 4


def _setup(seed=0, rule="backmatch"):
    """float64 throughout: Adam amplifies rounding where a gradient is near 0 (``m/√v`` of a
    1e-9 gradient flips with its last bits), so float32 runs of equal maths part after a step."""
    torch.manual_seed(seed)
    net = lenet_bn().double()
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    plan = fxbackmatch.prepare(net, x[:2], compile=False, rule=rule, conventions="paper")
    ref = lenet_bn().double()
    ref.load_state_dict(net.state_dict())
    ref_plan = fxbackmatch.prepare(ref, x[:2], compile=False, rule=rule, conventions="paper")
    return net, plan, ref, ref_plan, x, y


def _adam_hand(ref, ref_plan, x, y, *, lr, betas, eps, wd, decoupled, target_of, steps=STEPS):
    """A plain loop: Adam(W)'s update written out, then each covered layer's update rescaled
    to ``target_of(name, W, m, g, scale)`` (length) by hand."""
    b1, b2 = betas
    m = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for t in range(1, steps + 1):
        for p in ref.parameters():
            p.grad = None
        F.cross_entropy(ref(x), y).backward()
        scales = ref_plan.scales()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                g = p.grad if decoupled or not wd else p.grad + wd * p
                m[n].mul_(b1).add_(g, alpha=1 - b1)
                v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                # torch's own order of operations (float32 rounding matches)
                denom = v[n].sqrt() / math.sqrt(1 - b2**t) + eps
                u = -(lr / (1 - b1**t)) * m[n] / denom
                if decoupled:
                    u = u - lr * wd * p
                if n in scales:
                    length = float(u.double().norm())
                    want = target_of(n, p, m[n], p.grad, scales[n], lr, b1)
                    if length > 0 and want > 0:
                        u = u * (want / length)
                p.add_(u)


def _run(net, opt, x, y, steps=STEPS, closure=False):
    for _ in range(steps):
        if closure:
            def c():
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss
            opt.step(c)
        else:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()


def _bm_momentum(n, w, m, g, scale, lr, b1):
    return lr * scale * float(m.double().norm()) / (1 - b1)


def _bm_grad(n, w, m, g, scale, lr, b1):
    return lr * scale * float(g.double().norm())


@pytest.mark.parametrize(
    "opt_cls, wd, decoupled, target, want",
    [
        (torch.optim.Adam, 0.0, False, "momentum", _bm_momentum),
        (torch.optim.AdamW, 0.05, True, "momentum", _bm_momentum),
        (torch.optim.Adam, 1e-3, False, "grad", _bm_grad),
    ],
    ids=["adam-momentum", "adamw-momentum", "adam-l2-grad"],
)
def test_length_mode_matches_hand_loop(opt_cls, wd, decoupled, target, want):
    net, plan, ref, ref_plan, x, y = _setup()
    opt = opt_cls(net.parameters(), lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    plan.attach(opt, mode="length", target=target)
    _run(net, opt, x, y)
    _adam_hand(ref, ref_plan, x, y, lr=2e-3, betas=(0.9, 0.99), eps=1e-8, wd=wd, decoupled=decoupled, target_of=want)
    for (n, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)


def test_lamb_is_adamw_with_the_weight_norm_trust_ratio():
    """You et al. 2019, Algorithm 2: W ← W − η·‖W‖/‖r + λW‖·(r + λW); ratio 1 for ‖W‖ = 0
    (the zero-initialized bias; BN's own bias starts at 0 too)."""
    torch.manual_seed(2)

    def mlp():
        net = torch.nn.Sequential(
            torch.nn.Linear(6, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
        ).double()
        with torch.no_grad():
            net[3].bias.zero_()
        return net

    net = mlp()
    ref = mlp()
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    plan = fxbackmatch.prepare(net, x, compile=False, rule="lamb", conventions="paper")
    ref_plan = fxbackmatch.prepare(ref, x, compile=False, rule="lamb", conventions="paper")
    assert "3.bias" in plan.targets
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)
    plan.attach(opt, mode="length")
    _run(net, opt, x, y)

    def lamb(n, w, m, g, scale, lr, b1):
        return lr * float(w.double().norm())

    _adam_hand(ref, ref_plan, x, y, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.01, decoupled=True, target_of=lamb)
    for (n, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)


def test_lamb_needs_the_length_mode():
    net, plan, *_ = _setup(rule="lamb")
    with pytest.raises(ValueError, match="mode='length'"):
        plan.attach(torch.optim.AdamW(net.parameters()))


def test_length_mode_on_plain_sgd_is_the_gradient_rescale():
    """SGD without momentum: u = −lr·g, and the length lr·scale·‖g‖ gives −lr·scale·g —
    the gradient mode's step, computed another way."""
    net, plan, ref, ref_plan, x, y = _setup(3)
    plan.attach(torch.optim.SGD(net.parameters(), lr=0.05), mode="length", target="grad")
    ref_plan.attach(torch.optim.SGD(ref.parameters(), lr=0.05))
    opt_a = plan._attached[0].optimizer
    opt_b = ref_plan._attached[0].optimizer
    _run(net, opt_a, x, y, steps=3)
    _run(ref, opt_b, x, y, steps=3)
    for (n, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)


def test_length_mode_with_a_closure_equals_the_plain_step():
    net, plan, ref, ref_plan, x, y = _setup(4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    plan.attach(opt, mode="length")
    ref_plan.attach(ref_opt, mode="length")
    _run(net, opt, x, y, steps=3, closure=True)
    _run(ref, ref_opt, x, y, steps=3)
    for (n, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)


def test_length_mode_changes_adams_steps_by_the_scales_ratios():
    """The measurement of the issue: a gradient rescale leaves Adam's per-layer step
    unchanged; the length mode makes the ratio between two layers' steps follow the rule."""
    net, plan, ref, ref_plan, x, y = _setup(5)
    with pytest.warns(fxbackmatch.AdaptiveOptimizerWarning, match="mode='length'"):
        ref_plan.attach(torch.optim.Adam(ref.parameters(), lr=1e-3))
    plain = lenet_bn().double()
    plain.load_state_dict(ref.state_dict())
    w0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    _run(ref, ref_plan._attached[0].optimizer, x, y, steps=1)
    _run(plain, torch.optim.Adam(plain.parameters(), lr=1e-3), x, y, steps=1)
    for (n, a), b in zip(ref.named_parameters(), plain.parameters()):
        d_bm, d_plain = (a - w0[n]).norm(), (b - w0[n]).norm()
        assert abs(float((d_bm / d_plain).detach()) - 1) < 1e-2, n  # cancelled (to Adam's eps)

    scales = plan.scales()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    plan.attach(opt, mode="length", target="grad")
    F.cross_entropy(net(x), y).backward()
    gnorm = {n: float(p.grad.double().norm()) for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        if n in scales:
            step = float((p - w0[n]).detach().double().norm())
            assert step == pytest.approx(1e-3 * scales[n] * gnorm[n], rel=1e-6), n


def test_rescale_updates_core_against_reference():
    torch.manual_seed(0)
    before = [torch.randn(5, 3), torch.randn(7), torch.randn(2)]
    after = [b + 0.1 * torch.randn_like(b) for b in before]
    after[2] = before[2].clone()  # zero update: kept
    targets = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)  # target 0: kept
    params = [a.clone() for a in after]
    ratios = rescale_updates_(params, before, targets)
    u0 = after[0] - before[0]
    torch.testing.assert_close(params[0], before[0] + u0 * (0.5 / u0.norm()))
    torch.testing.assert_close(params[1], after[1])
    torch.testing.assert_close(params[2], after[2])
    assert float(params[0].sub(before[0]).norm()) == pytest.approx(0.5, rel=1e-6)
    assert ratios[1].item() == 1.0 and ratios[2].item() == 1.0
    assert math.isclose(ratios[0].item(), 0.5 / float(u0.double().norm()), rel_tol=1e-6)


class _Ops(TorchDispatchMode):
    """Every aten op dispatched inside that is not a view, and the operands of each
    ``_foreach_lerp_``."""

    def __init__(self):
        super().__init__()
        self.ops, self.lerps, self.subs = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:  # views and detach launch nothing
            self.ops.append(func)
        if func.overloadpacket is torch.ops.aten._foreach_lerp_:
            self.lerps.append(args)
        if func.overloadpacket is torch.ops.aten._foreach_sub:  # the updates formed for their norms
            self.subs.append([t.numel() for t in args[0]])
        return func(*args, **(kwargs or {}))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: ``empty_like`` keeps exactly such a tensor's strides."""
    return torch.empty_like(t).stride() == t.stride()


def _fast_route(lists) -> list[bool]:
    """Per tensor of a foreach call: whether CUDA's multi-tensor kernel takes it — the test of
    ATen's ``check_fast_path_restrictions`` (ForeachUtils.h): every list's tensor i with the
    same sizes, strides, dtype and device as the first list's, all non-overlapping and dense.
    A list of 0-d weights fails it for every tensor that is not 0-d (a kernel per tensor)."""
    if not all(isinstance(x, (list, tuple)) for x in lists):
        return [False] * len(lists[0])
    return [all(t.shape == ts[0].shape and t.stride() == ts[0].stride() and t.dtype == ts[0].dtype
                and t.device == ts[0].device and _dense(t) for t in ts)
            for ts in zip(*lists)]


def test_spread_length_step_equals_the_per_tensor_lerp_on_foreachs_fast_path(monkeypatch):
    """The length step as it runs on CUDA (``flat``: spread lerp weights, forced here on the
    CPU) against the per-tensor lerp: bitwise the same weights over four AdamW steps, on a
    channels-last conv weight and a non-dense linear weight; every dense weight is lerped by a
    call on foreach's fast path (the non-dense one alone, as it must be), none before. The
    updates' norms are formed a chunk at a time (``UPDATE_CHUNK`` at 3000 elements: LeNet's
    weights, in order, as 450 + 2400, then 48000, 10080 and 840 alone), which changes no bit."""
    from fxbackmatch.apply import length

    monkeypatch.setattr(length, "UPDATE_CHUNK", 3000)
    net, plan, ref, ref_plan, x, y = _setup(7)
    for m in (net, ref):
        with torch.no_grad():
            m[0].weight.data = m[0].weight.data.contiguous(memory_format=torch.channels_last)
            w = m[12].weight.data
            m[12].weight.data = torch.cat([w, w], 1)[:, ::2]  # strides (240, 2): not dense
    assert not _dense(net[12].weight) and _dense(net[0].weight)
    runs = []
    for model, p, flat in ((net, plan, True), (ref, ref_plan, False)):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        h = p.attach(opt, mode="length")
        h.flat = flat
        with _Ops() as ops:
            _run(model, opt, x, y)
        # ATen takes a whole call to the fast path or none of it: (fast?, tensors) per call
        runs.append(sorted((all(_fast_route(call)), len(call[0])) for call in ops.lerps))
        chunks = ops.subs[:len(ops.subs) // 4]  # one step's
        assert list(map(sum, chunks)) == [450 + 2400, 48000, 10080, 840]  # ≤ 3000, or one tensor alone
    assert runs[0] == [(False, 1)] * 4 + [(True, 4)] * 4  # per step: 4 dense weights, then 1 not
    assert runs[1] == [(False, 5)] * 4
    for (n, a), b in zip(net.named_parameters(), ref.parameters()):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_rescale_updates_dispatches_as_many_ops_for_any_number_of_tensors():
    """Off the CPU's BLAS path (bfloat16 here; every dtype on CUDA) the core is a fixed number
    of dispatched ops — foreach norms, one stacked square, spread weights, one lerp on the fast
    path — for 3 or 30 tensors (the per-tensor conversion before it dispatched 2 more per
    tensor); the result is bitwise the per-tensor lerp's, and each ratio the target over the
    float64 norm of the bfloat16 update (foreach_norm accumulates it in float32)."""
    counts = []
    for n in (3, 30):
        g = torch.Generator().manual_seed(n)
        before = [torch.randn(3 + k % 4, 5, generator=g).bfloat16() for k in range(n)]
        after = [b + 0.1 * torch.randn(b.shape, generator=g).bfloat16() for b in before]
        targets = torch.rand(n, generator=g, dtype=torch.float64)
        plain = [a.clone() for a in after]
        want = rescale_updates_(plain, before, targets)
        spread = [a.clone() for a in after]
        with _Ops() as ops:
            got = rescale_updates_(spread, before, targets, cache={})
        counts.append(len(ops.ops))
        assert len(ops.lerps) == 1 and all(_fast_route(ops.lerps[0]))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for a, b in zip(spread, plain):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        length = torch.stack([(a - b).double().norm() for a, b in zip(after, before)])  # u in bfloat16
        ok = length > 0
        assert ok.sum() > n // 2
        torch.testing.assert_close(got[ok], (targets / length)[ok], rtol=1e-5, atol=0)
    assert counts[0] == counts[1] < 40, counts


def test_length_mode_refuses_gradient_weight_decay_and_attaching_twice():
    net, plan, *_ = _setup()
    opt = torch.optim.AdamW(net.parameters())
    with pytest.raises(ValueError, match="to the optimizer"):
        plan.attach(opt, weight_decay=1e-4, mode="length")
    h = plan.attach(opt, mode="length")
    with pytest.raises(fxbackmatch.AlreadyAttachedError):
        plan.attach(opt, mode="length")
    h.remove()
    plan.attach(opt, mode="length")


def test_compiled_length_step_equals_the_eager_core(monkeypatch):
    """The compiled per-tensor kernel (plan compiled) against the eager foreach core, with a
    channels-last weight taking the strided path."""
    import fxbackmatch.apply.length as length

    monkeypatch.setattr(length, "SMALL", 2000)  # LeNet's three largest weights take the kernel
    calls = []
    real = length._compiled_step_one
    monkeypatch.setattr(length, "_compiled_step_one", lambda: (calls.append(1), real())[1])
    net, plan, ref, ref_plan, x, y = _setup(6)
    with torch.no_grad():
        net[0].weight.data = net[0].weight.data.contiguous(memory_format=torch.channels_last)
    fast = fxbackmatch.prepare(net, x[:2], compile=True, conventions="paper")
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=2e-3, weight_decay=0.01)
    h = fast.attach(opt, mode="length")
    ref_plan.attach(ref_opt, mode="length")
    _run(net, opt, x, y, steps=3)
    _run(ref, ref_opt, x, y, steps=3)
    assert not net[0].weight.is_contiguous() and calls
    for (n, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)
    assert set(h.last_ratios) == set(fast.targets) and all(r > 0 for r in h.last_ratios.values())
