"""Generated/compiled rescale, optimizer integration, AMP, persistence (issue 3)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.models import lenet_bn

# these tests check that a gradient rescale rides on every optimizer exactly; on Adam & co it
# is cancelled, which the warning says (tests/test_adaptive.py checks the warning itself)
pytestmark = pytest.mark.filterwarnings("ignore::fxbackmatch.AdaptiveOptimizerWarning")


def small_net() -> nn.Module:
    """Biases, affine BN, a pre-activation residual fork whose factor depends on the weights
    (``m_f = m_y·‖W_cv2‖²col``): every kind of atom the pass generates."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.cv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 4 * 4, 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.cv1(x)))
            x = x + self.cv2(F.relu(self.bn2(x)))
            x = F.max_pool2d(x, 2)
            return self.fc(x.flatten(1))

    return Net()


def batches(n: int, seed: int = 0, shape=(8, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)) for _ in range(n)]


def ref_vector(plan) -> torch.Tensor:
    s = plan.scales()
    return torch.tensor([s[n] for n in plan.targets], dtype=torch.float64)


@pytest.fixture(scope="module")
def compiled_plan():
    """One compiled plan shared by the tests below (compiling costs seconds on CPU)."""
    torch.manual_seed(0)
    net = small_net()
    plan = fxbackmatch.prepare(net, torch.randn(8, 3, 8, 8))
    return net, plan


def test_compiled_matches_eager_reference(compiled_plan):
    net, plan = compiled_plan
    got = plan.scale_tensor()
    torch.testing.assert_close(got, ref_vector(plan), rtol=1e-6, atol=0)
    eager = fxbackmatch.prepare(net, torch.randn(8, 3, 8, 8), compile=False)
    torch.testing.assert_close(eager.scale_tensor(), ref_vector(plan), rtol=1e-6, atol=0)
    assert "def factors(" in plan.code and "logsumexp" in plan.code  # the fork


def test_no_recompile_over_steps_and_none_grads(compiled_plan):
    from torch._dynamo.utils import counters

    net, plan = compiled_plan
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    h = plan.attach(opt)
    for x, y in batches(3):  # warm up
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    before = dict(counters["stats"])
    for i, (x, y) in enumerate(batches(100, seed=1)):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if i % 3 == 0:
            net.fc.bias.grad = None
        if i % 5 == 0:
            net.cv1.weight.grad = None
        opt.step()
    after = dict(counters["stats"])
    h.remove()
    assert after.get("unique_graphs", 0) == before.get("unique_graphs", 0)
    torch.testing.assert_close(plan.scale_tensor(), ref_vector(plan), rtol=1e-6, atol=0)


def _train(net, opt_fn, steps, plan=None, by_hand=False, wd=0.0):
    opt = opt_fn(net.parameters())
    handle = plan.attach(opt, weight_decay=wd) if (plan is not None and not by_hand) else None
    for x, y in batches(steps, shape=(8, 3, 32, 32)):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if by_hand:
            scales = plan.scales()  # eager reference, before the step, from current weights
            with torch.no_grad():
                for n, p in net.named_parameters():
                    if p.grad is not None:
                        p.grad.add_(p, alpha=wd)
                        p.grad.mul_(torch.tensor(scales[n], dtype=torch.float64).to(p.grad.dtype))
        opt.step()
    if handle:
        handle.remove()
    return net


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
    "sgd-nesterov-foreach": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, foreach=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, foreach=False),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_attach_equals_scaling_by_hand(name):
    torch.manual_seed(1)
    a = lenet_bn()
    b = copy.deepcopy(a)
    pa = fxbackmatch.prepare(a, torch.randn(2, 3, 32, 32), compile=False)
    pb = fxbackmatch.prepare(b, torch.randn(2, 3, 32, 32), compile=False)
    _train(a, OPTIMIZERS[name], 3, pa, wd=5e-4)
    _train(b, OPTIMIZERS[name], 3, pb, by_hand=True, wd=5e-4)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert not torch.equal(a[0].weight, lenet_bn()[0].weight)


def test_scheduler_state_dict_and_other_hooks_keep_working():
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append(1))
    plan.attach(opt)
    for x, y in batches(4, shape=(4, 3, 32, 32)):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        sched.step()
    assert len(seen) == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.025)
    sd = opt.state_dict()
    assert len(sd["state"]) == 5 and "momentum_buffer" in sd["state"][0]


