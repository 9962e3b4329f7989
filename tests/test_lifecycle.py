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
    plan = fxbackmatch.prepare(net, x[:2], compile=False)
    return net, plan, x, y


@pytest.mark.parametrize("as_kwarg", [False, True])
def test_closure_step_is_scaled_like_the_hand_loop(as_kwarg):
    net, plan, x, y = _setup()
    ref = lenet_bn()
    ref.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    plan.attach(opt, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_plan = fxbackmatch.prepare(ref, x[:2], compile=False)

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
    other = fxbackmatch.prepare(net, x[:2], compile=False)
    with pytest.raises(fxbackmatch.AlreadyAttachedError, match="another plan"):
        other.attach(opt)
    h.remove()
    other.attach(opt)  # fine once the first is gone
    plan.attach(torch.optim.SGD(net.parameters(), lr=0.1))  # another optimizer: fine
