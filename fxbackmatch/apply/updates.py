"""The fused step's functional core: the SGD and Adam/AdamW updates over parameter lists, as
:class:`~fxbackmatch.apply.fused.FusedStep` compiles them (``torch.compile(fullgraph=True)``
with the scheduler pass of :mod:`.schedule`) — and runs them eagerly under ``compile=False``.
Each scales every gradient as ``attach()`` rounds it, updates in place and, for a weight the
scales read (``slot >= 0``), returns the sum of squares of what it wrote."""
from __future__ import annotations

import torch

from ..runtime.norms import sumsq
from ..runtime.transfer import to_device

__all__ = ["adam_bias", "adam_update", "passed_as", "sgd_update", "weight_sq"]


def weight_sq(
    read: list[torch.Tensor], read_at: list[int], kept: list[torch.Tensor], kept_at: list[int], n: int
) -> list[torch.Tensor]:
    """The ``n`` weights' ``sum(W²)`` in the generated order: ``read`` summed here, ``kept`` given."""
    out: list = [None] * n  # every slot is filled: read_at and kept_at split range(n)
    for j, w in zip(read_at, read):
        out[j] = sumsq(w)
    for j, s in zip(kept_at, kept):
        out[j] = s
    return out


def passed_as(v, dtype: torch.dtype):
    """A passed float64 tensor in ``dtype``, at least float32 (bfloat16 would round β₂ = 0.999
    to 1); a compiled-in Python float as it is."""
    return v.to(torch.promote_types(dtype, torch.float32)) if isinstance(v, torch.Tensor) else v


def sgd_update(params, grads, bufs, scales, index, lrs, momenta, group_of, wd, nesterov, slot, new_sq):
    for i, p in enumerate(params):
        gi = group_of[i]
        g = grads[i]
        if wd:
            g = g + wd * p
        k = index[i]
        if k >= 0:
            g = g * scales[k].to(g.dtype)  # as attach() rounds it
        buf = bufs[i]
        momentum = passed_as(momenta[gi], buf.dtype)
        buf.mul_(momentum).add_(g)
        step = g + momentum * buf if nesterov[gi] else buf
        p.sub_(lrs[gi].to(p.dtype) * step)
        if slot[i] >= 0:  # a weight the scales read: sum what was just written
            new_sq[slot[i]] = sumsq(p)


def adam_bias(steps: list[torch.Tensor], lr: torch.Tensor, b1: torch.Tensor,
               b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every parameter's ``lr / (1 − β₁ᵗ)`` and ``√(1 − β₂ᵗ)`` for the coming step ``t``, in
    float64 as torch.optim.Adam's (``lr``, ``b1``, ``b2``: one entry per parameter). Computed
    before the compiled update and passed in: inside it inductor inlines such scalars into each
    parameter's loop (two ``pow`` per vector)."""
    t = to_device(torch.stack(steps).to(torch.float64), b1.device) + 1  # CPU step counters: no sync
    return lr / (1 - b1 ** t), (1 - b2 ** t).sqrt()


def adam_update(params, grads, m1, m2, steps, scales, index, lrs, b1s, b2s, wds, group_of, wd, eps, decoupled,
                 slot, new_sq, step_size, bc2_sqrt):
    for s in steps:
        s.add_(1)
    for i, p in enumerate(params):
        gi = group_of[i]
        g = grads[i]
        if wd:  # compile_step's own weight decay, added to the gradient as attach() does
            g = g + wd * p
        k = index[i]
        if k >= 0:
            g = g * scales[k].to(g.dtype)  # as attach() rounds it
        if decoupled:  # AdamW: the group's weight decay
            p.mul_(1 - lrs[gi] * wds[gi])
        m1[i].lerp_(g, passed_as(1 - b1s[gi], g.dtype))
        w2 = passed_as(1 - b2s[gi], g.dtype)
        if isinstance(w2, float):  # compiled in: torch.optim.Adam's own ops
            m2[i].mul_(b2s[gi]).addcmul_(g, g, value=w2)
        else:  # passed in: addcmul_ takes no tensor value
            m2[i].mul_(passed_as(b2s[gi], g.dtype)).add_(w2 * g * g)
        denom = (m2[i].sqrt() / bc2_sqrt[i]).add_(eps[gi])
        p.sub_(step_size[i] * m1[i] / denom)
        if slot[i] >= 0:
            new_sq[slot[i]] = sumsq(p)