def test_onecycle_schedule_on_an_attached_optimizer_equals_the_hand_loop():
    """OneCycleLR rewrites lr (and momentum) every step: the attached run equals a plain
    eager loop that multiplies the gradients by ``plan.scales()`` before each step."""
    torch.manual_seed(2)
    net = lenet_bn()
    ref, init = copy.deepcopy(net), net[0].weight.detach().clone()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    ref_plan = fxbackmatch.prepare(ref, torch.randn(2, 3, 32, 32), compile=False)
    runs = []
    for model, attach in ((net, True), (ref, False)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if attach:
            plan.attach(opt)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=3)
        lrs = []
        for x, y in batches(3, shape=(4, 3, 32, 32)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if not attach:
                scales = ref_plan.scales()
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.grad.mul_(scales[n])
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        runs.append(lrs)
    assert runs[0] == runs[1] and len(set(runs[0])) == 3  # the schedule moved, alike in both
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert not torch.equal(net[0].weight, init)


def test_handle_remove_detaches():
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    h = plan.attach(opt)
    h.remove()
    x, y = batches(1, shape=(4, 3, 32, 32))[0]
    F.cross_entropy(net(x), y).backward()
    g = net[0].weight.grad.clone()
    opt.step()
    assert torch.equal(net[0].weight.grad, g)


def test_amp_bf16_autocast_with_grad_scaler():
    torch.manual_seed(3)
    a = lenet_bn()
    b = copy.deepcopy(a)
    pa = fxbackmatch.prepare(a, torch.randn(2, 3, 32, 32), compile=False)
    pb = fxbackmatch.prepare(b, torch.randn(2, 3, 32, 32), compile=False)
    oa = torch.optim.SGD(a.parameters(), lr=0.02, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.02, momentum=0.9)
    pa.attach(oa)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in batches(2, shape=(4, 3, 32, 32)):
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            if net is a:
                scaler.scale(loss).backward()
                scaler.step(opt)  # unscale_, then the pre-hook rescales unscaled grads
            else:
                loss.backward()
                s = pb.scales()
                with torch.no_grad():
                    for n, p in net.named_parameters():
                        p.grad.mul_(s[n])
                opt.step()
        scaler.update()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # a step the scaler skips (inf gradient) stays skipped
    before = [p.clone() for p in a.parameters()]
    oa.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(a(x), y)
    scaler.scale(loss).backward()
    a[9].weight.grad[0, 0] = float("inf")
    scaler.step(oa)
    for p, q in zip(a.parameters(), before):
        assert torch.equal(p, q)


def test_plan_state_dict_and_mismatch():
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    sd = plan.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)
    plan2 = fxbackmatch.prepare(lenet_bn(), torch.randn(2, 3, 32, 32), compile=False)
    plan2.load_state_dict(sd2)
    other = fxbackmatch.prepare(lenet_bn(num_classes=7), torch.randn(2, 3, 32, 32), compile=False)
    with pytest.raises(fxbackmatch.PlanMismatchError, match="different model"):
        other.load_state_dict(sd2)
    lars = fxbackmatch.prepare(lenet_bn(), torch.randn(2, 3, 32, 32), compile=False, rule="lars")
    with pytest.raises(fxbackmatch.PlanMismatchError, match="rule"):
        lars.load_state_dict(sd2)


def test_deepcopy_plan_with_model():
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    net2, plan2 = copy.deepcopy((net, plan))
    assert plan2.model is net2
    with torch.no_grad():
        net2[15].weight.mul_(3)
    assert plan2.scales()["12.weight"] == pytest.approx(plan.scales()["12.weight"] / 9, rel=1e-6)
    x, y = batches(1, shape=(4, 3, 32, 32))[0]
    F.cross_entropy(net2(x), y).backward()
    g = net2[12].weight.grad.clone()
    plan2.rescale_grads_()
    torch.testing.assert_close(net2[12].weight.grad, g * plan2.scales()["12.weight"])
    assert net[12].weight.grad is None


def test_resume_from_checkpoint_is_bitwise(tmp_path):
    def run(steps, start=None):
        torch.manual_seed(5)
        net = lenet_bn()
        opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9, nesterov=True)
        plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
        plan.attach(opt, weight_decay=5e-4)
        if start is not None:
            ck = torch.load(start, weights_only=True)
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            plan.load_state_dict(ck["plan"])
        data = batches(6, shape=(8, 3, 32, 32))
        lo = 0 if start is None else 3
        for x, y in data[lo:steps]:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        return net, opt, plan

    full, _, _ = run(6)
    half, opt, plan = run(3)
    path = tmp_path / "ck.pt"
    torch.save({"model": half.state_dict(), "opt": opt.state_dict(), "plan": plan.state_dict()}, path)
    resumed, _, _ = run(6, start=path)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)


