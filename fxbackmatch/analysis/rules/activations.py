"""Rules for elementwise activations: ReLU and every other pointwise nonlinearity.

``activations="paper"`` (``Conventions()``): an activation is the identity, as the paper's
ReLU (eq. 31) — ``m``, positions and channels pass unchanged; ReLU follows ``relu``.

``activations="meanfield"`` (the default): under a zero-mean Gaussian pre-activation ``z`` of
the variance ``σ²`` the chain already knows, ``y = φ(z)`` has ``J = diag(φ'(z))``, so

* ``m ← m·E[φ'(z)²]`` (``mean diag(JᵀJ)``; ReLU: ½ — half of the units carry gradient);
* ``E[y²]`` for the rules above is ``Var[φ(z)]`` (ReLU: ``(½ − 1/2π)·σ²``; the mean is a
  single direction that the next norm removes, as ``relu="exact"`` took it),

both by Gauss quadrature (:mod:`..meanfield`), once per (function, σ²). The
pre-activation is taken as zero-mean where it is a norm layer's or a weighted layer's output
(zero-mean weights), looking through reshapes and dropout; elsewhere (a ReLU of a residual
sum, mostly active) the paper's identity stays, noted. ``σ²`` is the chain's ``E[z²]`` at the
weights of ``prepare``; where it reads a value only a batch gives, 1 (noted). The forward
moment keeps the chain's dependence on the weights: it is ``E[z²]·Var[φ]/σ²`` — exact for
positively homogeneous ``φ`` (ReLU, LeakyReLU), the value at ``σ²`` otherwise.

:func:`elementwise_rule` is the same rule for an op no rule knows but that is found to be
elementwise (the walk's gap filling).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..context import RuleContext
from ..expr import Mono
from ..meanfield import MeanField, gaussian_factors, pointwise_callable
from ..registry import register_rule

__all__ = ["activation_rule", "relu_rule", "dropout_rule", "elementwise_rule", "RELU_VAR", "zero_mean_input"]

#: ``Var[relu(z)]`` for a normalized ``z``
RELU_VAR = 0.5 - 1 / (2 * 3.141592653589793)

_MODULES = (nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh,
            nn.Hardswish, nn.Softplus, nn.Softsign, nn.Tanhshrink)
_FUNCTIONS = (F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, torch.tanh, F.tanh, F.hardtanh,
              F.hardswish, F.softplus, F.softsign)
_METHODS = ("tanh", "tanh_")
#: rules looked through when asking what produced an activation's input
_LOOK_THROUGH = ("identity_rule", "dropout_rule")


def _producer(ctx: RuleContext, x: fx.Node):
    """The rule of what produced ``x``, looking through reshapes and dropout (``None`` for an input)."""
    for _ in range(16):
        rule = ctx.rule_of(x)
        ins = [a for a in x.all_input_nodes if a.op != "get_attr"]
        if rule is None or rule.name not in _LOOK_THROUGH or not ins:
            return rule
        x = ins[0]
    return None


def zero_mean_input(ctx: RuleContext, x: fx.Node) -> bool:
    """Whether ``x`` is (a view of) a norm layer's or a weighted layer's output: a zero-mean
    pre-activation under the mean-field assumptions."""
    rule = _producer(ctx, x)
    return rule is not None and (rule.norm or (rule.row_norm is not None and not rule.transparent
                                               and not rule.averages))


def _meanfield(ctx: RuleContext) -> tuple[MeanField, Mono | None, float] | None:
    """The node's mean-field factors and its input's ``E[z²]``, where they apply."""
    if ctx.activations_mode != "meanfield" or not ctx.inputs:
        return None
    x = ctx.inputs[0]
    if not zero_mean_input(ctx, x):
        return None
    fn = pointwise_callable(ctx.node, ctx.gm, x)
    if fn is None:
        return None
    below, _ = ctx.variance_below(x)
    var = ctx.value_now(below) if below is not None else None
    if var is None or not var > 0:
        ctx.note("mean-field: σ² taken as 1 (the pre-activation's E[z²] needs a batch)")
        var = 1.0
    return gaussian_factors(fn, var), below, var


def _apply(ctx: RuleContext, got: tuple | None = None) -> bool:
    got = _meanfield(ctx) if got is None else got
    if got is None:
        return False
    mf, _, var = got
    ctx.note(f"mean-field: E[φ'²] = {mf.back:.4g} at σ² = {var:.4g}")
    ctx.pass_to(ctx.inputs[0], ctx.m_out * mf.back)
    return True


def _moment(ctx: RuleContext) -> Mono | None:
    """``E[z²]·Var[φ]/σ²`` under the mean-field; the input's moment (the identity) otherwise."""
    got = _meanfield(ctx)
    if got is None:
        below, _ = ctx.variance_below(ctx.inputs[0]) if ctx.inputs else (None, "")
        return below
    mf, below, var = got
    # after a norm layer the consumer is a conv/linear feeding the next norm, which removes the
    # mean: Var[φ] (relu="exact"'s ½ − 1/2π, checked against measured Jacobians); elsewhere the
    # next layer's pre-activation and normal matrix see the second moment E[φ²] (mean included)
    producer = _producer(ctx, ctx.inputs[0])
    normed = producer is not None and producer.norm
    ratio = max(mf.var if normed else mf.second, 1e-30) / var
    return (below if below is not None else Mono()) * ratio


