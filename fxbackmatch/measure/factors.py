"""Measured backward factors: ``mean diag(JᵀJ)`` at every value of the graph, by autograd.

The rules *derive* each value's factor ``m`` under the paper's approximations; this module
*measures* it. With ``J`` the Jacobian of the loss outputs with respect to a value ``a``,
a random probe ``v`` at the outputs (Rademacher: ``E[vvᵀ] = I``) back-propagates to
``u = Jᵀv`` at every value at once, and ``E[u²] = diag(JᵀJ)`` (Hutchinson). The measured
``m`` of a value is the mean of that diagonal over the elements that carry gradient.

It runs the model's own graph on a real batch (activation derivatives included — ReLU
masks, BN's batch coupling), on ``torch.autograd.grad`` only: no parameter's ``.grad`` is
touched, and buffers (BatchNorm running statistics) are restored afterwards.

**Local factors** (``local=``): the factor of one op alone towards one of its inputs, for the
ops no rule covers (:mod:`fxbackmatch.analysis.gaps`), measured in the same forward
(:mod:`.local`: upstream-weighted where the probes reach the op, isotropic elsewhere).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .local import LocalRuns, rademacher

__all__ = ["measure_values", "measure_factors", "Measurement", "carrying_mean"]


@dataclass
class Measurement:
    """``m``: measured ``mean diag(JᵀJ)`` per value; ``moments``: its ``E[a²]`` on the batch;
    ``local``: ``(op, input) ->`` the factor of that op alone towards that input (:mod:`.local`)."""

    m: dict[str, float]
    moments: dict[str, float]
    local: dict[tuple[str, str], float] = field(default_factory=dict)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[str], moments: set[str] = frozenset(),
                 local: LocalRuns | None = None):
        super().__init__(gm)
        self.keep = keep
        self.moment_keep = moments
        self.values: dict[str, torch.Tensor] = {}
        self.moments: dict[str, float] = {}
        self.local = local if local is not None else LocalRuns({})

    def run_node(self, n: fx.Node):
        self.local.before(n, self.env, lambda op, target, args, kwargs: getattr(self, op)(target, args, kwargs))
        out = super().run_node(n)
        self.local.after(n, out)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            if n.name in self.keep and out.requires_grad:
                self.values[n.name] = out
            if n.name in self.moment_keep:
                self.moments[n.name] = float(out.detach().double().square().mean()) if out.numel() else 0.0
        return out


def carrying_mean(diag: torch.Tensor, rel: float = 1e-10) -> float:
    """Mean of a measured diagonal over its elements that carry gradient (``> rel·max``)."""
    d = diag.detach().double().reshape(-1)
    top = float(d.max()) if d.numel() else 0.0
    if top <= 0:
        return 0.0
    keep = d > rel * top
    return float(d[keep].mean())


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """Run the block, then put the model's buffers (BatchNorm statistics) back as they were."""
    saved = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def measure_values(
    gm: fx.GraphModule,
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    outputs: Iterable[str],
    nodes: Iterable[str] | None = None,
    *,
    probes: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Measured ``mean diag(JᵀJ)`` at the named nodes (every tensor node if ``None``), with
    ``J`` the Jacobian of the nodes named in ``outputs`` (the loss outputs)."""
    return measure_factors(gm, model, inputs, outputs, nodes, probes=probes, seed=seed).m


def measure_factors(
    gm: fx.GraphModule,
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    outputs: Iterable[str],
    nodes: Iterable[str] | None = None,
    moments: Iterable[str] = (),
    *,
    probes: int = 16,
    seed: int = 0,
    local: Iterable[tuple[str, str]] = (),
) -> Measurement:
    """:func:`measure_values` and, from the same forward, ``E[a²]`` (the mean of the squared
    entries) of the values named in ``moments`` — the forward statistics the rules would
    otherwise estimate from the weights below — and the local factors of the ``(op, input)``
    pairs in ``local`` (:mod:`.local`)."""
    outputs = list(outputs)
    wanted: dict[str, list[str]] = {}
    for op, inp in local:
        wanted.setdefault(op, []).append(inp)
    runs = LocalRuns(wanted)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = {n.name for n in gm.graph.nodes if n.op not in ("output", "get_attr")} if nodes is None else set(nodes)
    if not keep and not wanted:  # moments only: one forward, no probes
        with _buffers_kept(model), torch.no_grad():
            rec = _Recorder(gm, set(), set(moments))
            rec.run(*inputs)
        return Measurement({}, rec.moments)
    keep |= set(outputs)
    inputs = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in inputs]
    with _buffers_kept(model):
        with torch.enable_grad():
            rec = _Recorder(gm, keep, set(moments), runs)
            rec.run(*inputs)
            vals = rec.values
            outs = [vals[o] for o in outputs if o in vals]
            names = [k for k in vals if k in keep]
            targets = [vals[k] for k in names]
            upstream = runs.upstream_targets() if outs else []
            if not outs and len(keep) > len(set(outputs)):
                raise ValueError("no loss output of the graph depends on a differentiable value")
            acc = [torch.zeros_like(t, dtype=torch.float64) for t in targets]
            for _ in range(probes if outs and (targets or upstream) else 0):
                vs = [rademacher(o, gen) for o in outs]
                grads = torch.autograd.grad(outs, targets + [t for _, _, t in upstream], grad_outputs=vs,
                                            retain_graph=True, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.detach().double().square())
                by_op: dict[str, dict[int, torch.Tensor | None]] = {}
                for (op, i, _), g in zip(upstream, grads[len(targets):]):
                    by_op.setdefault(op, {})[i] = g
                for op, gs in by_op.items():
                    runs.accumulate(op, gs)
            found = runs.factors(probes, gen)
    return Measurement({k: carrying_mean(a / probes) for k, a in zip(names, acc)}, rec.moments, found)
