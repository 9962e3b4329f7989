"""The fused step keeps each weight's sum(W²) from its own write (issue 23, part 4).

Its cached sums must give the same training as reading the weights every step (the plain
``attach()`` + ``optimizer.step()`` path) and must be re-read after anything that writes the
weights outside the step. Eager fused steps (``compile=False``) for most checks; one compiled.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.runtime.norms import sumsq

pytestmark = pytest.mark.filterwarnings("ignore::fxbackmatch.AdaptiveOptimizerWarning")

SHAPE = (8, 3, 8, 8)


class Net(nn.Module):
    """Conv-BN, a residual fork whose factor reads ``Σcv2.weight²``, a linear head. No conv
    bias before BN: its gradient is rounding noise, which Adam would turn into steps."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.cv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.cv1(x)))
        x = x + self.cv2(F.relu(self.bn2(x)))
        return self.fc(F.max_pool2d(x, 2).flatten(1))


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(SHAPE, generator=g), torch.randint(0, 10, (SHAPE[0],), generator=g)) for _ in range(n)]


def twins(variance: str = "weights", compile: bool = False):
    """Two equal nets with their plans: ``a`` for the fused step, ``b`` (eager) for attach()."""
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    pa = fxbackmatch.prepare(a, torch.randn(SHAPE), compile=compile, conventions=fxbackmatch.Conventions(variance=variance))
    pb = fxbackmatch.prepare(b, torch.randn(SHAPE), compile=False, conventions=fxbackmatch.Conventions(variance=variance))
    return a, pa, b, pb


def assert_same(a: nn.Module, b: nn.Module, tol: float = 1e-6) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol * float(q.detach().abs().max()), msg=n)


def step_both(a: nn.Module, step_a, b: nn.Module, step_b, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step of each twin on the same batch: ``a`` with the fused step, ``b`` with
    its optimizer under attach()."""
    for net, st in ((a, step_a), (b, step_b)):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        st()


def fresh_sq(step) -> list[torch.Tensor]:
    return [sumsq(w) for w in step._kept]


def count_reads(step) -> list[int]:
    """Spy on the fused step's weight reads: appends how many weights each call re-read."""
    calls: list[int] = []
    read = step._read_sq

    def spy(weights):
        calls.append(len(weights))
        return read(weights)

    step._read_sq = spy
    return calls


OPTIMIZERS = {
    "sgd-wd": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 5e-4),
    "nesterov-wd": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True), 5e-4),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), 0.0),
    "adamw-wd": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), 5e-4),  # both decays, as attach()
    "adam-wd": (lambda p: torch.optim.Adam(p, lr=1e-3), 5e-4),
}


