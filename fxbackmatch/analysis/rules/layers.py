"""Rules for layers that own parameters: Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d.

Notation (ERRATA.md): for a weight with ``out`` rows and ``in`` columns,
``||W||²_{2,μ} = sum(W²)/out`` (mean squared row norm) and ``||Wᵀ||²_{2,μ} = sum(W²)/in``
(mean squared column norm). For a conv, ``W_row`` is ``out × (in/groups·k…)`` and ``W_col``
is ``in × (out·k…)``.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from ..context import RuleContext, positions
from ..expr import Mono
from ..registry import register_rule

__all__ = ["linear_rule", "conv_rule", "batch_norm_rule", "touched_fraction", "tap_geometry"]


def input_moment(ctx: RuleContext, x) -> Mono:
    """``E[a²]`` of a weighted layer's input, for its least-squares normal matrix
    ``E aaᵀ ≈ E[a²]·I`` (eq. 13: ``δ'W = (E aaᵀ)⁻¹ δW``). The paper's BN makes it 1; where the
    graph knows better (a residual stream after ``k`` blocks: ``≈ k + 1``) it is used; 1 where
    there is no estimate (the data)."""
    got, _ = ctx.variance_below(x)
    return Mono() if got is None else got


# ---------------------------------------------------------------------------- Linear
def _weight_row_norm(ctx: RuleContext) -> Mono | None:
    """``||W||²_{2,μ} = sum(W²)/out`` of a Linear/Conv weight (module or functional form)."""
    w = ctx.module_param("weight") if ctx.module is not None else ctx.param_from_arg(ctx.arg(1, "weight"))
    if w is None:
        return None
    return ctx.sumsq(w) / ctx.param_shape(w)[0]


def _linear(ctx: RuleContext, w: str | None, b: str | None, kind: str) -> None:
    """FC layer (§2.1, eq. 34): scale ``1/(m·s)`` with ``s`` = positions per sample that carry
    gradient (1 for a 2-D input; the token count for ``Linear`` on 3-D input, also where the
    batch was folded into the first dimension: Swin's ``B·windows``); ``m ← m·||Wᵀ||²_{2,μ}``;
    ``c = 1``. The bias takes the weight's scale. When only a share ``chan`` of the output
    units carries gradient (a channel slice above), the column norms count those rows only:
    ``m ← m·chan·||Wᵀ||²_{2,μ}`` (row-homogeneous), as for the smaller layer."""
    x = ctx.inputs[0]
    if w is None:  # frozen weight: nothing to rescale, but the factor still flows
        ctx.pass_to(x, ctx.m_out)
        return
    out_f, in_f = ctx.param_shape(w)
    s = ctx.frac_out * ctx.positions_per_sample(ctx.node, out_f)  # a folded batch (Swin's windows) counts
    ctx.add_layer(kind, [(w, "weight", s, input_moment(ctx, x)), (b, "bias", s)], weight=w, s=s, c=1.0, input_node=x)
    ctx.pass_to(x, ctx.m_out * ctx.sumsq(w) * (ctx.chan_out / in_f), ctx.frac_out, 1.0)


@register_rule(module=nn.Linear, row_norm=_weight_row_norm, channel_dim=-1)
def linear_rule(ctx: RuleContext) -> None:
    """nn.Linear: see :func:`_linear`."""
    _linear(ctx, ctx.module_param("weight"), ctx.module_param("bias"), "Linear")


@register_rule(function=F.linear, row_norm=_weight_row_norm, channel_dim=-1)
def functional_linear_rule(ctx: RuleContext) -> None:
    """F.linear(x, weight, bias): as nn.Linear, with the parameters read from get_attr args."""
    w = ctx.param_from_arg(ctx.arg(1, "weight"))
    b = ctx.param_from_arg(ctx.arg(2, "bias"))
    _linear(ctx, w, b, "F.linear")


# ------------------------------------------------------------------------------ Conv
def touched_fraction(
    in_size: tuple[int, ...],
    out_size: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> float:
    """Fraction of input locations that some output location reads (1 unless stride > kernel
    reach, as in a 1×1 conv with stride 2, which reads a quarter of its input)."""
    return tap_geometry(in_size, out_size, kernel, stride, padding, dilation)[0]


def tap_geometry(
    in_size: tuple[int, ...],
    out_size: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[float, float, float]:
    """``(touched, valid, carrying)`` of a conv's geometry, each a product over dimensions:
    the fraction of input locations some output reads; the fraction of (output location,
    tap) pairs that read a real input rather than zero padding; the fraction of taps that
    read a real input at some output location (7×7 with padding 3 on a 1×1 map: 1, 1/49,
    1/49)."""
    touched = valid = carrying = 1.0
    for i, o, k, st, p, d in zip(in_size, out_size, kernel, stride, padding, dilation):
        reads = [(kk, oo * st - p + kk * d) for oo in range(o) for kk in range(k)]
        real = [(kk, h) for kk, h in reads if 0 <= h < i]
        touched *= len({h for _, h in real}) / max(i, 1)
        valid *= len(real) / max(len(reads), 1)
        carrying *= len({kk for kk, _ in real}) / max(k, 1)
    return touched, valid, carrying


def _tup(v, dims: int) -> tuple[int, ...]:
    return tuple(int(e) for e in v) if isinstance(v, (tuple, list)) else (int(v),) * dims


def _conv_geometry(ctx: RuleContext, dims: int, stride, padding, dilation, kernel):
    """``(x, in_loc, out_loc, touched, valid, carrying)``; with ``taps="all"`` (the paper's
    convention) ``valid = carrying = 1``."""
    x = ctx.inputs[0]
    in_shape, out_shape = ctx.shape(x), ctx.out_shape
    in_sp, out_sp = tuple(in_shape[-dims:]), tuple(out_shape[-dims:])
    if isinstance(padding, str):  # 'same' / 'valid'
        padding = [0] * dims if padding == "valid" else [(k - 1) * d // 2 for k, d in zip(kernel, _tup(dilation, dims))]
    touched, valid, carrying = tap_geometry(
        in_sp, out_sp, kernel, _tup(stride, dims), _tup(padding, dims), _tup(dilation, dims)
    )
    if ctx.taps_mode != "valid":
        valid = carrying = 1.0
    return x, math.prod(in_sp), math.prod(out_sp), touched, valid, carrying


def _conv_args(ctx: RuleContext) -> tuple | None:
    """``(weight, bias, dims, stride, padding, dilation, groups, kind)`` of a conv node,
    module or functional form (``None`` when it has no weight parameter)."""
    m = ctx.module
    if m is not None:
        dims = len(m.kernel_size)
        padding = m.padding
        if m.padding_mode != "zeros":
            padding = m._reversed_padding_repeated_twice[::2][::-1]
        return (ctx.module_param("weight"), ctx.module_param("bias"), dims, m.stride, padding, m.dilation,
                m.groups, type(m).__name__)
    w = ctx.param_from_arg(ctx.arg(1, "weight"))
    if w is None:
        return None
    dims = len(ctx.param_shape(w)) - 2
    return (w, ctx.param_from_arg(ctx.arg(2, "bias")), dims, ctx.arg(3, "stride", 1), ctx.arg(4, "padding", 0),
            ctx.arg(5, "dilation", 1), ctx.arg(6, "groups", 1), f"F.conv{dims}d")


def _conv_row_norm(ctx: RuleContext) -> Mono | None:
    """``E[y²]/E[x²]`` of a conv: ``||W||²_{2,μ}``, times the valid-pair fraction with
    ``taps="valid"`` (an output next to the padding sums fewer taps)."""
    args = _conv_args(ctx)
    if args is None or args[0] is None:
        return None
    w, _, dims, stride, padding, dilation, _, _ = args
    valid = _conv_geometry(ctx, dims, stride, padding, dilation, tuple(ctx.param_shape(w)[2:]))[4]
    return ctx.sumsq(w) * (valid / ctx.param_shape(w)[0])


def _conv(ctx: RuleContext, w, b, dims, stride, padding, dilation, groups, kind) -> None:
    """Convolution (§2.2, eqs. 33, 35). ``s`` = output locations that carry gradient (after
    the pooling that follows before the next weighted layer: LeNet ``s_cv1 = 196``,
    ``s_cv2 = 25``); ``c`` = input locations read divided by ``s`` (cv2: 196/25);
    ``m ← m·chan·||W_col||²_{2,μ}/c`` with ``||W_col||²_{2,μ} = sum(W²)/in_channels`` and
    ``chan`` the share of output channels carrying gradient. Any stride, padding, dilation
    and groups (depthwise included); the bias takes the weight's scale.

    ``taps="valid"``: only the share ``v`` of (output, tap) pairs that read real input
    counts, so ``c ← c/v`` (an input location meets ``v``× the taps), and the weight's own
    normal matrix is averaged over the share ``κ`` of taps that read real input somewhere:
    ``s ← s·v/κ`` (a 7×7 tap on a 1×1 map: only the centre tap, read once)."""
    if w is None:
        ctx.pass_all()
        return
    kernel = tuple(ctx.param_shape(w)[2:])
    x, in_loc, out_loc, touched, valid, carrying = _conv_geometry(ctx, dims, stride, padding, dilation, kernel)
    s = ctx.frac_out * out_loc * valid / carrying
    c = (in_loc * touched) / (ctx.frac_out * out_loc * valid)
    in_ch = ctx.param_shape(w)[1] * groups
    ctx.add_layer(kind, [(w, "weight", s, input_moment(ctx, x)), (b, "bias", s)], weight=w, s=s, c=c, input_node=x)
    ctx.pass_to(x, ctx.m_out * ctx.sumsq(w) * (ctx.chan_out / (in_ch * c)), touched, 1.0)


@register_rule(module=(nn.Conv1d, nn.Conv2d, nn.Conv3d), row_norm=_conv_row_norm, channel_dim=1)
def conv_rule(ctx: RuleContext) -> None:
    """nn.Conv1d/2d/3d: see :func:`_conv`."""
    _conv(ctx, *_conv_args(ctx))


def _functional_conv(dims: int):
    def rule(ctx: RuleContext) -> None:
        args = _conv_args(ctx)
        if args is None:  # the weight is an activation, not a parameter
            ctx.pass_all()
            return
        _conv(ctx, *args)

    rule.__name__ = f"functional_conv{dims}d_rule"
    rule.__doc__ = f"F.conv{dims}d(x, weight, bias, stride, padding, dilation, groups): as nn.Conv{dims}d."
    return rule


for _d, _f in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
    register_rule(_functional_conv(_d), function=_f, row_norm=_conv_row_norm, channel_dim=1)


# ------------------------------------------------------------------------- BatchNorm
def norm_layer(ctx: RuleContext, gamma, beta, running_var_ref, kind, s: float | None = None, eps: float = 0.0) -> None:
    """BatchNorm (§2.3, eq. 36): ``m ← m / Var[a]`` with ``Var[a] ≈ ||W_below||²_{2,μ}``, the
    row norm of the weighted layer feeding the BN (looking through pointwise ops; a sum of
    branches adds their moments). With no estimate from the weights (BN on the input) or
    with ``variance="measured"``, ``Var[a]`` is the mean of ``running_var`` (eq. 27); without
    running statistics it is 1 (noted).

    γ: by default treated as 1 in the chain, as the paper's BN without trainable affine
    (§2.3, §4) — so a zero-initialized γ (ResNet's last BN of a block) does not make the layers
    below unbounded; ``gamma="exact"`` multiplies ``m`` by ``mean(γ²)`` (``δ'x̂ = δb/γ``).
    γ and β take ``1/(m·s)`` at the BN's output (``x̂`` is normalized: ``E[x̂²] = 1``), ``s``
    its gradient-carrying positions."""
    x = ctx.inputs[0]
    var, how = ctx.variance_below(x)
    if var is not None:
        m_in = ctx.m_out / var
    elif running_var_ref is not None:  # J = diag(1/σ_c): mean diag(JᵀJ) = mean_c(1/Var_c)
        m_in = ctx.m_out * ctx.stat_inv_mean(running_var_ref, eps)
        ctx.note("Var[a] from running_var: mean(1/Var)")
    else:
        m_in = ctx.m_out
        ctx.note("Var[a] taken as 1 (no estimate below, no running statistics)")
    if gamma is not None and ctx.gamma_mode == "exact":
        m_in = m_in * ctx.mean_sq(gamma, 1.0)  # γ counts at least 1 with floor="init"
        ctx.note("γ²→m (gamma='exact')")
    if gamma is not None or beta is not None:
        if s is None:
            s = ctx.frac_out * positions(ctx.out_shape, 1)
        ctx.add_layer(
            kind, [(gamma, "norm_scale", s), (beta, "norm_shift", s)],
            weight=gamma or beta, s=s, c=1.0, input_node=x,
        )
    ctx.pass_to(x, m_in)


def _norm_out_variance(ctx: RuleContext) -> Mono | None:
    """A norm layer's output moment ``E[(γx̂)²]``: ``mean(γ²)`` with ``gamma="exact"``; 1 with
    ``gamma="one"`` (no affine, or γ treated as 1 both ways, so that forward moments and the
    backward chain describe the same network: see docs/derivations.md, "γ both ways")."""
    g = ctx.module_param("weight") if ctx.module is not None else ctx.param_from_arg(ctx.arg(3, "weight"))
    if g is None:
        return Mono()
    return ctx.gamma_sq(g)


@register_rule(module=nn.modules.batchnorm._BatchNorm, moment=_norm_out_variance, channel_dim=1, norm=True)
def batch_norm_rule(ctx: RuleContext) -> None:
    """nn.BatchNorm1d/2d/3d and SyncBatchNorm, affine or not: see :func:`norm_layer`."""
    m = ctx.module
    rv = None
    if m.track_running_stats and m.running_var is not None:
        rv = f"{ctx.node.target}.running_var"
    norm_layer(ctx, ctx.module_param("weight"), ctx.module_param("bias"), rv, type(m).__name__, eps=float(m.eps))


@register_rule(function=F.batch_norm, moment=_norm_out_variance, channel_dim=1, norm=True)
def functional_batch_norm_rule(ctx: RuleContext) -> None:
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): as nn.BatchNorm."""
    norm_layer(
        ctx, ctx.param_from_arg(ctx.arg(3, "weight")), ctx.param_from_arg(ctx.arg(4, "bias")),
        ctx.buffer_from_arg(ctx.arg(2, "running_var")), "F.batch_norm", eps=float(ctx.arg(7, "eps", 1e-5)),
    )


@register_rule(module=nn.GroupNorm, moment=_norm_out_variance, channel_dim=1, norm=True)
def group_norm_rule(ctx: RuleContext) -> None:
    """nn.GroupNorm: as BatchNorm (Var[a] from the weights below; no running statistics, so
    with no estimate Var is taken as 1, noted); γ, β per channel with ``s`` the positions.
    A heuristic: the normalization is per sample and group, the variance a layer mean."""
    norm_layer(ctx, ctx.module_param("weight"), ctx.module_param("bias"), None, "GroupNorm")


@register_rule(module=nn.LayerNorm, moment=_norm_out_variance, channel_dim=-1, norm=True)
def layer_norm_rule(ctx: RuleContext) -> None:
    """nn.LayerNorm: as BatchNorm over the normalized features (Var[a] from the weights
    below, or 1, noted); γ, β have the normalized shape and are shared over the remaining
    positions, ``s`` = numel / (batch · normalized numel). A heuristic like GroupNorm's."""
    m = ctx.module
    shape = ctx.out_shape
    s = ctx.frac_out * max(1, math.prod(shape) // max(1, shape[0] * math.prod(m.normalized_shape)))
    norm_layer(ctx, ctx.module_param("weight"), ctx.module_param("bias"), None, "LayerNorm", s=s)


def _conv_t_row_norm(ctx: RuleContext) -> Mono | None:
    w = ctx.module_param("weight")
    if w is None:
        return None
    m = ctx.module
    return ctx.sumsq(w) / (m.out_channels * math.prod(m.stride))


@register_rule(module=(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), row_norm=_conv_t_row_norm, channel_dim=1)
def conv_transpose_rule(ctx: RuleContext) -> None:
    """nn.ConvTranspose1d/2d/3d: the adjoint of a conv. Every input location meets every
    kernel tap, so ``||W_col||²_{2,μ} = sum(W²)/in_channels`` with ``c = 1/frac`` (only the
    carrying share of the outputs counts); the weight is shared over the input locations,
    ``s = frac · in_locations``; an output location receives ``1/Π stride`` of the taps, so the
    row norm seen by a BN above is ``sum(W²)/(out_channels · Π stride)`` (approximations,
    noted)."""
    m = ctx.module
    w, b = ctx.module_param("weight"), ctx.module_param("bias")
    x = ctx.inputs[0]
    if w is None:
        ctx.pass_all()
        return
    dims = len(m.kernel_size)
    in_loc = math.prod(ctx.shape(x)[-dims:])
    s = ctx.frac_out * in_loc
    c = 1.0 / max(ctx.frac_out, 1e-12)
    ctx.add_layer(
        type(m).__name__, [(w, "weight", s), (b, "bias", s)], weight=w, s=s, c=c, input_node=x,
    )
    ctx.pass_to(x, ctx.m_out * ctx.sumsq(w) * (ctx.chan_out / (m.in_channels * c)), 1.0, 1.0)
