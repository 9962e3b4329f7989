"""Closure-style steps and attaching twice (issue 13's lifecycle traps), against hand loops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxbackmatch
from fxbackmatch.models import lenet_bn


def _setup(seed=0):
    torch.manual_seed(seed)
    net = lenet_bn()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plan = fxbackmatch.prepare(net, x[:2], compile=False, conventions="paper")  # scales independent of the batch
    return net, plan, x, y


@pytest.mark.parametrize("as_kwarg", [False, True])
def test_closure_step_is_scaled_like_the_hand_loop(as_kwarg):
    net, plan, x, y = _setup()
    ref = lenet_bn()
    ref.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    plan.attach(opt, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_plan = fxbackmatch.prepare(ref, x[:2], compile=False, conventions="paper")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        # hand loop: backward, weight decay, multiply by the scales, step
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        sc = ref_plan.scales()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.grad.add_(p, alpha=1e-3).mul_(sc[n])
        ref_opt.step()
        loss = opt.step(closure=closure) if as_kwarg else opt.step(closure)
        assert torch.isfinite(loss)
    for (n, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)


def test_lbfgs_closure_sees_scaled_gradients():
    net, plan, x, y = _setup(1)
    copy = lenet_bn()
    copy.load_state_dict(net.state_dict())
    F.cross_entropy(copy(x), y).backward()
    scales = plan.scales()
    opt = torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=1)
    plan.attach(opt)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)  # one closure call: the gradients L-BFGS used are the rescaled ones
    for (n, p), q in zip(net.named_parameters(), copy.parameters()):
        torch.testing.assert_close(p.grad, q.grad * scales[n], rtol=1e-5, atol=1e-10, msg=n)


def test_attaching_twice_raises_and_remove_allows_it():
    net, plan, x, y = _setup()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    h = plan.attach(opt)
    with pytest.raises(fxbackmatch.AlreadyAttachedError, match="already attached"):
        plan.attach(opt)
    other = fxbackmatch.prepare(net, x[:2], compile=False, conventions="paper")
    with pytest.raises(fxbackmatch.AlreadyAttachedError, match="another plan"):
        other.attach(opt)
    h.remove()
    other.attach(opt)  # fine once the first is gone
    plan.attach(torch.optim.SGD(net.parameters(), lr=0.1))  # another optimizer: fine


# ---------------------------------------------------------------- lazy plans and persistence
def _hand_sgd(net, x, y, steps, lr=0.05):
    """A plain loop: backward, multiply each grad by a fresh plan's eager scales, SGD."""
    ref_plan = fxbackmatch.prepare(net, x[:2], compile=False, conventions="paper")
    for _ in range(steps):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        sc = ref_plan.scales()
        with torch.no_grad():
            for n, p in net.named_parameters():
                p -= lr * sc[n] * p.grad


def test_lazy_plan_follows_deepcopy_of_model_and_plan():
    """``copy.deepcopy(model)`` (an EMA copy, say) must not complete the original's plan, and
    a deep-copied waiting plan completes from its own model and trains like the hand loop."""
    import copy

    torch.manual_seed(5)
    net = lenet_bn()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plan = fxbackmatch.prepare(net, compile=False, conventions="paper")
    twin = copy.deepcopy(net)
    twin(x)
    twin(x)  # a second call used to raise AttributeError
    assert not plan.ready
    plan2 = copy.deepcopy(plan)
    assert plan2.model is not net and not plan2.ready
    ref = copy.deepcopy(plan2.model)
    opt = torch.optim.SGD(plan2.model.parameters(), lr=0.05)
    plan2.attach(opt)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(plan2.model(x), y).backward()  # the first call completes plan2
        opt.step()
    assert plan2.ready and not plan.ready
    _hand_sgd(ref, x, y, 2)
    for (n, a), b in zip(plan2.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)
    net(x)
    assert plan.ready and plan.targets == plan2.targets


def test_torch_save_with_a_waiting_plan_and_plan_pickling():
    import io
    import pickle

    net = lenet_bn()
    plan = fxbackmatch.prepare(net, compile=False, conventions="paper")
    buf = io.BytesIO()
    torch.save(net, buf)  # the waiting plan's hook is saved as a no-op
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded(torch.randn(2, 3, 32, 32))
    assert not plan.ready
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(plan)


def test_lazy_plan_from_a_keyword_only_forward():
    class KW(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = lenet_bn()

        def forward(self, *, images):
            return self.net(images)

    model = KW()
    plan = fxbackmatch.prepare(model, compile=False, conventions="paper")
    model(images=torch.randn(2, 3, 32, 32))
    assert plan.ready and plan.capture == "export"
    full = fxbackmatch.prepare(model.net, torch.randn(2, 3, 32, 32), compile=False, conventions="paper").scales()
    got = plan.scales()
    for n, v in full.items():
        assert got[f"net.{n}"] == pytest.approx(v, rel=1e-9)
