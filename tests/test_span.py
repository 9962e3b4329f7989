"""``span="batch"`` (fxbackmatch/span.py): a weight's normal matrix on the span of the batch.

The oracle is the least-squares step itself: with ``N = B·s`` rows and fan-in ``n > N``, the
exact ``δ'W = E[δb aᵀ]·(E aaᵀ)⁺`` changes the layer's output on the batch by exactly the target
(the rows are independent), while the paper's ``E[a²]·I`` changes it by about ``n/N`` times it;
``span="batch"`` brings that back to about 1."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.analysis.span import fan_in_of, span_multiplier


def _wide(n: int = 512):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n, 10))  # the output layer: m = 1, its step is δ'W = g/(s·k)


@pytest.mark.parametrize("span", ["full", "batch"])
def test_the_output_change_of_a_wide_layer_matches_the_least_squares_target(span):
    net, batch = _wide(), 16
    x = torch.randn(batch, 512)
    y = torch.randint(0, 10, (batch,))
    plan = fxbackmatch.prepare(net, x, compile=False, conventions=fxbackmatch.Conventions(span=span))
    net(x)  # the call the plan reads B from
    out = net(x)
    loss = F.cross_entropy(out, y, reduction="sum")  # δb per sample: the target change
    target = -torch.autograd.grad(loss, out, retain_graph=True)[0]
    net.zero_grad()
    loss.backward()
    w = net[0].weight
    step = w.grad * plan.scales()["0.weight"] / batch  # δ'W = E[δb aᵀ]/(s·E[a²]) (mean over rows)
    got = float((x @ step.T).norm() / target.norm())
    # the exact least-squares step (pseudo-inverse: n > N, so it interpolates): ratio 1
    exact = target.T @ torch.linalg.pinv(x).T
    assert float((x @ exact.T).norm() / target.norm()) == pytest.approx(1.0, rel=1e-4)
    if span == "full":
        assert got == pytest.approx(512 / batch, rel=0.25)  # the paper's E[a²]·I: n/N times too far
    else:
        assert got == pytest.approx(1.0, rel=0.25)


def test_span_follows_each_calls_batch_and_leaves_narrow_layers_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 8), nn.ReLU(), nn.Linear(8, 4))
    full = fxbackmatch.prepare(net, torch.randn(2, 512), compile=False, conventions="paper").scales()
    plan = fxbackmatch.prepare(net, torch.randn(2, 512), compile=False, conventions=fxbackmatch.Conventions(span="batch"))
    for batch in (16, 64, 1024):
        x = torch.randn(batch, 512, dtype=torch.float64)
        net(x.float())
        sc = plan.scales()
        # measured on the batch: E[a²]·I has the mean eigenvalue of E aaᵀ over all n
        # directions, the batch's span the mean of its nonzero ones; the scale divides by it
        eig = torch.linalg.eigvalsh(x.T @ x / batch)
        on_span = eig[eig > eig.max() * 1e-9].mean()
        assert sc["0.weight"] == pytest.approx(full["0.weight"] * float(eig.mean() / on_span), rel=1e-9)
        assert sc["0.bias"] == pytest.approx(full["0.bias"], rel=1e-9)  # no fan-in
        assert sc["2.weight"] == pytest.approx(full["2.weight"], rel=1e-9)  # n = 8 < B
    other = fxbackmatch.prepare(net, torch.randn(2, 512), compile=False, conventions="paper")
    with pytest.raises(fxbackmatch.PlanMismatchError, match="span"):
        other.load_state_dict(plan.state_dict())


def test_fan_in_by_layout_and_the_multiplier():
    assert fan_in_of("Linear", (10, 512)) == 512
    assert fan_in_of("Conv2d", (64, 32, 3, 3)) == 288
    assert fan_in_of("addmm", (32, 96)) == 32  # GPT-2's Conv1D: [in, out]
    assert fan_in_of("Embedding", (100, 32)) is None and fan_in_of("ConvTranspose2d", (3, 4, 3, 3)) is None
    m = span_multiplier(16, torch.tensor([512.0, 8.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert m.tolist() == [16 / 512, 1.0, 1.0]


def test_the_batch_multiplier_is_kept_per_batch_size():
    """The span multiplier depends on the batch size alone: made once per size (on the
    runtime's device, with no per-step copy to it) and equal to ``min(1, B/n)`` per weight
    (n = fan-in 512; the bias has none) for each size seen, whichever came first."""
    from fxbackmatch.measure.batch import multiplier

    net = nn.Sequential(nn.Linear(512, 8))
    plan = fxbackmatch.prepare(net, torch.randn(2, 512), compile=False, conventions=fxbackmatch.Conventions(span="batch"))
    seen = {}
    for b in (64, 16, 64, 600, 16):
        net(torch.randn(b, 512))
        m = multiplier(plan)
        assert dict(zip(plan.targets, m.tolist())) == {"0.weight": min(1.0, b / 512), "0.bias": 1.0}
        assert seen.setdefault(b, m) is m  # the same tensor for the same size
    assert len({id(m) for m in seen.values()}) == 3


def test_data_parallel_ranks_count_their_rows(monkeypatch):
    """Ranks average their gradients, so the normal matrix spans every rank's rows."""
    import fxbackmatch.measure.batch as plan_mod

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 8))
    plan = fxbackmatch.prepare(net, torch.randn(2, 512), compile=False, conventions=fxbackmatch.Conventions(span="batch"))
    net(torch.randn(64, 512))
    one_process = plan.scales()["0.weight"]  # the same 64 rows in one process
    net(torch.randn(16, 512))
    monkeypatch.setattr(plan_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(plan_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(plan_mod.dist, "get_world_size", lambda: 4)
    assert plan.scales()["0.weight"] == pytest.approx(one_process, rel=1e-9)


def test_with_a_token_mask_only_the_real_tokens_are_rows():
    """A token-wise layer shares its weight over the ``f·T`` real tokens of each sample, so its
    batch span is ``B·f·T`` rows: the span and the token share multiply to
    ``(1/f)·min(1, B·f·T/n)`` — not ``(1/f)·min(1, B·T/n)``, which would be ``1/f`` too large."""

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(256, 8, bias=False)

        def forward(self, x, attention_mask):
            return self.inp(x) * attention_mask.unsqueeze(-1)

    torch.manual_seed(0)
    net, batch, t = Tok(), 4, 8
    x = torch.randn(batch, t, 256)
    mask = torch.zeros(batch, t)
    mask[:, :2] = 1  # f = 1/4: 4·2 = 8 real rows, against a fan-in of 256
    plan = fxbackmatch.prepare(net, (x, mask), compile=False, token_mask=1, conventions=fxbackmatch.Conventions(span="batch"))
    net(x, mask)
    # the equivalent network: the same layer on the real tokens alone, no padding, no mask
    real, ones = x[:, :2].contiguous(), torch.ones(batch, 2)
    unpadded = fxbackmatch.prepare(net, (real, ones), compile=False, conventions=fxbackmatch.Conventions(span="batch"))
    net(real, ones)
    assert plan.scales()["inp.weight"] == pytest.approx(unpadded.scales()["inp.weight"], rel=1e-9)
    full = fxbackmatch.prepare(net, (real, ones), compile=False, conventions="paper").scales()["inp.weight"]
    assert unpadded.scales()["inp.weight"] == pytest.approx(full * (batch * 2 / 256), rel=1e-9)  # it did reduce


@pytest.mark.parametrize("compiled", [False, True, "foreach"])
def test_compile_step_applies_what_reads_the_batch_as_attach_does(compiled, monkeypatch):
    """The fused step multiplies by the step's span (the batch size changes between steps) and
    refreshes measured moments every ``refresh`` steps: the same weights as ``attach`` after
    every step (the default conventions read the batch both ways). Compiled, on the CPU, that
    is the generated C++ update behind the chain on Python floats; ``foreach``: the fused step
    as launched on CUDA (the runtime's rescale, then torch's fused SGD kernel), on the CPU."""
    from fxbackmatch.apply import fused as fused_mod

    monkeypatch.setattr(fused_mod, "FOREACH_DEVICES", {"cpu"} if compiled == "foreach" else set())

    def run(fused: bool):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
        plan = fxbackmatch.prepare(net, torch.randn(2, 3, 6, 6), compile=fused and compiled is True, refresh=2)
        assert plan.span == "batch" and plan.moments == "batch"
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        step = plan.compile_step(opt) if fused else plan.attach(opt)
        out = []
        kernel = []
        for k, b in enumerate((2, 5, 3, 8, 4)):
            g = torch.Generator().manual_seed(k)
            x, y = torch.randn(b, 3, 6, 6, generator=g), torch.randint(0, 4, (b,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            step() if fused else opt.step()
            out.append([p.detach().clone() for p in net.parameters()])
            kernel.append(fused and step.cpu_code is not None)
        assert all(kernel) == (fused and compiled is True)
        return out

    for a, b in zip(run(False), run(True)):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # float32 update order


@pytest.mark.parametrize("path", ["attach", "compile_step", "compiled attach", "foreach compile_step"])
def test_cap_holds_once_after_the_batch_multiplier(path, monkeypatch):
    """``cap=C`` keeps each scale in [1/C, C] after the batch's span multiplier, once: the step
    applies ``clamp(s·k)``, with ``s·k`` the uncapped plan's scale at this batch of 8, which is
    what ``plan.scales()`` shows. The runtime used to clamp ``s`` before the multiplier as well
    (``clamp(s)·k``: 2.5 applied where 12.2 was shown). Checked on one SGD step (the momentum
    buffer starts at the gradient), from the weights' change, against the uncapped plan's
    scales clamped by hand. ``foreach compile_step``: the fused step as launched on CUDA
    (the runtime's rescale, then torch's fused SGD kernel), run on the CPU."""
    from fxbackmatch.apply import cuda_update, fused

    monkeypatch.setattr(fused, "FOREACH_DEVICES", {"cpu"} if path == "foreach compile_step" else set())
    cap, lr = 20.0, 0.1

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                             nn.Linear(16, 4)).double()

    x0 = torch.randn(2, 64, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 64, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)
    # the oracle: the uncapped plan's scales at this batch (its multiplier included), clamped by hand
    free = net()
    free_plan = fxbackmatch.prepare(free, x0, compile=False)
    F.cross_entropy(free(x), y).backward()
    want = {n: min(max(v, 1 / cap), cap) for n, v in free_plan.scales().items()}
    assert max(free_plan.scales().values()) > cap * 2  # the cap binds before the multiplier...
    assert any(1 / cap < want[n] < cap < free_plan.scales()[n] * 8 for n in want)  # ...and not after

    model = net()
    plan = fxbackmatch.prepare(model, x0, compile=path == "compiled attach",
                               conventions=fxbackmatch.Conventions.named("default").replace(cap=cap))
    assert plan.span == "batch"
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)  # step 1: the buffer is the gradient
    step = plan.compile_step(opt) if path.endswith("compile_step") else (plan.attach(opt) and opt.step)
    F.cross_entropy(model(x), y).backward()
    shown = plan.scales()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    step()
    assert isinstance(getattr(step, "_fn", None), cuda_update.SGDForeachStep) == (path == "foreach compile_step")
    for n, p in model.named_parameters():
        w, grad = before[n]
        if grad.abs().max() < 1e-12:  # the bias before BatchNorm: no gradient (round-off), nothing to read
            continue
        applied = float(((w - p.detach()) * grad).sum() / (lr * grad.square().sum()))
        assert applied == pytest.approx(want[n], rel=1e-9), n
        assert shown[n] == pytest.approx(want[n], rel=1e-9), n
