"""Rules for parameter-free ops: activations, dropout, identity, reshapes, pooling,
reductions, additions, concatenation, slicing and scaling.

* pointwise activations — ``δ'a = δa`` (the paper's ReLU result, eq. 31; other activations
  are treated the same way: their derivative is applied by back-propagation itself);
* reshapes / dropout / identity — factor and carrying fraction pass unchanged;
* pooling and mean/sum reductions — the factor is unchanged and only ``out/in`` of the
  input's locations carry gradient (this is what makes ``s_cv1 = 196`` in LeNet);
* addition — every tensor input receives the output's factor (a residual adds the
  signals, each branch must match all of ``δb``);
* concatenation, split, chunk, slicing — each slice keeps the factor;
* multiplication by a constant ``k`` — ``δa = k·δb``, ``δ'a = δb/k``: ``m ← m·k²``;
  multiplication by another tensor (a gate) — both operands keep the factor (noted).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis import RuleContext
from ..registry import register_rule

__all__ = ["identity_rule", "pooling_rule", "add_rule", "getitem_rule", "mul_rule"]

try:  # torchvision's stochastic depth acts like dropout on the residual branch
    from torchvision.ops import StochasticDepth as _StochasticDepth
except Exception:  # pragma: no cover - torchvision is a dependency, but stay importable
    _StochasticDepth = nn.Identity

_ACTIVATION_MODULES = (_StochasticDepth, 
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Identity, nn.modules.dropout._DropoutNd, nn.AlphaDropout,
    nn.Flatten, nn.Unflatten, nn.LogSoftmax, nn.Softmax,
)
_ACTIVATION_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, torch.flatten, torch.reshape, torch.squeeze,
    torch.unsqueeze, torch.permute, torch.transpose, torch.clone, F.log_softmax, F.softmax,
    torch.log_softmax, torch.softmax,
)
_ACTIVATION_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "view", "view_as", "reshape",
    "reshape_as", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze",
    "clone", "float", "double", "half", "bfloat16", "to", "type_as", "expand", "expand_as",
    "softmax", "log_softmax", "detach_",
)


@register_rule(
    module=_ACTIVATION_MODULES, function=_ACTIVATION_FUNCTIONS, method=_ACTIVATION_METHODS,
    transparent=True,
)
def identity_rule(ctx: RuleContext) -> None:
    """Pointwise activations, dropout, identity and reshapes: ``m`` and ``frac`` unchanged."""
    if ctx.inputs:
        ctx.pass_to(ctx.inputs[0], ctx.m_out, ctx.frac_out)


_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
_POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.mean,
    torch.sum, torch.amax, torch.max_pool2d, torch.max_pool1d, torch.avg_pool1d,
)


@register_rule(module=_POOL_MODULES, function=_POOL_FUNCTIONS, method=("mean", "sum", "amax"), transparent=True)
def pooling_rule(ctx: RuleContext) -> None:
    """Pooling and reductions: ``m`` unchanged; the input's carrying fraction is
    ``frac_out · numel(out)/numel(in)`` — a 2×2 max pool keeps a quarter of the locations,
    a global average pool one per channel (the paper counts a conv's sharing factor after
    the pooling that follows it; average pooling is given the same count)."""
    if not ctx.inputs:
        return
    x = ctx.inputs[0]
    ratio = ctx.numel(ctx.node) / max(1, ctx.numel(x))
    ctx.pass_to(x, ctx.m_out, ctx.frac_out * min(1.0, ratio))


@register_rule(
    function=(operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub),
    method=("add", "add_", "sub", "sub_"),
)
def add_rule(ctx: RuleContext) -> None:
    """Addition (residual connections): every tensor input receives ``m`` and ``frac``.
    Adding a parameter (``x + self.offset``) makes it a bias of this node: scale ``1/(m·s)``
    with ``s`` the positions it is broadcast over."""
    for a in ctx.node.args[:2]:
        name = ctx.param_from_arg(a)
        if name is not None:
            s = ctx.frac_out * _broadcast_positions(ctx, name)
            ctx.add_layer("add (parameter)", [(name, "bias", s)], weight=name, s=s, c=1.0, input_node=ctx.inputs[0] if ctx.inputs else None)
    ctx.pass_all()


def _broadcast_positions(ctx: RuleContext, name: str) -> float:
    out = ctx.out_shape or (1,)
    per_sample = math.prod(out[1:]) if len(out) > 1 else 1
    return max(1.0, per_sample / max(1, math.prod(ctx.param_shape(name))))


@register_rule(function=(torch.cat, torch.concat, torch.stack, torch.chunk, torch.split), method=("chunk", "split"))
def concat_rule(ctx: RuleContext) -> None:
    """Concatenation, stacking, split and chunk: each slice keeps the factor."""
    ctx.pass_all()


@register_rule(function=(tuple, list, dict))
def container_rule(ctx: RuleContext) -> None:
    """Building a tuple / namedtuple / list / dict of tensors (model outputs such as
    GoogLeNet's): each element keeps the factor."""
    ctx.pass_all()


@register_rule(function=operator.getitem)
def getitem_rule(ctx: RuleContext) -> None:
    """Indexing a tensor (slicing) or a tuple of tensors (after split/chunk): the factor is
    kept; the carrying fraction shrinks to the selected share of the elements."""
    if not ctx.inputs:  # indexing a parameter or a constant: nothing to hand back
        return
    x = ctx.inputs[0]
    ratio = ctx.numel(ctx.node) / max(1, ctx.numel(x))
    ctx.pass_to(x, ctx.m_out, ctx.frac_out * min(1.0, ratio))


@register_rule(function=(operator.mul, operator.imul, torch.mul, operator.truediv, torch.div), method=("mul", "mul_", "div", "div_"))
def mul_rule(ctx: RuleContext) -> None:
    """Multiplication by a constant ``k`` (division: ``1/k``): ``m ← m·k²``. By another
    tensor (a gate, as in squeeze-excitation): each operand keeps ``m`` (noted). By a
    parameter (a layer scale): as BN's γ — ``m ← m·mean(γ²)``, the parameter's scale
    ``1/(m·s)`` over the positions it is broadcast over."""
    args = list(ctx.node.args[:2])
    params = [ctx.param_from_arg(a) for a in args]
    if any(params) and ctx.node.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_") and ctx.inputs:
        # x * self.layer_scale: a per-channel scale like BN's γ (ConvNeXt's layer scale)
        name = next(p for p in params if p)
        s = ctx.frac_out * _broadcast_positions(ctx, name)
        ctx.add_layer("mul (parameter)", [(name, "norm_scale", s)], weight=name, s=s, c=1.0,
                      input_node=ctx.inputs[0], notes=("γ²→m",))
        m = ctx.m_out * ctx.sumsq(name) / ctx.numel_of_param(name)
        for inp in ctx.inputs:
            ctx.pass_to(inp, m, ctx.frac_out)
        return
    consts = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(ctx.inputs) == 1 and consts:
        k = float(consts[0])
        if ctx.node.target in (operator.truediv, torch.div, "div", "div_") and args[1] is consts[0]:
            k = 1.0 / k if k else 0.0
        ctx.pass_to(ctx.inputs[0], ctx.m_out * (k * k) if k else ctx.m_out, ctx.frac_out)
        return
    if len(ctx.inputs) > 1:
        ctx.node.meta["fxbackmatch.notes"] = ("gating product: each operand keeps m",)
    ctx.pass_all()
