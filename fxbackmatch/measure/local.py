"""Measured local factors: the ``δa/δ'a`` of one op no rule covers, on the live batch.

For an op ``y = f(a_1, …)`` the analysis (:mod:`fxbackmatch.analysis.gaps`) asks for the
factor of each tensor input ``a_i`` — what a rule would have derived. The op is run a second
time, during the forward that :func:`~fxbackmatch.measure.factors.measure_factors` records,
on detached copies of its inputs, and probed at its output:

* **upstream-weighted** (the default, where the loss outputs depend on the op): the probe at
  the op's output is the real backward signal ``g = J_aboveᵀv`` (``v`` Rademacher at the loss
  outputs), so ``u_i = J_iᵀg`` and the factor is ``(E‖u_i‖²/n_i) / (E‖g‖²/n_y)`` —
  ``mean diag(J_iᵀ Σ_g J_i) / mean diag(Σ_g)`` with ``Σ_g = E[ggᵀ]``: the op's factor as the
  gradient that reaches it sees it. Its *size* stays the derived chain's (the ratio is
  scale-free), its *direction* is the batch's: for an anisotropic op (``cumsum``, whose
  ``JᵀJ`` has one dominant direction) the alignment with the layers above is measured, not
  assumed isotropic. With ``Σ_g ∝ I`` it is the isotropic factor below.
* **isotropic** (no upstream gradient: a zero-initialized head, or outputs that do not depend
  on the op): Rademacher probes at the op's output, ``mean diag(J_iᵀJ_i)``.

Means run over all of the input's (output's) elements; the ones with no gradient count 0.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

__all__ = ["LocalRuns", "tensors_of", "rademacher"]


def tensors_of(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) op output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    return []


def rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """±1 entries of ``like``'s shape, dtype and device, drawn on the CPU generator ``gen``."""
    return torch.randint(0, 2, like.shape, generator=gen).to(like.device, like.dtype) * 2 - 1


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.requires_grad


class LocalRuns:
    """The second runs of the ops in ``wanted`` (op name -> input names) and their probes."""

    def __init__(self, wanted: dict[str, list[str]]):
        self.wanted = wanted
        self.leaves: dict[str, dict[str, torch.Tensor]] = {}  # op -> input name -> leaf copy
        self.outs: dict[str, list[torch.Tensor]] = {}  # op -> the second run's outputs
        self.main: dict[str, list[torch.Tensor | None]] = {}  # op -> the graph's own outputs, aligned
        self._u2: dict[str, dict[str, torch.Tensor]] = {}
        self._g2: dict[str, float] = {}

    def before(self, n: fx.Node, env: dict, call: Callable) -> None:
        """Run op ``n`` again on leaf copies of its wanted inputs (before the op itself runs:
        an in-place op would change them). ``call(op, target, args, kwargs)`` runs a node."""
        inputs = self.wanted.get(n.name)
        if not inputs:
            return
        leaves = {a.name: env[a].detach().clone().requires_grad_(True) for a in n.all_input_nodes
                  if a.name in inputs and isinstance(env.get(a), torch.Tensor) and env[a].is_floating_point()}
        if not leaves:
            return
        with torch.enable_grad():  # also where the recording forward runs under no_grad
            # each use reads a copy of its leaf: an in-place op must not write into the leaf
            args, kwargs = fx.node.map_arg(
                (n.args, n.kwargs), lambda a: leaves[a.name].clone() if a.name in leaves else env[a])
            out = call(n.op, n.target, args, kwargs)
        self.leaves[n.name] = leaves
        self.outs[n.name] = tensors_of(out)

    def after(self, n: fx.Node, out: Any) -> None:
        """Keep the graph's own output of a wanted op, aligned with the second run's."""
        if n.name in self.outs:
            main = tensors_of(out)
            aligned = len(main) == len(self.outs[n.name])
            self.main[n.name] = [m if _differentiable(m) else None for m in main] if aligned else []

    def upstream_targets(self) -> list[tuple[str, int, torch.Tensor]]:
        """``(op, index, tensor)`` of the graph's outputs of the wanted ops that the probes can
        reach (the upstream-weighted measurement's targets)."""
        return [(op, i, m) for op, mains in self.main.items() for i, m in enumerate(mains)
                if m is not None and _differentiable(self.outs[op][i])]

    def accumulate(self, op: str, grads: dict[int, torch.Tensor | None]) -> None:
        """One probe of the upstream-weighted measurement: ``g`` at op ``op``'s outputs."""
        pairs = [(self.outs[op][i], g) for i, g in grads.items() if g is not None]
        if not pairs:
            return
        self._g2[op] = self._g2.get(op, 0.0) + sum(float(g.detach().double().square().sum()) for _, g in pairs)
        self._vjp(op, [o for o, _ in pairs], [g for _, g in pairs])

    def _vjp(self, op: str, outs: Sequence[torch.Tensor], gs: Sequence[torch.Tensor]) -> None:
        names = list(self.leaves[op])
        got = torch.autograd.grad(list(outs), [self.leaves[op][k] for k in names], grad_outputs=list(gs),
                                  retain_graph=True, allow_unused=True)
        acc = self._u2.setdefault(op, {})
        for k, u in zip(names, got):
            if u is not None:
                acc[k] = acc.get(k, 0) + u.detach().double().square().sum()

    def factors(self, probes: int, gen: torch.Generator) -> dict[tuple[str, str], float]:
        """``(op, input) -> factor``: upstream-weighted where a probe reached the op's output,
        isotropic (``probes`` Rademacher probes at it) elsewhere."""
        out: dict[tuple[str, str], float] = {}
        for op, leaves in self.leaves.items():
            outs = [o for o in self.outs[op] if _differentiable(o)]
            n_out = sum(o.numel() for o in outs)
            g2 = self._g2.get(op, 0.0)
            if g2 > 0:
                ref = g2 / max(1, n_out)
            else:  # nothing reached it from above: the op's own mean diag(JᵀJ)
                self._u2.pop(op, None)
                for _ in range(max(1, probes) if outs else 0):
                    self._vjp(op, outs, [rademacher(o, gen) for o in outs])
                ref = float(max(1, probes))
            u2 = self._u2.get(op, {})
            for k, leaf in leaves.items():
                out[(op, k)] = float(u2.get(k, 0.0)) / max(1, leaf.numel()) / ref if outs else 0.0
        return out
