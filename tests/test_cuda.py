"""GPU-only paths (skipped without CUDA): the scales replayed as a CUDA graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxbackmatch
from fxbackmatch.models import lenet_bn

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_graphed_scales_follow_weights_statistics_and_new_storage(compile):
    """The graph replays what the plain function computes — after optimizer steps (in-place
    writes), a forward that moves BatchNorm statistics, and a weight given new storage
    (``p.data = …``, which must trigger a new capture)."""
    torch.manual_seed(0)
    net = lenet_bn().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    plan = fxbackmatch.prepare(net, x[:2], compile=compile)
    rt = plan._runtime
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    plan.attach(opt)

    def plain() -> torch.Tensor:
        rt.cuda_graph = False
        try:
            return plan.scale_tensor().clone()
        finally:
            rt.cuda_graph = True

    for step in range(6):
        graphed = plan.scale_tensor()
        assert rt._graphed is not None
        torch.testing.assert_close(graphed, plain(), rtol=1e-12, atol=0)
        if step == 3:
            w = net.conv1.weight if hasattr(net, "conv1") else next(net.parameters())
            first = rt._graphed
            w.data = w.data.clone() * 2
            torch.testing.assert_close(plan.scale_tensor(), plain(), rtol=1e-12, atol=0)
            assert rt._graphed is not first
        opt.zero_grad()
        F.cross_entropy(net(x * (1 + step)), y).backward()
        opt.step()