def test_compiled_model_and_compiled_plan_train_like_eager():
    torch.manual_seed(2)
    a = small_net()
    b = copy.deepcopy(a)
    ca = torch.compile(a)
    pa = fxbackmatch.prepare(ca)  # the plan sees through the wrapper, completes on first call
    pb = fxbackmatch.prepare(b, torch.randn(8, 3, 8, 8), compile=False)
    oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    pa.attach(oa)
    pb.attach(ob)
    for x, y in batches(3):
        for net, opt in ((ca, oa), (b, ob)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    assert pa.ready and set(pa.scales()) == {n for n, _ in a.named_parameters()}
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_rescale_matches_cpu_reference():
    net = small_net().cuda()
    plan = fxbackmatch.prepare(net, torch.randn(8, 3, 8, 8, device="cuda"))
    got = plan.scale_tensor()
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), ref_vector(plan), rtol=1e-6, atol=0)
    x = torch.randn(8, 3, 8, 8, device="cuda")
    net(x).square().mean().backward()
    g = {n: p.grad.clone() for n, p in net.named_parameters()}
    s = plan.scales()
    plan.rescale_grads_()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, g[n] * s[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "make, wd",
    [
        (lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True), 5e-4),
        (lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9), 0.0),
        (lambda p: torch.optim.Adam(p, lr=1e-3), 5e-4),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), 0.0),
    ],
    ids=["sgd-nesterov-wd", "sgd", "adam-wd", "adamw"],
)
def test_fused_compile_step_equals_attach(make, wd):
    """Eager fused step against attach(); one compiled case below shares the same code."""
    torch.manual_seed(0)
    a = lenet_bn()
    b = copy.deepcopy(a)
    pa = fxbackmatch.prepare(a, torch.randn(2, 3, 32, 32), compile=False)
    pb = fxbackmatch.prepare(b, torch.randn(2, 3, 32, 32), compile=False)
    oa, ob = make(a.parameters()), make(b.parameters())
    step = pa.compile_step(oa, weight_decay=wd)
    pb.attach(ob, weight_decay=wd)
    for i, (x, y) in enumerate(batches(3, shape=(8, 3, 32, 32))):
        for net, st in ((a, step), (b, ob.step)):
            net.zero_grad()
            F.cross_entropy(net(x), y).backward()
            st()
        tol = 1e-6 if i == 0 else 2e-5
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol * float(q.detach().abs().max()))
        # the fused step's applied scales are the attached step's (they were never set)
        assert pa.applied_scales() == pytest.approx(pb.applied_scales(), rel=10 * tol)
    assert set(oa.state_dict()["state"][0]) == set(ob.state_dict()["state"][0])


def test_fused_compile_step_compiled(compiled_plan):
    net, plan = compiled_plan
    ref = copy.deepcopy(net)
    plan_ref = fxbackmatch.prepare(ref, torch.randn(8, 3, 8, 8), compile=False)
    oa = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    ob = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    step = plan.compile_step(oa)
    plan_ref.attach(ob)
    sched = torch.optim.lr_scheduler.StepLR(oa, 1, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(ob, 1, gamma=0.5)
    for x, y in batches(3):
        for m, st in ((net, step), (ref, ob.step)):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            st()
        sched.step()
        sched_b.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


def test_fused_compile_step_rejects_unsupported():
    net = lenet_bn()
    plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
    with pytest.raises(TypeError, match="attach"):
        plan.compile_step(torch.optim.RMSprop(net.parameters()))
    with pytest.raises(ValueError, match="dampening"):
        plan.compile_step(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))


def test_fused_compile_step_refuses_a_model_split_across_devices():
    """The update stacks every weight's sum on one device: a second device (here the meta
    device, as a model moved in part would have it) is refused with what to use instead, at
    construction and when parameters move later, never a device-mismatch error from inductor."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    plan = fxbackmatch.prepare(net, torch.randn(2, 4), compile=False)
    step = plan.compile_step(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    net(torch.randn(5, 4)).sum().backward()
    step()  # one device: runs
    split = torch.optim.SGD([net[0].weight, torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"one device; this optimizer's are on cpu, meta(.|\n)*attach"):
        plan.compile_step(split)
    # a parameter on another device seen at a call (a CPU test cannot move one in place, as
    # cuda:0 -> cuda:1 would, so the step's own list gets it), after the first one moved
    moved = torch.nn.Parameter(torch.zeros(2, device="meta"))
    moved.grad = torch.zeros(2, device="meta")
    step.params = step.params + [moved]
    step._grad_dev = None
    with pytest.raises(ValueError, match="one device"):
        step()


@pytest.mark.parametrize("compile", [False, True])
def test_weights_on_several_devices_read_each_sum_where_it_lives(compile, monkeypatch):
    """A model split across devices (``device_map``, pipeline stages) cannot stack its weights'
    sums in place: the runtime reads each where it lives and moves it to the targets' device
    before the chain (``Runtime._split``, set at prepare). A CPU test cannot hold two devices,
    so the split is declared: the route is taken and gives the one-device scales, the eager
    evaluator's (``plan.scales()``), including through an attached step."""
    torch.manual_seed(0)
    net = lenet_bn()
    x = torch.randn(8, 3, 32, 32)
    plan = fxbackmatch.prepare(net, x[:2], compile=compile)
    rt = plan._runtime
    assert not rt.split()  # one device
    rt._split, rt._fn = True, None  # declared: a CPU test cannot hold two devices
    from fxbackmatch.runtime import chain

    devices, base = [], chain._base
    monkeypatch.setattr(chain, "_base", lambda *a: devices.append(a[-1]) or base(*a))
    F.cross_entropy(net(x), torch.arange(8)).backward()
    want = plan.scales()
    got = dict(zip(plan.targets, plan.scale_tensor().tolist()))
    assert devices == [rt.device()]  # the per-weight route, onto the targets' device
    for n in plan.targets:
        assert got[n] == pytest.approx(want[n], rel=1e-6), n
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    plan.rescale_grads_()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n] * want[n], rtol=1e-6, atol=0)
