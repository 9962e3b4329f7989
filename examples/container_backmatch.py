"""Back-matching rates with a torchtitan-style optimizer container: attach to the container.

    python examples/container_backmatch.py        # synthetic data, CPU, a second

torchtitan's ``OptimizersContainer`` subclasses ``torch.optim.Optimizer`` and calls
``Optimizer.__init__`` over all parameters so that step hooks work on it; its ``step()`` steps
one inner optimizer per model part. ``plan.attach(container)`` rescales every part's gradients
once, before the inner steps. Do not attach the plan to each inner optimizer: each attached step
rescales all of the plan's parameters, so the later parts would be scaled twice.
"""
import torch
import torch.nn.functional as F

import fxbackmatch
from fxbackmatch.models import lenet_bn


class OptimizersContainer(torch.optim.Optimizer):
    """A minimal torchtitan-like container: one inner optimizer per parameter list."""

    def __init__(self, parts, make):
        self.optimizers = [make(list(p)) for p in parts]
        all_params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        torch.optim.Optimizer.__init__(self, all_params, {})  # gives the container step hooks

    def step(self, *args, **kwargs):
        for o in self.optimizers:
            o.step(*args, **kwargs)

    def zero_grad(self, *args, **kwargs):
        for o in self.optimizers:
            o.zero_grad(*args, **kwargs)


if __name__ == "__main__":
    torch.manual_seed(0)
    net = lenet_bn()
    x_all, y_all = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    params = list(net.parameters())
    parts = [params[: len(params) // 2], params[len(params) // 2:]]  # e.g. two pipeline stages
    opts = OptimizersContainer(parts, lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9))

    plan = fxbackmatch.prepare(net, x_all[:2], compile=False)
    plan.attach(opts, weight_decay=5e-4)  # the one line: attach to the container

    for step, i in enumerate(range(0, 256, 32)):
        opts.zero_grad()
        loss = F.cross_entropy(net(x_all[i:i + 32]), y_all[i:i + 32])
        loss.backward()
        opts.step()
        print(f"step {step}: loss {loss.item():.3f}")
    print(plan.scales())