@register_rule(module=_MODULES, function=_FUNCTIONS, method=_METHODS, transparent=True, moment=_moment)
def activation_rule(ctx: RuleContext) -> None:
    """Pointwise activations other than ReLU (GELU, SiLU, tanh, ELU, LeakyReLU, hardswish,
    Mish, softplus, …): the identity (the paper), or the mean-field factors (module
    docstring)."""
    if ctx.inputs and not _apply(ctx):
        ctx.pass_to(ctx.inputs[0], ctx.m_out)


def _relu_exact(ctx: RuleContext) -> bool:
    """``relu="exact"`` applies where its values hold: a ReLU of a norm layer's output, whose
    input is zero-mean and symmetric (half active, ``Var = 1/2 − 1/2π``). A ReLU of a residual
    sum (a non-negative stream plus a branch: mostly active) keeps the paper's identity."""
    if ctx.relu_mode != "exact" or not ctx.inputs:
        return False
    rule = ctx.rule_of(ctx.inputs[0])
    return rule is not None and rule.norm


def _relu_moment(ctx: RuleContext) -> Mono | None:
    if ctx.activations_mode == "meanfield":
        return _moment(ctx)
    below, _ = ctx.variance_below(ctx.inputs[0]) if ctx.inputs else (None, "")
    if not _relu_exact(ctx):
        return below  # the paper: ReLU as the identity
    return (below if below is not None else Mono()) * RELU_VAR


@register_rule(
    module=nn.ReLU, function=(F.relu, F.relu_, torch.relu, torch.relu_), method=("relu", "relu_"),
    transparent=True, moment=_relu_moment,
)
def relu_rule(ctx: RuleContext) -> None:
    """ReLU. ``relu="paper"`` (the paper's set): the identity (eq. 31) — ``m``, positions and
    channels unchanged. ``relu="exact"``: each unit passes gradient with probability 1/2,
    independently of its position and channel, so ``mean diag(JᵀJ)`` over the input halves,
    ``m ← m/2`` (the layer below shares its weight over half of its outputs' entries, and its
    inputs see half of its column norm), and the output variance is ``(1/2 − 1/2π)·E[z²]`` —
    together ``1 − 1/π`` per conv–BN–ReLU stage, the paper's drift on deep nets
    (docs/derivations.md) — where the ReLU reads a norm layer's output (zero-mean input); a
    ReLU after a residual addition stays the identity. ``activations="meanfield"``: the same
    values from the mean-field rule, which also takes a weighted layer's output as zero-mean.
    ``s`` still counts every position, as the paper's."""
    if not ctx.inputs:
        return
    if ctx.activations_mode == "meanfield":
        if not _apply(ctx):
            ctx.pass_to(ctx.inputs[0], ctx.m_out)
        return
    ctx.pass_to(ctx.inputs[0], ctx.m_out * (0.5 if _relu_exact(ctx) else 1.0))


def elementwise_rule(ctx: RuleContext) -> None:
    """An op no rule knows, found elementwise (:func:`~..meanfield.pointwise_callable`): the
    mean-field factors with the conventions' activations, the identity otherwise."""
    if not ctx.inputs:
        return
    got = _meanfield(ctx)
    if got is not None:
        _apply(ctx, got)
        return
    fn = pointwise_callable(ctx.node, ctx.gm, ctx.inputs[0])
    if fn is not None and ctx.activations_mode == "meanfield":  # mean unknown: its slope at N(0, 1)
        mf = gaussian_factors(fn, 1.0)
        ctx.note(f"elementwise, no rule: E[φ'²] = {mf.back:.4g} at N(0, 1)")
        ctx.pass_to(ctx.inputs[0], ctx.m_out * mf.back)
        return
    ctx.pass_to(ctx.inputs[0], ctx.m_out)


def _keep(ctx: RuleContext) -> float:
    """``1 − p`` of an active dropout (the module's ``training`` flag, or ``F.dropout``'s
    ``training`` argument as traced) under ``activations="meanfield"``; 1 when it is off, and
    in the paper's set (which has no dropout)."""
    if ctx.activations_mode != "meanfield":
        return 1.0
    m = ctx.module
    if m is not None:
        return 1.0 - float(m.p) if m.training else 1.0
    p, training = ctx.arg(1, "p", 0.5), ctx.arg(2, "training", True)
    if not isinstance(p, (int, float)) or not isinstance(training, bool):
        return 1.0
    return 1.0 - float(p) if training else 1.0


def _dropout_moment(ctx: RuleContext) -> Mono | None:
    below, _ = ctx.variance_below(ctx.inputs[0]) if ctx.inputs else (None, "")
    keep = _keep(ctx)
    if below is None or keep >= 1.0 or keep <= 0.0:
        return below
    return below / keep


@register_rule(module=nn.modules.dropout._DropoutNd, function=(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d),
               transparent=True, moment=_dropout_moment)
def dropout_rule(ctx: RuleContext) -> None:
    """Dropout with keep probability ``q = 1 − p`` in training: ``J = diag(mask/q)``, so
    ``mean diag(JᵀJ) = 1/q`` and ``E[y²] = E[x²]/q`` — exact, no Gaussian assumption — with
    ``activations="meanfield"``; the identity in the paper's set (which has no dropout)."""
    if not ctx.inputs:
        return
    keep = _keep(ctx)
    ctx.pass_to(ctx.inputs[0], ctx.m_out / keep if 0.0 < keep < 1.0 else ctx.m_out)
