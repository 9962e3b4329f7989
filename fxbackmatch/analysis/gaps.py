"""Filling the gaps: what the walk does at an op that has no rule (``strict=False``, the
default). An op with no rule no longer ends the analysis; the walk fills the gap and the
report says how:

* **elementwise** ops (:func:`elementwise_fn`: the op keeps a 1-D tensor's shape, commutes
  with reversing it and reads no other tensor — see
  :func:`~fxbackmatch.analysis.meanfield.pointwise_callable` —, its Jacobian on a probe is
  diagonal, and its mean-field factors under a unit Gaussian are finite) get the generic
  elementwise rule, ``fxbackmatch.analysis.rules.activations.elementwise_rule``
  (``m ← m·E[φ'(z)²]`` under ``activations="meanfield"``, the identity under the paper's
  conventions); note :data:`ELEMENTWISE_NOTE`;
* **anything else** (a ``cumsum``, an FFT, a parameter-free module the rules do not know, an
  op whose domain excludes a Gaussian such as ``sqrt``): its own factor ``δa/δ'a`` towards
  each tensor input is *measured* on the live batch (:func:`measured_factor`: a per-step atom
  that :func:`fxbackmatch.measure.factors.measure_factors` fills every ``refresh`` steps,
  :mod:`fxbackmatch.measure.local` says how: the op alone, probed with the gradient that
  reaches it, normalized so that the chain above still gives the size). The rest of the
  chain stays derived: only the region the rules cannot cover is measured; note
  :data:`MEASURED_NOTE`. A module's parameters stay at scale 1, listed in ``plan.uncovered``.

Rules use :func:`measured_factor` too, for the inputs whose factor depends on the data in a
way the graph gives no estimate of (``torch.where``'s selected share, ``addcdiv``'s
quotient).

The measured local factor is the mean over **all** of the input's elements (those that
receive no gradient count 0) and the flow's ``frac`` is kept: a layer below sees ``m·s`` as
if the share that carries no gradient had shrunk ``frac`` instead. Until the first
measurement (a plan waiting for its first forward call) the factor is 1.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch.fx as fx

from .context import RuleContext
from .expr import AtomTable, Mono
from .meanfield import gaussian_factors, pointwise_callable
from .records import Flow
from .registry import Rule

__all__ = ["LOCAL_PREFIX", "ELEMENTWISE_NOTE", "MEASURED_NOTE", "local_ref", "parse_local_ref", "local_refs",
           "measured_factor", "elementwise_fn", "fill_gap"]

#: buffer-name prefix of a measured local factor atom (``fxbackmatch.local:<node><-<input>``)
LOCAL_PREFIX = "fxbackmatch.local:"
_SEP = "<-"
#: report note of an op with no rule filled by the generic elementwise rule
ELEMENTWISE_NOTE = "no rule: treated as elementwise (mean-field)"
#: report note of an op with no rule whose own factor is measured on the batch
MEASURED_NOTE = ("no rule: its own factor is measured on the live batch (the op alone, probed with the gradient "
                 "that reaches it; the chain around it derived)")


def local_ref(node: str, inp: str) -> str:
    """The atom reference of node ``node``'s measured factor towards its input ``inp``."""
    return f"{LOCAL_PREFIX}{node}{_SEP}{inp}"


def parse_local_ref(ref: str) -> tuple[str, str]:
    """``(node, input)`` of a :func:`local_ref`."""
    if not ref.startswith(LOCAL_PREFIX) or _SEP not in ref:
        raise ValueError(f"{ref!r} is not a measured local factor reference")
    node, _, inp = ref[len(LOCAL_PREFIX):].partition(_SEP)
    return node, inp


def local_refs(atoms: AtomTable) -> list[str]:
    """Every measured local factor the analysis asked for, in atom order."""
    return [a.ref for a in atoms.atoms if a.kind == "stat_mean" and a.ref.startswith(LOCAL_PREFIX)]


def measured_factor(ctx: RuleContext, inp: fx.Node) -> Mono:
    """The factor of ``ctx.node`` towards its input ``inp`` — ``mean diag(J_iᵀJ_i)``, ``J_i`` the
    Jacobian of the node's output(s) with respect to that input alone, weighted by the
    gradient that reaches the node (:mod:`fxbackmatch.measure.local`) — measured on the live
    batch every ``refresh`` steps; 1 until the first measurement."""
    return Mono.atom(ctx.atoms.stat(local_ref(ctx.node.name, inp.name)))


def elementwise_fn(node: fx.Node, gm: fx.GraphModule, x: fx.Node | None) -> Callable | None:
    """``t ↦ op(t)`` if ``node`` is elementwise in its tensor input ``x``
    (:func:`~fxbackmatch.analysis.meanfield.pointwise_callable`) and its mean-field factors
    under ``z ~ N(0, 1)`` are finite; ``None`` otherwise — ``sqrt``, ``log``, ``rsqrt`` are
    elementwise but not defined on a zero-mean Gaussian: their factor is measured instead."""
    if x is None:
        return None
    fn = pointwise_callable(node, gm, x)  # elementwise: shape, reversal and a diagonal Jacobian
    if fn is None:
        return None
    try:
        f = gaussian_factors(fn, 1.0)
    except Exception:  # the op does not run on the quadrature nodes: not one to model
        return None
    if not all(math.isfinite(v) for v in (f.back, f.second, f.var)):
        return None
    return fn


def fill_gap(walker: Any, node: fx.Node, flow: Flow, what: str, rule_fn: Callable[[RuleContext], None]) -> None:
    """Fill the gap at ``node`` (no rule, ``strict=False``): ``rule_fn`` (the generic
    elementwise rule) for an elementwise op, or measured local factors for each tensor input;
    a module's trainable parameters stay at scale 1 and are listed uncovered. ``walker`` is the
    running walk (:mod:`fxbackmatch.analysis.walk`: ``gm``, ``notes``, ``contribute``,
    ``uncovered``, ``param_names``, ``atoms``, ``live``)."""
    gm = walker.gm
    rule = Rule(name="elementwise_rule (no rule registered)", fn=rule_fn, key=("gap", node.target), transparent=True)
    ctx = RuleContext(walker, node, rule, flow)
    ins = ctx.inputs  # tensor inputs; parameters (also read through views) are not inputs
    if elementwise_fn(node, gm, ins[0] if len(ins) == 1 else None) is not None:
        rule(ctx)
        walker.notes.append(f"{what} at '{node.name}': {ELEMENTWISE_NOTE}")
        return
    if node.op == "call_module":
        for _, p in gm.get_submodule(node.target).named_parameters():
            name = walker.param_names.get(id(p))
            if name and p.requires_grad:
                walker.uncovered.setdefault(name, f"{what} has no rule (its parameters stay at scale 1)")
    live = [a for a in dict.fromkeys(ins) if a in walker.live and _floating(a)]
    for inp in live:
        ctx.pass_to(inp, flow.m * measured_factor(ctx, inp))
    if live:
        walker.notes.append(f"{what} at '{node.name}': {MEASURED_NOTE}")


def _floating(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return getattr(val, "is_floating_point", lambda: True)()
