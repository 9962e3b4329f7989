"""Rules for parameter-free ops: activations, dropout, identity, reshapes, pooling,
reductions, scaling and gates (additions, concatenation, slicing, padding and constants:
:mod:`.structure`).

Each is the least-squares factor of the op's (linearized) Jacobian, ``mean diag(JᵀJ)`` under
the paper's approximations (see ``docs/derivations.md``):

* pointwise activations — :mod:`.activations` (the paper's identity, eq. 31, or mean-field);
* reshapes / dropout / identity — ``m``, positions and channels unchanged;
* max pooling, ``amax`` — ``m`` unchanged, only ``out/in`` of the positions carry gradient
  (this is what makes ``s_cv1 = 196`` in LeNet);
* average pooling, ``mean``, ``sum`` — the linear maps they are: every position carries
  gradient and ``m ← m·r̄·w²`` with ``w`` the weight (``1/K`` for a mean over ``K``) and
  ``r̄`` how many outputs read an input on average — the factors of the equivalent frozen
  depthwise conv;
* addition — every tensor input receives the output's factor (the fork rule sums them);
* concatenation, split, chunk, slicing — a slice keeps ``m``; slicing the channel dimension
  drops channels, any other dimension positions;
* multiplication by a constant ``k`` — ``m ← m·k²``; by a parameter (a layer scale) — the
  parameter is a layer with ``E[x²]`` of the tensor it scales; by another tensor (a gate) —
  each operand ``A`` gets ``m·r_A·E[B²]``, with ``r_A`` the positions ``A`` is broadcast over.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..context import RuleContext
from ..expr import Mono
from .structure import broadcast_positions
from .transformer import rms_source
from ..registry import register_rule

__all__ = ["identity_rule", "sigmoid_rule", "max_pool_rule", "avg_pool_rule", "reduce_rule", "mul_rule"]

try:  # torchvision's stochastic depth acts like dropout on the residual branch
    from torchvision.ops import StochasticDepth as _StochasticDepth
except Exception:  # pragma: no cover - torchvision is a dependency, but stay importable
    _StochasticDepth = nn.Identity

_ACTIVATION_MODULES = (
    _StochasticDepth, nn.Identity, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Flatten,
    nn.Unflatten, nn.LogSoftmax,
)
_ACTIVATION_FUNCTIONS = (
    F.alpha_dropout,
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
    torch.transpose, torch.clone, F.log_softmax, torch.log_softmax, torch.unflatten,
    torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis, torch.roll,
)
_ACTIVATION_METHODS = (
    "view", "view_as", "reshape", "reshape_as", "flatten",
    "contiguous", "permute", "transpose", "squeeze", "unsqueeze", "clone", "float", "double",
    "half", "bfloat16", "to", "type_as", "log_softmax", "detach_", "unflatten",
    "swapaxes", "swapdims", "movedim", "moveaxis", "roll",
)


@register_rule(
    module=_ACTIVATION_MODULES, function=_ACTIVATION_FUNCTIONS, method=_ACTIVATION_METHODS,
    transparent=True,
)
def identity_rule(ctx: RuleContext) -> None:
    """Dropout, identity and reshapes: the flow passes unchanged (activations:
    :mod:`.activations`)."""
    if ctx.inputs:
        ctx.pass_to(ctx.inputs[0], ctx.m_out)


#: ``E[σ(z)²]`` of a gate near its operating point ``z ≈ 0`` (``σ(0)² = 1/4``): a heuristic, noted
GATE_MOMENT = 0.25
#: squared slope of the gate at ``z = 0``: ``σ'(0)² = 1/16`` (sigmoid), ``1/36`` (hard sigmoid)
_GATE_SLOPE2 = {nn.Sigmoid: 1 / 16, nn.Hardsigmoid: 1 / 36, torch.sigmoid: 1 / 16, F.sigmoid: 1 / 16,
                F.hardsigmoid: 1 / 36, "sigmoid": 1 / 16, "sigmoid_": 1 / 16}


@register_rule(
    module=(nn.Sigmoid, nn.Hardsigmoid), function=(torch.sigmoid, F.sigmoid, F.hardsigmoid),
    method=("sigmoid", "sigmoid_"), transparent=True, moment=lambda ctx: Mono.const(GATE_MOMENT),
)
def sigmoid_rule(ctx: RuleContext) -> None:
    """Sigmoid-type gates, linearized at their operating point ``z ≈ 0`` (where a gate starts):
    ``J = σ'(0)·I``, so ``m ← m·σ'(0)²`` — ``1/16`` for the sigmoid, ``1/36`` for the hard
    sigmoid — and ``E[σ²] ≈ σ(0)² = 1/4``. Unlike ReLU-type activations (the paper's identity:
    slope 1 where the unit carries gradient, and a moment that the slope's mean cancels), a
    gate's slope is far below 1 everywhere; treating it as 1 over-counted squeeze-excitation
    paths 60× against the measured Jacobian on EfficientNet-B0."""
    if ctx.inputs:
        key = type(ctx.module) if ctx.module is not None else ctx.node.target
        ctx.pass_to(ctx.inputs[0], ctx.m_out * _GATE_SLOPE2.get(key, 1 / 16))


def _ratio(ctx: RuleContext, x: fx.Node) -> float:
    return min(1.0, ctx.numel(ctx.node) / max(1, ctx.numel(x)))


_MAX_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
_MAX_POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, torch.amax, torch.max_pool2d, torch.max_pool1d,
)


@register_rule(module=_MAX_POOL_MODULES, function=_MAX_POOL_FUNCTIONS, method=("amax",), transparent=True)
def max_pool_rule(ctx: RuleContext) -> None:
    """Max pooling and ``amax``: the selected input has Jacobian entry 1, so ``m`` is
    unchanged; only ``out/in`` of the positions carry gradient (a 2×2 pool keeps a quarter —
    the paper's count for a conv's sharing factor). LP pooling is treated the same way."""
    if not ctx.inputs:
        return
    x = ctx.inputs[0]
    ctx.pass_to(x, ctx.m_out, ctx.frac_out * _ratio(ctx, x))


_AVG_POOL_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_AVG_POOL_FUNCTIONS = (
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, torch.avg_pool1d,
)


def _window(ctx: RuleContext, x: fx.Node) -> float:
    """Elements averaged per output: the kernel volume, or ``in/out`` per pooled dimension
    for adaptive pooling."""
    mod = ctx.module
    k = getattr(mod, "kernel_size", None) if mod is not None else ctx.arg(1, "kernel_size")
    if mod is None and ctx.node.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
        k = None
    if k is not None and not isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        ks = tuple(k) if isinstance(k, (tuple, list)) else (int(k),)
        dims = len(ctx.shape(x)) - 2
        if len(ks) == 1 and dims > 1:
            ks = ks * dims
        return float(math.prod(ks))
    return ctx.numel(x) / max(1, ctx.numel(ctx.node))


def _avg_row_norm(ctx: RuleContext) -> Mono:
    """Row norm of an average: ``K·(1/K)² = 1/K`` (``E[out²] = E[in²]/K`` for uncorrelated
    positions — the frozen depthwise conv's ``||W||²_{2,μ}``)."""
    x = ctx.inputs[0]
    return Mono.const(1.0 / _window(ctx, x))


@register_rule(module=_AVG_POOL_MODULES, function=_AVG_POOL_FUNCTIONS, row_norm=_avg_row_norm, averages=True)
def avg_pool_rule(ctx: RuleContext) -> None:
    """Average pooling: a linear map with weight ``1/K`` on each of the ``K`` inputs of a
    window. Column ``j`` of its Jacobian has ``r_j`` entries ``1/K`` (``r_j`` windows read
    input ``j``), so ``m ← m·r̄/K²`` with ``r̄ = K·out/in``: ``m ← m·(out/in)/K`` — ``1/16``
    for 2×2/stride 2, ``1/49²`` for a 7×7 global pool — and every position carries gradient.
    The same factors as the frozen depthwise conv with weights ``1/K``."""
    if not ctx.inputs:
        return
    x = ctx.inputs[0]
    k = _window(ctx, x)
    ctx.pass_to(x, ctx.m_out * (_ratio(ctx, x) / k))


def _reduce_row_norm(ctx: RuleContext) -> Mono:
    """Row norm of a mean (``1/K``) or a sum (``K``) over ``K`` elements."""
    x = ctx.inputs[0]
    k = ctx.numel(x) / max(1, ctx.numel(ctx.node))
    return Mono.const(1.0 / k if ctx.node.target in (torch.mean, "mean") else k)


@register_rule(function=(torch.mean, torch.sum), method=("mean", "sum"), row_norm=_reduce_row_norm, averages=True)
def reduce_rule(ctx: RuleContext) -> None:
    """``mean`` / ``sum`` over ``K = in/out`` elements: linear maps with weight ``1/K`` / 1 read
    once per input, so ``m ← m/K²`` / ``m``; every position carries gradient. Their output
    moment is ``E[in²]/K`` / ``K·E[in²]`` (uncorrelated elements)."""
    if not ctx.inputs:
        return
    x = ctx.inputs[0]
    k = ctx.numel(x) / max(1, ctx.numel(ctx.node))
    is_mean = ctx.node.target in (torch.mean, "mean")
    ctx.pass_to(x, ctx.m_out / (k * k) if is_mean else ctx.m_out)


def _const(a):
    """A python number, or a node whose value is one (shape arithmetic traced by torch.fx)."""
    if isinstance(a, fx.Node):
        a = a.meta.get("val")
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    return None


_MULS = (operator.mul, operator.imul, torch.mul, "mul", "mul_")
_DIVS = (operator.truediv, torch.div, "div", "div_")


def _product_moment(ctx: RuleContext) -> Mono | None:
    """``E[y²]`` of a product: the operands' moments multiplied (independent operands) — a
    parameter counts as :meth:`RuleContext.gamma_sq` (1 unless ``gamma="exact"``), a constant ``k²``; ``None`` for a division by a tensor."""
    args = [_const(a) if _const(a) is not None else a for a in ctx.node.args[:2]]
    if len(args) == 2 and (rms_source(args[0], args[1]) is not None or rms_source(args[1], args[0]) is not None):
        return Mono()  # RMS-normalized: E[x̂²] = 1
    div = ctx.node.target in _DIVS
    out = Mono()
    for i, a in enumerate(args):
        if isinstance(a, fx.Node) and a in ctx.inputs:
            if div and i == 1:
                return None
            v, _ = ctx.variance_below(a)
            if v is None:
                return None
            out = out * v
        elif isinstance(a, fx.Node):
            name = ctx.param_from_arg(a)
            if name is None or div:
                return None
            out = out * ctx.gamma_sq(name)
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            k = float(a) if not (div and i == 1) else (1.0 / float(a) if a else 0.0)
            if k == 0.0:
                return None
            out = out * (k * k)
    return out


@register_rule(function=(operator.mul, operator.imul, torch.mul, operator.truediv, torch.div),
               method=("mul", "mul_", "div", "div_"), moment=_product_moment)
def mul_rule(ctx: RuleContext) -> None:
    """Products.

    * by a constant ``k`` (division: ``1/k``): ``J = k·I``, ``m ← m·k²``;
    * by a parameter ``γ`` (a layer scale ``y = γ ⊙ x``): γ is a layer — its column of ``J``
      holds ``x`` at the ``s`` positions it is broadcast over, so its scale is
      ``1/(m·s·E[x²])`` with ``E[x²]`` estimated from the graph below (1 if none, noted); the
      input keeps ``m`` (γ treated as 1, as the paper's BN) or, with ``gamma="exact"``, gets
      ``m·mean(γ²)``;
    * by another tensor (a gate, ``y = A ⊙ B`` with broadcasting): operand ``A`` gets
      ``m·r_A·E[B²]`` — its gradient sums ``B·δy`` over the ``r_A = numel(y)/numel(A)``
      positions it is broadcast over — with ``E[B²]`` from the graph below (a sigmoid gate:
      1/4); a broadcast operand carries gradient at all of its positions.
    """
    args = [_const(a) if _const(a) is not None else a for a in ctx.node.args[:2]]
    params = [ctx.param_from_arg(a) for a in args]
    is_mul = ctx.node.target in _MULS
    src = (rms_source(args[0], args[1]) or rms_source(args[1], args[0])) if len(args) == 2 and is_mul else None
    if src is not None:  # x·rsqrt(mean(x²) + ε): RMS normalization written out (Llama's RMSNorm)
        var, _ = ctx.variance_below(src)
        if var is None:
            ctx.note("RMS norm: E[x²] taken as 1")
            var = Mono()
        ctx.pass_to(src, ctx.m_out / var)
        return
    if any(params) and is_mul and ctx.inputs:
        name = next(p for p in params if p)
        x = ctx.inputs[0]
        s = ctx.frac_out * broadcast_positions(ctx, name)
        ex2, how = ctx.variance_below(x)
        if ex2 is None:
            ex2 = Mono()
            ctx.note("layer scale: E[x²] taken as 1")
        ctx.add_layer("mul (parameter)", [(name, "norm_scale", s, ex2)], weight=name, s=s, c=1.0, input_node=x)
        m = ctx.m_out
        if ctx.gamma_mode == "exact":
            m = m * ctx.mean_sq(name, 1.0)  # at least 1 with floor="init"
            ctx.note("γ²→m (gamma='exact')")
        ctx.pass_to(x, m)
        return
    consts = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(ctx.inputs) == 1 and consts:
        k = float(consts[0])
        if ctx.node.target in _DIVS and args[1] is consts[0]:
            k = 1.0 / k if k else 0.0
        if k == 0.0:  # J = 0: this consumer adds nothing to JᵀJ below
            ctx.note("multiplied by 0: no gradient flows through")
            return
        ctx.pass_to(ctx.inputs[0], ctx.m_out * (k * k))
        return
    tensors = [a for a in args if isinstance(a, fx.Node) and a in ctx.inputs]
    if len(tensors) == 2 and is_mul:
        out_n = max(1, ctx.numel(ctx.node))
        for a, b in ((tensors[0], tensors[1]), (tensors[1], tensors[0])):
            eb2, _ = ctx.variance_below(b)
            if eb2 is None:
                eb2 = Mono()
                ctx.note(f"gate: E[{b.name}²] taken as 1")
            elif _is_sigmoid(ctx, b):
                ctx.note(f"gate: E[{b.name}²] ≈ σ(0)² = {GATE_MOMENT}")
            r = out_n / max(1, ctx.numel(a))
            if r > 1:
                ctx.pass_to(a, ctx.m_out * eb2 * r, 1.0, 1.0)
            else:
                ctx.pass_to(a, ctx.m_out * eb2)
        return
    if len(ctx.inputs) > 1:
        ctx.note("division by a tensor: each operand keeps m (heuristic)")
    ctx.pass_all()


def _is_sigmoid(ctx: RuleContext, node: fx.Node) -> bool:
    rule = ctx.rule_of(node)
    return rule is not None and rule.fn is sigmoid_rule