@pytest.mark.parametrize("variance", ["weights", "measured"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cached_step_equals_attach(name, variance):
    """30 steps, with a weight doubled by hand at step 10 and a checkpoint loaded at step 20
    (``variance='measured'`` also reads BatchNorm running variances every step)."""
    make, wd = OPTIMIZERS[name]
    a, pa, b, pb = twins(variance)
    oa, ob = make(a.parameters()), make(b.parameters())
    step = pa.compile_step(oa, weight_decay=wd)
    pb.attach(ob, weight_decay=wd)
    reads = count_reads(step)
    checkpoint = None
    for i, (x, y) in enumerate(batches(30)):
        step_both(a, step, b, ob.step, x, y)
        assert_same(a, b)
        if i == 5:
            checkpoint = copy.deepcopy(b.state_dict())
        if i == 10:  # cv2.weight is read by its own scale and by the fork's sum
            with torch.no_grad():
                a.cv2.weight.mul_(2)
                b.cv2.weight.mul_(2)
        if i == 20:
            for net, plan in ((a, pa), (b, pb)):
                net.load_state_dict(checkpoint)
                plan.load_state_dict(plan.state_dict())
    n = len(step._kept)
    assert n == 3
    assert reads == [n, 1, n]  # first call, the edited weight, the loaded checkpoint


def test_cache_is_reread_after_each_outside_write():
    """Which writes outside the step re-read which weights (``_version`` / ``data_ptr``)."""
    a, pa, _, _ = twins()
    opt = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    step = pa.compile_step(opt)
    reads = count_reads(step)
    data = iter(batches(20))

    def one(fn=None):
        x, y = next(data)
        a.zero_grad()
        F.cross_entropy(a(x), y).backward()
        (fn or step)()
        return reads.pop() if reads else 0

    n = len(step._kept)
    assert one() == n  # first call
    assert one() == 0 and one() == 0  # steady state: no weight read for its norm
    with torch.no_grad():
        a.fc.weight.add_(1.0)
    assert one() == 1
    a.cv1.weight.data = a.cv1.weight.data.clone()  # new storage, same version
    assert one() == 1
    assert one(opt.step) == 0 and one() == n  # a plain optimizer step wrote them all
    a.load_state_dict(copy.deepcopy(a.state_dict()))
    assert one() == n
    pa.load_state_dict(pa.state_dict())
    assert one() == n
    for got, want in zip(step._sq, fresh_sq(step)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_data_edit_is_one_step_late():
    """An edit through ``.data`` bumps no version: the next step still uses the old sum, and
    keeps the right one (it sums what it wrote); ``plan.load_state_dict`` re-reads at once."""
    a, pa, b, pb = twins()
    oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    step = pa.compile_step(oa)
    pb.attach(ob)
    for i, (x, y) in enumerate(batches(8)):
        if i == 3:
            a.cv2.weight.data.mul_(2)
            b.cv2.weight.data.mul_(2)
            pa.load_state_dict(pa.state_dict())  # what a resume does: re-read every weight
        step_both(a, step, b, ob.step, x, y)
        assert_same(a, b)
    a.cv2.weight.data.mul_(2)  # this time unnoticed
    x, y = batches(1, seed=1)[0]
    a.zero_grad()
    F.cross_entropy(a(x), y).backward()
    step()
    for got, want in zip(step._sq, fresh_sq(step)):  # healed by the step's own write
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_weights_the_optimizer_does_not_step_are_read_every_step():
    """cv2.weight is outside the optimizer and changed by hand (through ``.data``) each step."""
    a, pa, b, pb = twins()
    rest = lambda net: [p for n, p in net.named_parameters() if n != "cv2.weight"]  # noqa: E731
    oa = torch.optim.SGD(rest(a), lr=0.05, momentum=0.9)
    ob = torch.optim.SGD(rest(b), lr=0.05, momentum=0.9)
    step = pa.compile_step(oa, weight_decay=5e-4)
    pb.attach(ob, weight_decay=5e-4)
    assert len(step._kept) == 2 and len(step._read) == 1
    for x, y in batches(10):
        for net, st in ((a, step), (b, ob.step)):
            net.cv2.weight.data.mul_(1.1)
            net.zero_grad()
            F.cross_entropy(net(x), y).backward()
            st()
        assert_same(a, b)


def test_compiled_cached_step():
    """The one compiled step of this file: same training as attach() through an edit and a
    loaded checkpoint, kept sums equal to fresh reads, one graph for every call (none on the
    C++ update, whose chain runs on Python floats), and weights
    re-read only on the first call, after the edit and after the checkpoint (the step's own
    version bumps, learned on the first call, predict every other step's marks)."""
    from torch._dynamo.utils import counters

    a, pa, b, pb = twins(compile=True)
    oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    step = pa.compile_step(oa, weight_decay=5e-4)
    pb.attach(ob, weight_decay=5e-4)
    checkpoint = copy.deepcopy(b.state_dict())
    before = counters["stats"].get("unique_graphs", 0)
    reads = count_reads(step)
    for i, (x, y) in enumerate(batches(12)):
        if i == 4:
            with torch.no_grad():
                a.fc.weight.mul_(0.5)
                b.fc.weight.mul_(0.5)
        if i == 8:
            a.load_state_dict(checkpoint)
            b.load_state_dict(checkpoint)
        step_both(a, step, b, ob.step, x, y)
        assert_same(a, b, tol=1e-5)  # compiled against eager float32 arithmetic
        for got, want in zip(step._sq, fresh_sq(step)):  # CPU compiled sums: float32 cascade (norms.sumsq)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    graphs = 0 if step.cpu_code else 1  # the C++ update's chain runs on Python floats: no graph
    assert counters["stats"].get("unique_graphs", 0) - before == graphs
    assert reads == [len(step._kept), 1, len(step._kept)]
    # a diverged weight: its kept sum turns NaN, which must not recompile the step (0-d CPU
    # sums passed one by one were guarded as Python floats, with a NaN check each)
    with torch.no_grad():
        a.cv2.weight[0, 0, 0, 0] = float("nan")
    for x, y in batches(2, seed=1):
        a.zero_grad()
        F.cross_entropy(a(x), y).backward()
        step()
    assert not torch.isfinite(a.cv2.weight).all()
    assert counters["stats"].get("unique_graphs", 0) - before == graphs


def test_a_large_update_reads_the_weights_each_step(monkeypatch):
    """Without the scheduler pass (here: an eager step) and past KEEP_MAX_PARAMS parameters,
    the step keeps no sums and reads every weight each call, still equal to attach()."""
    import fxbackmatch.apply.fused as fused

    monkeypatch.setattr(fused, "KEEP_MAX_PARAMS", 2)
    a, pa, b, pb = twins()
    oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    step = pa.compile_step(oa, weight_decay=5e-4)
    pb.attach(ob, weight_decay=5e-4)
    assert step._kept == [] and len(step._read) == 3
    for x, y in batches(5):
        step_both(a, step, b, ob.step, x, y)
        assert_same(a, b)


@pytest.mark.slow
def test_a_compiled_step_of_many_parameters_keeps_every_sum():
    """50 parameters, past where inductor alone would split the update: compiled with the
    scheduler pass, every weight's sum is kept and training equals attach() through a weight
    changed by hand, with weight decay."""
    torch.manual_seed(0)
    blocks = [m for _ in range(12) for m in (nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())]
    a = nn.Sequential(*blocks, nn.Linear(16, 10))
    b = copy.deepcopy(a)
    x0 = torch.randn(32, 16)
    pa = fxbackmatch.prepare(a, x0, compile=True)
    pb = fxbackmatch.prepare(b, x0, compile=False)
    oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    step = pa.compile_step(oa, weight_decay=5e-4)
    pb.attach(ob, weight_decay=5e-4)
    assert len(list(a.parameters())) == 50 and step._read == [] and len(step._kept) == len(pa._runtime.weights)
    g = torch.Generator().manual_seed(1)
    for i in range(8):
        x, y = torch.randn(32, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
        if i == 4:
            with torch.no_grad():
                a[3].weight.mul_(1.5)
                b[3].weight.mul_(1.5)
        step_both(a, step, b, ob.step, x, y)
        assert_same(a, b, tol=1e-5)
        for got, want in zip(step._sq, fresh_sq(step)):  # CPU compiled sums: float32 cascade (norms.sumsq)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_a_compiled_adamw_step_with_two_groups_equals_attach():
    """The compiled Adam path (bias corrections computed beside the update and passed in):
    two parameter groups with their own betas and rates, a scheduler changing the rates, the
    same training as attach() with torch's AdamW."""
    a, pa, b, pb = twins(compile=True)

    def groups(net):
        return [{"params": [net.cv1.weight, net.cv2.weight], "betas": (0.8, 0.99)},
                {"params": [p for n, p in net.named_parameters() if not n.startswith(("cv1", "cv2"))], "lr": 3e-3}]

    oa = torch.optim.AdamW(groups(a), lr=1e-3, weight_decay=0.01)
    ob = torch.optim.AdamW(groups(b), lr=1e-3, weight_decay=0.01)
    step = pa.compile_step(oa)
    pb.attach(ob)
    sa, sb = (torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5) for o in (oa, ob))
    for x, y in batches(6):
        step_both(a, step, b, ob.step, x, y)
        sa.step()
        sb.step()
        assert_same(a, b, tol=2e-5)
    assert float(oa.state[a.fc.weight]["step"]) == float(ob.state[b.fc.weight]["step"]) == 6


def one_cycle(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR moves the learning rate and (its default) the momentum / betas every step."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20, pct_start=0.3)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_scheduler_moving_momentum_or_betas_is_followed(kind):
    """Momentum (SGD) and betas (Adam) are compiled into the update until a scheduler moves
    them, then passed in every step: the same training as attach() with torch's optimizer."""
    a, pa, b, pb = twins()
    if kind == "sgd":
        oa, ob = (torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9, nesterov=True) for n in (a, b))
    else:
        oa, ob = (torch.optim.AdamW(n.parameters(), lr=0.05, weight_decay=0.01) for n in (a, b))
    step = pa.compile_step(oa)
    pb.attach(ob)
    sa, sb = one_cycle(oa), one_cycle(ob)
    seen = set()
    for x, y in batches(8):
        step_both(a, step, b, ob.step, x, y)
        sa.step()
        sb.step()
        assert_same(a, b, tol=2e-5)
        seen.add(str(oa.param_groups[0]["momentum" if kind == "sgd" else "betas"]))
    assert step._passed and len(seen) == 8  # the scheduler did move them, and the step followed


def test_a_parameter_group_added_later_is_stepped():
    """``add_param_group`` after ``compile_step``: the new parameters are stepped (and scaled)
    from the next call, as attach() with torch's SGD does; a changed compiled-in setting
    (nesterov) builds the update again."""
    a, pa, b, pb = twins()

    def first(net):
        return [p for n, p in net.named_parameters() if not n.startswith("fc")]

    oa, ob = (torch.optim.SGD(first(n), lr=0.05, momentum=0.9) for n in (a, b))
    step = pa.compile_step(oa)
    pb.attach(ob)
    data = batches(6)
    for x, y in data[:2]:
        step_both(a, step, b, ob.step, x, y)
    torch.testing.assert_close(a.fc.weight, b.fc.weight)  # neither stepped fc yet
    fc0 = a.fc.weight.detach().clone()
    oa.add_param_group({"params": list(a.fc.parameters()), "lr": 0.02})
    ob.add_param_group({"params": list(b.fc.parameters()), "lr": 0.02})
    for i, (x, y) in enumerate(data[2:]):
        if i == 2:
            oa.param_groups[0]["nesterov"] = ob.param_groups[0]["nesterov"] = True
        step_both(a, step, b, ob.step, x, y)
        assert_same(a, b)
    assert not torch.equal(a.fc.weight, fc0)
    assert len(step.params) == len(list(a.parameters())) and step.index[-2] >= 0  # fc.weight is scaled


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [False, True])
def test_a_compiled_step_under_one_cycle_compiles_twice(kernel, monkeypatch):
    """Compiled: inductor's update has the momentum compiled in for the first step, passed in
    from the scheduler's first move on; two graphs in all, whatever the number of steps, and
    attach()'s training. The C++ update (``kernel``) reads the momentum every step and its chain
    runs on Python floats: no graph."""
    from torch._dynamo.utils import counters

    from fxbackmatch.apply import fused

    monkeypatch.setattr(fused, "CPU_KERNEL", kernel)
    a, pa, b, pb = twins(compile=True)
    oa, ob = (torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9) for n in (a, b))
    step = pa.compile_step(oa, weight_decay=5e-4)
    pb.attach(ob, weight_decay=5e-4)
    sa, sb = one_cycle(oa), one_cycle(ob)
    before = counters["stats"].get("unique_graphs", 0)
    for x, y in batches(8):
        step_both(a, step, b, ob.step, x, y)
        sa.step()
        sb.step()
        assert_same(a, b, tol=1e-5)
    assert (step.cpu_code is not None) == kernel
    assert counters["stats"].get("unique_graphs", 0) - before == (0 if kernel else 2)  # kernel: a chain on floats
    assert step._passed != kernel


def test_a_weight_decay_schedule_and_tensor_betas_are_followed():
    """AdamW's decoupled weight decay moved by hand every step (as a ViT recipe's schedule
    does), and betas given as tensors and changed in place: same training as attach()."""
    a, pa, b, pb = twins()
    oa, ob = (torch.optim.AdamW(n.parameters(), lr=1e-2, weight_decay=0.01,
                                betas=(torch.tensor(0.9), torch.tensor(0.999))) for n in (a, b))
    step = pa.compile_step(oa)
    pb.attach(ob)
    for i, (x, y) in enumerate(batches(6)):
        for o in (oa, ob):
            o.param_groups[0]["weight_decay"] = 0.01 * (i + 1)
            o.param_groups[0]["betas"][0].fill_(0.9 - 0.05 * i)
        step_both(a, step, b, ob.step, x, y)
        assert_same(a, b, tol=2e-5)
    assert step._passed


def test_passed_hyperparameters_keep_float32_for_bfloat16_weights():
    """A passed β₂ = 0.999 must not round to bfloat16's 1.0 (the second moment would never
    decay); a compiled-in float is left as it is."""
    from fxbackmatch.apply.updates import passed_as

    b2 = torch.tensor(0.999, dtype=torch.float64)
    assert torch.tensor(0.999).to(torch.bfloat16).item() == 1.0  # the hazard
    assert passed_as(b2, torch.bfloat16).dtype == torch.float32 and passed_as(b2, torch.bfloat16).item() == pytest.approx(0.999)
    assert passed_as(b2, torch.float64).dtype == torch.float64 and passed_as(0.9, torch.bfloat16) == 0.9


def test_a_plan_waiting_for_its_first_forward_says_so_when_stepped():
    """An attached plan prepared without example inputs, stepped before any forward: the
    plan's own error (the step hook used to reach for a runtime that does not exist yet)."""
    torch.manual_seed(0)
    net = Net()
    plan = fxbackmatch.prepare(net, compile=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    plan.attach(opt)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(fxbackmatch.PlanNotReadyError, match="run one forward pass first"):
        opt.step()


def test_an_eager_adamw_step_is_torchs_own_arithmetic():
    """With betas compiled in, the eager fused AdamW update does torch.optim.AdamW's own ops
    (``lerp_``, ``mul_(β₂).addcmul_``): bit for bit attach()'s training in float32."""
    a, pa, b, pb = twins()
    oa, ob = (torch.optim.AdamW(n.parameters(), lr=1e-3, weight_decay=0.01) for n in (a, b))
    step = pa.compile_step(oa)
    pb.attach(ob)
    for x, y in batches(5):
        step_both(a, step, b, ob.step, x, y)
    assert not step._passed
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_an_adamw_group_added_later_is_stepped_with_its_own_betas():
    """``add_param_group`` on AdamW: the new group's parameters, betas and decay reach the
    update (and the bias corrections, per parameter), as with torch's AdamW under attach()."""
    a, pa, b, pb = twins()

    def first(net):
        return [p for n, p in net.named_parameters() if not n.startswith("fc")]

    oa, ob = (torch.optim.AdamW(first(n), lr=1e-3, weight_decay=0.01) for n in (a, b))
    step = pa.compile_step(oa)
    pb.attach(ob)
    data = batches(5)
    for x, y in data[:2]:
        step_both(a, step, b, ob.step, x, y)
    for o, n in ((oa, a), (ob, b)):
        o.add_param_group({"params": list(n.fc.parameters()), "lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.1})
    for x, y in data[2:]:
        step_both(a, step, b, ob.step, x, y)
        assert_same(a, b, tol=2e-5)
    assert float(oa.state[a.fc.weight]["step"]) == 3


def test_cuda_options_reach_only_a_step_on_cuda(monkeypatch):
    """``apply.fused.CUDA_OPTIONS`` (what bench_rescale --combo tries) joins the options the
    update is compiled with when the step's device is CUDA — beside the scheduler pass — and
    not on the CPU; a step whose model moved is compiled again for its new device."""
    from fxbackmatch.apply import fused

    monkeypatch.setattr(fused, "CUDA_OPTIONS", {"combo_kernels": True})
    monkeypatch.setattr(fused, "CPU_KERNEL", False)  # inductor's update, whose options these are
    monkeypatch.setattr(fused, "FOREACH_DEVICES", set())  # (on CUDA, SGD is otherwise the foreach step)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(SHAPE)
    plan = fxbackmatch.prepare(net, x)
    step = plan.compile_step(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    F.cross_entropy(net(x), torch.arange(8)).backward()
    step()
    assert len(seen) == 1 and "combo_kernels" not in seen[0]
    step()
    assert len(seen) == 1  # built once
    step._dev = step._grad_dev = torch.device("cuda")  # as if the model had been on CUDA
    step()  # moved to the CPU: built again for it
    assert len(seen) == 2 and "combo_kernels" not in seen[1]
    step._grad_dev = torch.device("meta")  # the first gradient moved, the runtime's device did not
    step()
    assert len(seen) == 2  # (model parallel: the first gradient need not be on the targets' device)
    step._dev = torch.device("cuda")
    step._build()  # what a step on CUDA compiles with
    assert seen[2]["combo_kernels"] is True and set(seen[0]) <= set(seen[2])


def test_a_first_gradient_on_another_device_than_the_targets_builds_once(monkeypatch):
    """The step notices a move on the first gradient's device and rebuilds only when the
    runtime's device changed: with the two apart (model parallel; here the runtime's spelled
    ``cpu:0``), five steps build the update once."""
    from fxbackmatch.runtime.chain import Runtime

    monkeypatch.setattr(Runtime, "device", lambda self: torch.device("cpu", 0))
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(SHAPE)
    plan = fxbackmatch.prepare(net, x, compile=False)
    step = plan.compile_step(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    built = []
    build = step._build
    monkeypatch.setattr(step, "_build", lambda: built.append(1) or build())
    for _ in range(5):
        net.zero_grad()
        F.cross_entropy(net(x), torch.arange(8)).backward()
        step()
    assert len(built) == 1


def _kernel_trio(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True), wd=5e-4,
                 variance="weights"):
    """Three equal nets: ``a`` with the fused step on the C++ update, ``c`` with the fused step
    on inductor's update, ``b`` eager under attach()."""
    a, pa, b, pb = twins(variance, compile=True)
    c = copy.deepcopy(b)
    pc = fxbackmatch.prepare(c, torch.randn(SHAPE), compile=True, conventions=fxbackmatch.Conventions(variance=variance))
    oa, ob, oc = (optimizer(n.parameters()) for n in (a, b, c))
    sa, sc = pa.compile_step(oa, weight_decay=wd), pc.compile_step(oc, weight_decay=wd)
    sc._kernel_off = True
    pb.attach(ob, weight_decay=wd)
    return (a, sa, oa), (b, ob.step, ob), (c, sc, oc)


@pytest.mark.parametrize("variance", ["weights", "measured"])
def test_the_cpu_kernel_trains_like_inductors_update_and_attach(variance):
    """The generated C++ SGD update (Nesterov, weight decay, a weight halved by hand at step 4)
    behind the chain on Python floats (with BatchNorm's running variances read every step under
    ``variance="measured"``) gives inductor's update's weights, momentum buffers and scales to
    1e-6 and attach()'s training to 1e-5; its kept sums equal float64 reads of the weights to
    1e-6 (float32 per chunk of 4096, float64 across); each step bumps every weight's and
    buffer's version once, as inductor's."""
    from fxbackmatch.apply import cpu_update

    if not cpu_update.available():  # pragma: no cover - a torch without the binding cache
        pytest.skip("this inductor has no C++ binding cache")
    (a, sa, oa), (b, sb, ob), (c, sc, oc) = _kernel_trio(variance=variance)
    for i, (x, y) in enumerate(batches(8)):
        if i == 4:
            with torch.no_grad():
                for n in (a, b, c):
                    n.fc.weight.mul_(0.5)
        before = [p._version for p in a.parameters()]
        step_both(a, sa, b, sb, x, y)
        c.zero_grad()
        F.cross_entropy(c(x), y).backward()
        sc()
        assert [p._version for p in a.parameters()] == [v + 1 for v in before]
        assert_same(a, c, tol=1e-6)
        assert_same(a, b, tol=1e-5)
        torch.testing.assert_close(sa._sq, torch.stack(fresh_sq(sa)), rtol=1e-6, atol=0)
        torch.testing.assert_close(sa.plan.applied_scales(), sc.plan.applied_scales(), rtol=1e-6, atol=0)
    assert sa.cpu_code is not None and "nesterov" not in sa.cpu_code and "(g + vm * nb)" in sa.cpu_code
    assert "static_cast<float>(0.0005)" in sa.cpu_code and sc.cpu_code is None
    for p, q in zip(a.parameters(), c.parameters()):
        want = oc.state[q]["momentum_buffer"]
        torch.testing.assert_close(oa.state[p]["momentum_buffer"], want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_the_cpu_kernel_hands_layouts_it_cannot_take_to_inductor():
    """New contiguous storage for a weight (``p.data = p.data.clone()``) keeps the C++ update;
    a momentum buffer made strided goes to inductor's update from that step on (training as
    attach() does); a channels-last model never gets the C++ update; two buffers sharing memory
    hand it over too."""
    from fxbackmatch.apply import cpu_update

    if not cpu_update.available():  # pragma: no cover
        pytest.skip("this inductor has no C++ binding cache")
    (a, sa, oa), (b, sb, ob), _ = _kernel_trio(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 0.0)
    for i, (x, y) in enumerate(batches(6)):
        if i == 2:
            a.fc.weight.data = a.fc.weight.data.clone()
        if i == 4:  # the same values, strided: the kernel would walk it in the wrong order
            buf = oa.state[a.cv1.weight]["momentum_buffer"]
            oa.state[a.cv1.weight]["momentum_buffer"] = buf.transpose(0, 1).contiguous().transpose(0, 1)
        step_both(a, sa, b, sb, x, y)
        assert_same(a, b, tol=1e-5)
        assert (sa.cpu_code is not None) == (i < 4)
    torch.manual_seed(0)
    net = Net().to(memory_format=torch.channels_last)
    plan = fxbackmatch.prepare(net, torch.randn(SHAPE))
    step = plan.compile_step(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    F.cross_entropy(net(torch.randn(SHAPE)), torch.arange(8)).backward()
    step()
    assert step.cpu_code is None and step._kernel_off
    # two momentum buffers sharing memory: the kernel's threads would race, inductor takes it
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(4, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    step = fxbackmatch.prepare(net, x).compile_step(opt)
    for i in range(2):
        if i == 1:
            opt.state[net[2].weight]["momentum_buffer"] = opt.state[net[0].weight]["momentum_buffer"][:4]
        net.zero_grad()
        F.cross_entropy(net(x), torch.arange(4)).backward()
        step()
        assert (step.cpu_code is not None) == (i == 0)


def test_the_generated_kernel_equals_the_update_it_replaces(monkeypatch):
    """The kernel itself against the update function inductor compiles (``updates.sgd_update``,
    run eagerly): a 21,013-value weight (six chunks of 4096 split across the threads, a scalar
    tail), an empty one, one without a scale (index −1) and one whose sum is not kept (slot −1),
    two groups (plain and Nesterov), weight decay. Weights and buffers bit for bit; the kept
    sums within 1e-6 of float64."""
    from fxbackmatch.apply import cpu_update, fused, updates

    if not cpu_update.available():  # pragma: no cover
        pytest.skip("this inductor has no C++ binding cache")
    g = torch.Generator().manual_seed(0)
    numels = [21_013, 0, 300, 4096, 17]
    index, group_of, slot = [0, 1, -1, 2, 3], [0, 0, 1, 1, 0], [0, 1, 2, -1, 3]
    nesterov, wd = [False, True], 1e-3
    params = [torch.randn(n, generator=g) for n in numels]
    grads = [torch.randn(n, generator=g) for n in numels]
    bufs = [torch.randn(n, generator=g) for n in numels]
    scales = torch.rand(4, dtype=torch.float64, generator=g) + 0.5
    lrs = [torch.tensor(0.05, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)]
    moms = [torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)]
    p_ref, b_ref = [p.clone() for p in params], [b.clone() for b in bufs]
    sq_ref = [None] * 4
    updates.sgd_update(p_ref, grads, b_ref, scales, index, lrs, moms, group_of, wd, nesterov, slot, sq_ref)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two threads even on a 1-core runner
    kernel, code = cpu_update.build_sgd(numels, index, group_of, nesterov, slot, wd)
    assert "num_threads(2)" in code  # six chunks of the first weight: 0–2 on one thread, 3–5 (tail) on the other
    sums = torch.empty(4, dtype=torch.float64)
    kernel(*[t for trio in zip(params, grads, bufs) for t in trio], scales, torch.stack(lrs), torch.stack(moms), sums)
    for got, want in zip(params + bufs, p_ref + b_ref):
        assert torch.equal(got, want)
    want = torch.stack([p_ref[i].double().square().sum() for i in (0, 1, 2, 4)])
    torch.testing.assert_close(sums, want, rtol=1e-6, atol=0)
    assert sums[1] == 0 and "(g + vm * nb)" in code  # the empty weight; the Nesterov group


@pytest.mark.parametrize("variance", ["weights", "measured"])
def test_the_foreach_step_trains_like_attach_and_inductors_update(variance, monkeypatch):
    """The fused SGD step as launched on CUDA (``cuda_update.SGDForeachStep``: the runtime's
    scales and rescale, then torch's fused SGD kernel), run here on the CPU: two groups (plain,
    and Nesterov at another rate), weight decay, a learning rate moved by a scheduler at step
    3 and a weight halved by hand at step 5. Its weights, momentum buffers and scales equal
    attach() + ``optimizer.step()``'s to 1e-6 and the compiled update's (``compile=False``: the
    same function eagerly) to 1e-5; the gradients it leaves are attach()'s (scaled, decay
    added); no weight is read through the kept-sums path."""
    from fxbackmatch.apply import cuda_update, fused

    monkeypatch.setattr(fused, "FOREACH_DEVICES", {"cpu"})

    def groups(net):
        return [{"params": [net.cv1.weight, net.bn1.weight, net.bn1.bias, net.fc.weight, net.fc.bias]},
                {"params": [net.cv2.weight, net.bn2.weight, net.bn2.bias], "nesterov": True, "lr": 0.02}]

    a, pa, b, pb = twins(variance)
    c = copy.deepcopy(b)
    pc = fxbackmatch.prepare(c, torch.randn(SHAPE), compile=False, conventions=fxbackmatch.Conventions(variance=variance))
    oa, ob, oc = (torch.optim.SGD(groups(n), lr=0.05, momentum=0.9) for n in (a, b, c))
    sa, sc = pa.compile_step(oa, weight_decay=5e-4), pc.compile_step(oc, weight_decay=5e-4)
    pb.attach(ob, weight_decay=5e-4)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (oa, ob, oc)]
    reads = count_reads(sa)
    for i, (x, y) in enumerate(batches(8)):
        if i == 5:
            with torch.no_grad():
                for n in (a, b, c):
                    n.fc.weight.mul_(0.5)
        monkeypatch.setattr(fused, "FOREACH_DEVICES", {"cpu"})
        step_both(a, sa, b, ob.step, x, y)
        assert isinstance(sa._fn, cuda_update.SGDForeachStep)
        monkeypatch.setattr(fused, "FOREACH_DEVICES", set())
        c.zero_grad()
        F.cross_entropy(c(x), y).backward()
        sc()
        assert not isinstance(sc._fn, cuda_update.SGDForeachStep)
        for s in scheds:
            s.step()
        assert_same(a, b, tol=1e-6)
        assert_same(a, c, tol=1e-5)
        torch.testing.assert_close(pa.applied_scales(), pb.applied_scales(), rtol=1e-12, atol=0)
        torch.testing.assert_close(pa.applied_scales(), pc.applied_scales(), rtol=1e-6, atol=0)
        for p, q in zip(a.parameters(), b.parameters()):
            for u, v in ((p.grad, q.grad), (oa.state[p]["momentum_buffer"], ob.state[q]["momentum_buffer"])):
                torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6 * float(v.abs().max()))
    assert oa.param_groups[1]["lr"] == 0.02 * 0.25 and reads == []


def test_foreach_steps_of_two_optimizers_scale_each_its_own_gradients(monkeypatch):
    """Two SGD optimizers over two parts of one model, each with its own fused step, one after
    the other: on the foreach path each multiplies only its own parameters' gradients, so the
    training is the compiled update's (``compile=False``: the same function eagerly) on the
    same two optimizers, to 1e-6, and each step leaves the other part's gradients as they were."""
    from fxbackmatch.apply import fused

    a, pa, c, pc = twins()

    def parts(net):
        head = [net.fc.weight, net.fc.bias]
        body = [p for p in net.parameters() if all(p is not q for q in head)]
        return torch.optim.SGD(body, lr=0.05, momentum=0.9), torch.optim.SGD(head, lr=0.1, momentum=0.5)

    (oa1, oa2), (oc1, oc2) = parts(a), parts(c)
    sa, sc = [pa.compile_step(o) for o in (oa1, oa2)], [pc.compile_step(o) for o in (oc1, oc2)]

    def steps(kind, pair, plan, want):
        def run():
            monkeypatch.setattr(fused, "FOREACH_DEVICES", kind)
            first, second = pair
            head = [p.grad.clone() for p in second.params]
            before = plan.scales()  # the reference evaluation, before each part moves
            first()
            for p, g in zip(second.params, head):
                assert torch.equal(p.grad, g)  # the first step left the second part's gradients alone
            between = plan.scales()
            second()
            want.update({n: (between if n.startswith("fc.") else before)[n] for n in before})
        return run

    for x, y in batches(4):
        want_a, want_c = {}, {}
        step_both(a, steps({"cpu"}, sa, pa, want_a), c, steps(set(), sc, pc, want_c), x, y)
        assert_same(a, c, tol=1e-6)
        for plan, want in ((pa, want_a), (pc, want_c)):  # each target's scale from its own optimizer's step
            got = plan.applied_scales()
            assert got.keys() == want.keys() and all(got[n] == pytest.approx(want[n], rel=1e-6) for n in want)
    assert [s._fn.only is None for s in sa] == [False, False]


def test_a_group_the_fused_sgd_kernel_refuses_takes_torchs_foreach_update(monkeypatch, caplog):
    """On CUDA torch's fused SGD kernel refuses tensors of unequal strides (a momentum buffer
    loaded in another memory format) before launching anything; the foreach step then updates
    that group with torch's foreach SGD, says so once, and trains as attach() does."""
    from fxbackmatch.apply import cuda_update, fused

    monkeypatch.setattr(fused, "FOREACH_DEVICES", {"cpu"})
    real, calls = cuda_update.sgd, []

    def picky(params, grads, bufs, **kw):  # the second group's tensors, as CUDA's layout check would
        calls.append(bool(kw.get("fused")))
        if kw.get("fused") and len(params) == 2:
            raise RuntimeError("params, grads, momentum_buffer_list must have the same strides")
        return real(params, grads, bufs, **kw)

    monkeypatch.setattr(cuda_update, "sgd", picky)
    a, pa, b, pb = twins()

    def groups(net):
        head = [net.fc.weight, net.fc.bias]
        return [{"params": [p for p in net.parameters() if all(p is not q for q in head)]},
                {"params": head, "lr": 0.02}]

    oa, ob = (torch.optim.SGD(groups(n), lr=0.05, momentum=0.9) for n in (a, b))
    step = pa.compile_step(oa, weight_decay=5e-4)
    pb.attach(ob, weight_decay=5e-4)
    with caplog.at_level("WARNING", logger="fxbackmatch.apply.cuda_update"):
        for x, y in batches(3):
            step_both(a, step, b, ob.step, x, y)
            assert_same(a, b, tol=1e-6)
    assert step._fn.fused == [True, False] and calls == [True, True, False] + [True, False] * 2
    assert len([r for r in caplog.records if "parameter group 1" in r.getMessage()]) == 1


def test_the_foreach_step_takes_a_tensor_learning_rate(monkeypatch):
    """A group whose ``lr`` is a float64 tensor (as schedulers may set it) steps as with the
    same float (a float64 tensor on CUDA: tests/test_cuda.py)."""
    from fxbackmatch.apply import fused

    monkeypatch.setattr(fused, "FOREACH_DEVICES", {"cpu"})
    a, pa, b, pb = twins()
    oa = torch.optim.SGD(a.parameters(), lr=torch.tensor(0.05, dtype=torch.float64), momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    step = pa.compile_step(oa)
    pb.attach(ob)
    for x, y in batches(3):
        step_both(a, step, b, ob.step, x, y)
        assert_same(a, b, tol=1e-6)
    assert isinstance(oa.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize("path", ["compiled", "foreach"])
def test_a_grad_scaler_steps_the_fused_step_as_it_steps_attach(path, monkeypatch):
    """``scaler.step(step)`` with a loss scale of 2¹⁰: the scaler unscales the gradients (it
    reads ``step.param_groups``), skips the step whose gradient holds an inf (step 2: the weights
    stay exactly as they were, the scale halves) and otherwise calls the fused step. Weights,
    buffers and the scaler's scale equal attach() + ``scaler.step(optimizer)``'s, to 1e-6;
    ``path``: the update function eagerly, or the step as launched on CUDA, here on the CPU."""
    from fxbackmatch.apply import fused

    monkeypatch.setattr(fused, "FOREACH_DEVICES", {"cpu"} if path == "foreach" else set())
    a, pa, b, pb = twins()
    oa, ob = (torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9, nesterov=True) for n in (a, b))
    step = pa.compile_step(oa, weight_decay=5e-4)
    pb.attach(ob, weight_decay=5e-4)
    sa, sb = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2))
    for i, (x, y) in enumerate(batches(5)):
        before = [p.detach().clone() for p in a.parameters()]
        for net, scaler, stepper in ((a, sa, step), (b, sb, ob)):
            net.zero_grad()
            scaler.scale(F.cross_entropy(net(x), y)).backward()
            if i == 2:
                net.fc.weight.grad[0, 0] = float("inf")
            scaler.step(stepper)
            scaler.update()
        assert_same(a, b)
        assert sa.get_scale() == sb.get_scale() == 2.0 ** (10 - (i >= 2))
        if i == 2:
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
        else:
            assert not torch.equal(a.fc.weight, before[-2])
    for p, q in zip(a.parameters(), b.parameters()):
        want = ob.state[q]["momentum_buffer"]
        torch.testing.assert_close(oa.state[p]["momentum_buffer"], want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
