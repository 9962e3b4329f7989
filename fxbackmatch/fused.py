"""A fused training update: scales and the optimizer's update in one compiled call.

``plan.compile_step(optimizer)`` returns a callable that replaces ``optimizer.step()``:
one ``torch.compile(fullgraph=True)`` function reads every weight once for its norm,
computes the scales, and applies the scaled gradient inside the optimizer's own update
(SGD with momentum/Nesterov, Adam, AdamW), so there is no separate pass that writes the
gradients. The optimizer's state (``momentum_buffer``; ``step``, ``exp_avg``,
``exp_avg_sq``) is the optimizer's own, so ``optimizer.state_dict()`` and switching back to
``optimizer.step()`` keep working. Learning rates are passed as tensors: schedulers do not
trigger recompiles.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["FusedStep"]


def _sgd_update(params, grads, bufs, scales, index, lrs, group_of, wd, momentum, nesterov):
    for i, p in enumerate(params):
        g = grads[i]
        if wd:
            g = g + wd * p
        k = index[i]
        if k >= 0:
            g = g * scales[k].to(g.dtype)
        buf = bufs[i]
        buf.mul_(momentum[group_of[i]]).add_(g)
        step = g + momentum[group_of[i]] * buf if nesterov[group_of[i]] else buf
        p.sub_(lrs[group_of[i]].to(p.dtype) * step)


def _adam_update(params, grads, m1, m2, steps, scales, index, lrs, group_of, wd, betas, eps, decoupled):
    for i, p in enumerate(params):
        gi = group_of[i]
        g = grads[i]
        if wd and not decoupled[gi]:
            g = g + wd * p
        k = index[i]
        if k >= 0:
            g = g * scales[k].to(g.dtype)
        lr = lrs[gi]
        if decoupled[gi]:
            p.mul_(1 - lr * decoupled[gi])
        b1, b2 = betas[gi]
        steps[i].add_(1)
        bc1 = 1 - b1 ** steps[i]
        bc2 = 1 - b2 ** steps[i]
        m1[i].lerp_(g, 1 - b1)
        m2[i].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (m2[i].sqrt() / bc2.sqrt()).add_(eps[gi])
        p.sub_((lr / bc1) * m1[i] / denom)


class FusedStep:
    """Callable replacing ``optimizer.step()`` for SGD(momentum) and Adam/AdamW."""

    def __init__(self, plan: "Plan", optimizer: torch.optim.Optimizer, weight_decay: float = 0.0, compile: bool = True):
        self.plan, self.optimizer, self.weight_decay = plan, optimizer, float(weight_decay)
        kind = type(optimizer)
        if kind is torch.optim.SGD:
            self.kind = "sgd"
            for g in optimizer.param_groups:
                if g["dampening"] or g["weight_decay"] or g["maximize"] or not g["momentum"]:
                    raise ValueError(
                        "compile_step supports SGD with momentum > 0, dampening=0, maximize=False and "
                        "weight_decay=0 (pass weight_decay to compile_step); use attach() otherwise"
                    )
        elif kind in (torch.optim.Adam, torch.optim.AdamW):
            self.kind = "adam"
            for g in optimizer.param_groups:
                if g["amsgrad"] or g["maximize"] or (kind is torch.optim.Adam and g["weight_decay"]):
                    raise ValueError(
                        "compile_step supports Adam/AdamW without amsgrad/maximize (Adam: pass "
                        "weight_decay to compile_step); use attach() otherwise"
                    )
            import warnings

            from .errors import AdaptiveOptimizerWarning

            warnings.warn(
                f"fxbackmatch: compile_step fuses a gradient rescale into {kind.__name__}, whose "
                f"normalization cancels it.\n  What to do: plan.attach(optimizer, mode='length') "
                f"gives each layer's update back-matching's length.",
                AdaptiveOptimizerWarning, stacklevel=3,
            )
        else:
            raise TypeError(f"compile_step supports torch.optim.SGD, Adam and AdamW, not {kind.__name__}; use attach()")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.group_of = [gi for gi, g in enumerate(optimizer.param_groups) for _ in g["params"]]
        pos = {id(p): k for k, p in enumerate(plan._runtime.targets)}
        self.index = [pos.get(id(p), -1) for p in self.params]
        self._fn: Callable | None = None
        self._compile = compile

    def _state(self):
        st = self.optimizer.state
        if self.kind == "sgd":
            bufs = []
            for p in self.params:
                s = st[p]
                if s.get("momentum_buffer") is None:
                    s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(s["momentum_buffer"])
            return (bufs,)
        m1, m2, steps = [], [], []
        for p in self.params:
            s = st[p]
            if "step" not in s:
                s["step"] = torch.tensor(0.0, dtype=torch.float32)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m1.append(s["exp_avg"])
            m2.append(s["exp_avg_sq"])
            steps.append(s["step"])
        return m1, m2, steps

    def _build(self):
        rt = self.plan._runtime
        factors = rt.gen.fn
        groups = self.optimizer.param_groups
        index, group_of, wd = self.index, self.group_of, self.weight_decay
        if self.kind == "sgd":
            momentum = [float(g["momentum"]) for g in groups]
            nesterov = [bool(g["nesterov"]) for g in groups]

            def step(weights, stats, consts, params, grads, lrs, bufs):
                scales = factors(weights, [], stats, consts)
                _sgd_update(params, grads, bufs, scales, index, lrs, group_of, wd, momentum, nesterov)
        else:
            betas = [tuple(float(b) for b in g["betas"]) for g in groups]
            eps = [float(g["eps"]) for g in groups]
            decoupled = [float(g["weight_decay"]) if isinstance(self.optimizer, torch.optim.AdamW) else 0.0 for g in groups]

            def step(weights, stats, consts, params, grads, lrs, m1, m2, steps):
                scales = factors(weights, [], stats, consts)
                _adam_update(params, grads, m1, m2, steps, scales, index, lrs, group_of, wd, betas, eps, decoupled)

        return torch.compile(step, fullgraph=True, dynamic=False) if self._compile else step

    @torch.no_grad()
    def __call__(self) -> None:
        self.plan._check()
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("compile_step needs a gradient for every parameter; use attach() when some are None")
        rt = self.plan._runtime
        if rt.gen.grad_refs:
            raise ValueError("compile_step supports gradient-independent rules (backmatch, sgd)")
        if self._fn is None:
            self._fn = self._build()
        dev = rt.device()
        consts = rt._consts.get(dev) or rt._consts.setdefault(dev, rt.gen.constants_on(dev))
        lrs = [torch.as_tensor(g["lr"], dtype=torch.float64, device=dev) for g in self.optimizer.param_groups]
        stats = [rt.buffers[r] for r in rt.stat_refs]
        self._fn(rt.weights, stats, consts, self.params, grads, lrs, *self._state())
        self.optimizer._opt_called = True  # tell LR schedulers the optimizer stepped
