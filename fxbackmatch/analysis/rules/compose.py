"""Rules for compositions of the basic ops: ``addcmul``, ``addcdiv``, ``lerp``,
``F.normalize``, ``torch.where``, ``clamp``/``clip`` and vector norms.

Each factor is the least-squares ``mean diag(JᵀJ)`` of the op's Jacobian towards one input,
as the rules in :mod:`.ops` and :mod:`.structure` derive it (``docs/derivations.md``); a
composition gets the factors of its parts, so that the op written out (``beta + alpha * x``)
and the fused call (``torch.addcmul(beta, alpha, x)``) give the same plan. Where a factor
depends on the data in a way the graph gives no estimate of (``torch.where``'s selected
share, ``addcdiv``'s quotient, a tensor ``lerp`` weight, a ``p``-norm other than 1, 2, ∞),
it is measured on the live batch: :func:`fxbackmatch.analysis.gaps.measured_factor`, the
op's own ``mean diag(J_iᵀJ_i)`` refreshed every ``refresh`` steps.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..context import RuleContext
from ..expr import Mono
from ..gaps import measured_factor
from ..registry import REGISTRY, register_rule
from .activations import activation_rule
from .structure import broadcast_positions

__all__ = ["addcmul_rule", "addcdiv_rule", "lerp_rule", "normalize_rule", "where_rule", "clamp_rule",
           "vector_norm_rule"]


def _number(a) -> float | None:
    """A python number, or a node whose traced value is one; ``None`` otherwise."""
    if isinstance(a, fx.Node):
        a = a.meta.get("val")
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    return None


def _is_input(ctx: RuleContext, a) -> bool:
    return isinstance(a, fx.Node) and a in ctx.inputs


def _pass_broadcast(ctx: RuleContext, x: fx.Node, m: Mono) -> None:
    """Hand ``x`` the factor ``m`` of an elementwise map, times ``r = numel(out)/numel(x)``
    where ``x`` is broadcast (its ``r`` copies' Jacobians stack); a broadcast operand carries
    gradient at all of its positions."""
    r = ctx.numel(ctx.node) / max(1, ctx.numel(x))
    if r > 1.0 + 1e-9:
        ctx.pass_to(x, m * r, 1.0, 1.0)
    else:
        ctx.pass_to(x, m)


def _moment(ctx: RuleContext, a, additive: bool = False) -> Mono | None:
    """``E[a²]`` of an operand: a tensor's from the graph below, a number's ``a²``, a
    multiplicative parameter's :meth:`~RuleContext.gamma_sq` (``additive``: ``mean(β²)``)."""
    k = _number(a)
    if k is not None:
        return Mono.const(k * k) if k != 0 else None
    if _is_input(ctx, a):
        return ctx.variance_below(a)[0]
    name = ctx.param_from_arg(a)
    if name is not None:
        return ctx.mean_sq(name) if additive else ctx.gamma_sq(name)
    return None


def _measure_all(ctx: RuleContext, operands, why: str) -> None:
    """Each distinct tensor operand gets ``m`` times its measured own factor."""
    picked = list(dict.fromkeys(a for a in operands if _is_input(ctx, a)))
    for a in picked:
        ctx.pass_to(a, ctx.m_out * measured_factor(ctx, a))
    if picked:
        ctx.note(f"{why}: measured on the batch")


# ------------------------------------------------------------------------ addcmul / addcdiv
def _summand(ctx: RuleContext, a, params: list) -> None:
    """The ``input`` of ``input + v·…``: as an addition (a parameter there is a bias)."""
    name = ctx.param_from_arg(a)
    if name is not None:
        params.append((name, "bias", ctx.frac_out * broadcast_positions(ctx, name)))
    elif _is_input(ctx, a):
        _pass_broadcast(ctx, a, ctx.m_out)


def _value(ctx: RuleContext) -> float:
    v = _number(ctx.node.kwargs.get("value", 1.0))
    return 1.0 if v is None else v


def _declare(ctx: RuleContext, kind: str, params: list, x) -> None:
    if not params:
        return
    main = next((p for p in params if p[1] != "bias"), params[0])
    ctx.add_layer(kind, params, weight=main[0], s=main[2], c=1.0, input_node=x if _is_input(ctx, x) else None)


def _addcmul_moment(ctx: RuleContext) -> Mono | None:
    """``E[y²] = E[input²] + v²·E[t1²]·E[t2²]`` (independent parts; a bias counts ``mean(β²)``,
    a scale parameter as :meth:`~RuleContext.gamma_sq`)."""
    v = _value(ctx)
    first = _moment(ctx, ctx.arg(0, "input"), additive=True)
    parts = [_moment(ctx, ctx.arg(1, "tensor1")), _moment(ctx, ctx.arg(2, "tensor2"))]
    terms = []
    if first is not None:
        terms.append((1.0, first))
    elif _number(ctx.arg(0, "input")) != 0.0:
        return None
    if v != 0.0:
        if any(p is None for p in parts):
            return None
        terms.append((v * v, parts[0] * parts[1]))
    return ctx.atoms.sum_of(terms, label=f"E[a²] of addcmul '{ctx.node.name}'") if terms else None


@register_rule(function=torch.addcmul, method=("addcmul", "addcmul_"), moment=_addcmul_moment, sums=True)
def addcmul_rule(ctx: RuleContext) -> None:
    """``y = input + v·t1·t2``: the parts' factors, as the addition and the product written out.

    * ``input``: ``J = I`` — ``m`` (``m·r`` where broadcast over ``r`` copies); a parameter there
      is a bias of this node, ``s`` its broadcast positions;
    * ``t1``: ``J = v·diag(t2)`` — ``m·v²·E[t2²]`` (times ``r``), as the gate branch of the
      product rule; ``t2`` the same way; ``t1 is t2``: ``J = 2v·diag(t1)``, ``4v²·E[t1²]``;
    * a parameter ``α`` in the product (ResMLP's ``Affine``: ``addcmul(β, α, x)``; ConvNeXt-V2's
      GRN: ``addcmul(b.view(…), w.view(…), x·n)``) is a layer scale: its gradient is
      ``v·x·δy`` summed over the ``s`` positions it is broadcast over, so its factor is
      ``m·v²·E[x²]`` (``E[x²]`` from the graph below, 1 where none, noted) — and ``x``
      receives ``m·v²·mean(α²)`` (``α`` counted 1 under ``gamma="one"``, as the product rule).
    """
    inp, t1, t2 = ctx.arg(0, "input"), ctx.arg(1, "tensor1"), ctx.arg(2, "tensor2")
    v2 = _value(ctx) ** 2
    params: list = []
    _summand(ctx, inp, params)
    x = None
    if v2 > 0 and t1 is t2 and _is_input(ctx, t1):
        e2 = _moment(ctx, t1)
        _pass_broadcast(ctx, t1, ctx.m_out * (e2 if e2 is not None else Mono()) * (4.0 * v2))
        x = t1
    elif v2 > 0:
        for p, q in ((t1, t2), (t2, t1)):
            q2 = _moment(ctx, q)
            if q2 is None:
                q2 = Mono()
                ctx.note(f"addcmul: E[{getattr(q, 'name', q)}²] taken as 1")
            name = ctx.param_from_arg(p)
            if name is not None:
                params.append((name, "norm_scale", ctx.frac_out * broadcast_positions(ctx, name), q2 * v2))
            elif _is_input(ctx, p):
                _pass_broadcast(ctx, p, ctx.m_out * q2 * v2)
                x = p
    _declare(ctx, "addcmul (parameter)", params, x)


@register_rule(function=torch.addcdiv, method=("addcdiv", "addcdiv_"), sums=True)
def addcdiv_rule(ctx: RuleContext) -> None:
    """``y = input + v·t1/t2``: ``input`` as an addition (a parameter there is a bias); the
    quotient's factors ``v²·E[1/t2²]`` (towards ``t1``) and ``v²·E[t1²/t2⁴]`` (towards ``t2``)
    are moments of a reciprocal, which the graph gives no estimate of: measured on the batch."""
    params: list = []
    _summand(ctx, ctx.arg(0, "input"), params)
    if _value(ctx) != 0.0:
        _measure_all(ctx, (ctx.arg(1, "tensor1"), ctx.arg(2, "tensor2")), "addcdiv: the quotient's factors")
    _declare(ctx, "addcdiv (parameter)", params, ctx.arg(1, "tensor1"))


# ------------------------------------------------------------------------------------ lerp
def _lerp_moment(ctx: RuleContext) -> Mono | None:
    """``(1−w)²·E[input²] + w²·E[end²]`` for a number ``w`` (independent ends)."""
    w = _number(ctx.arg(2, "weight"))
    if w is None:
        return None
    terms = []
    for a, f in ((ctx.arg(0, "input"), (1 - w) ** 2), (ctx.arg(1, "end"), w * w)):
        if f > 0:
            e2 = _moment(ctx, a)
            if e2 is None:
                return None
            terms.append((f, e2))
    return ctx.atoms.sum_of(terms, label=f"E[a²] of lerp '{ctx.node.name}'") if terms else None


@register_rule(function=torch.lerp, method=("lerp", "lerp_"), moment=_lerp_moment)
def lerp_rule(ctx: RuleContext) -> None:
    """``y = input + w·(end − input)``. A number ``w``: ``J_input = (1−w)·I``, ``J_end = w·I``,
    so ``input`` gets ``m·(1−w)²`` and ``end`` ``m·w²`` (times ``r`` where broadcast); the same
    tensor at both ends is the identity. A tensor ``w``: the factors ``E[(1−w)²]``, ``E[w²]`` and
    ``E[(end−input)²]`` are the data's, measured on the batch."""
    x, end, w = ctx.arg(0, "input"), ctx.arg(1, "end"), ctx.arg(2, "weight")
    wn = _number(w)
    if wn is None:
        _measure_all(ctx, (x, end, w), "lerp with a tensor weight: the factors")
        return
    if x is end:
        if _is_input(ctx, x):
            _pass_broadcast(ctx, x, ctx.m_out)
        return
    for a, f in ((x, (1 - wn) ** 2), (end, wn * wn)):
        if f > 0 and _is_input(ctx, a):
            _pass_broadcast(ctx, a, ctx.m_out * f)


# ------------------------------------------------------------------------------- normalize
def _normalized_dim(ctx: RuleContext) -> int | None:
    shape = ctx.shape(ctx.arg(0, "input"))
    dim = ctx.arg(2, "dim", 1)
    if not shape or not isinstance(dim, int):
        return None
    return int(shape[dim])


def _normalize_moment(ctx: RuleContext) -> Mono | None:
    """A unit vector of ``d`` entries: ``E[y²] = 1/d``, whatever its input."""
    d = _normalized_dim(ctx)
    p = _number(ctx.arg(1, "p", 2.0))
    return Mono.const(1.0 / d) if d and p == 2.0 else None


@register_rule(function=F.normalize, moment=_normalize_moment, structural=True)
def normalize_rule(ctx: RuleContext) -> None:
    """``F.normalize(x, p=2, dim)``: ``y = x/‖x‖`` over the ``d`` entries along ``dim``.

    Derivation: ``J = (I − x̂x̂ᵀ)/‖x‖`` with ``x̂ = x/‖x‖``, so ``JᵀJ = (I − x̂x̂ᵀ)/‖x‖²`` (a
    projector over ``‖x‖²``), ``diag(JᵀJ)_i = (1 − x̂_i²)/‖x‖²`` and, since ``Σ x̂_i² = 1``,
    ``mean diag(JᵀJ) = (d − 1)/(d·‖x‖²)`` — exact for each vector. With ``‖x‖² ≈ d·E[x²]``
    (``E[x²]`` from the graph below; 1 where none, noted): ``m ← m·(d−1)/(d²·E[x²])`` — the
    RMS norm's ``m/E[x²]`` times ``1/d`` (``y = x̂_rms/√d``) times the projector's
    ``(d−1)/d``. It takes ``1/E[‖x‖²]`` for ``E[1/‖x‖²]``, as the norm rules do; for
    zero-mean Gaussian entries the latter is larger by ``d/(d−2)`` (``E[1/χ²_d] = 1/(d−2)``):
    3 % at ``d = 64``. ``d = 1`` gives ``sign(x)``, ``J = 0``. Output moment ``1/d``; other ``p``:
    the factor is measured on the batch."""
    x = ctx.arg(0, "input")
    if not _is_input(ctx, x):
        return
    d = _normalized_dim(ctx)
    if _number(ctx.arg(1, "p", 2.0)) != 2.0 or d is None:
        _measure_all(ctx, (x,), "normalize (p ≠ 2): the factor")
        return
    if d <= 1:
        ctx.note("normalize over one entry: sign(x), no gradient flows through")
        return
    ex2, _ = ctx.variance_below(x)
    if ex2 is None:
        ex2 = Mono()
        ctx.note("normalize: E[x²] taken as 1")
    ctx.pass_to(x, ctx.m_out * ((d - 1) / d**2) / ex2)


# ------------------------------------------------------------------------------------ where
@register_rule(function=torch.where, method="where")
def where_rule(ctx: RuleContext) -> None:
    """``torch.where(cond, a, b)``: ``J_a = diag(cond)``, ``J_b = diag(¬cond)`` — each branch's
    ``mean diag(JᵀJ)`` is the share of elements it is selected at (times ``r`` where
    broadcast). That share is the data's (a mask, a sign test): measured on the batch,
    exactly, every ``refresh`` steps. The condition carries no gradient."""
    if ctx.node.op == "call_method":  # a.where(cond, b)
        cond, a, b = ctx.arg(1, "condition"), ctx.node.args[0], ctx.arg(2, "other")
    else:
        cond, a, b = ctx.arg(0, "condition"), ctx.arg(1, "input"), ctx.arg(2, "other")
    _measure_all(ctx, [t for t in (a, b) if t is not cond], "where: each branch's selected share")


# ------------------------------------------------------------------------------- clamp/clip
_CLAMP_FUNCTIONS = (torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max)
_CLAMP_METHODS = ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_")


def _clamp_moment(ctx: RuleContext) -> Mono | None:
    """As the activations' (:func:`.activations.activation_rule`): ``Var`` under the mean
    field, the input's moment otherwise."""
    if any(_is_input(ctx, a) for a in _bounds(ctx)):
        return None
    rule = next((r for r in REGISTRY if r.fn is activation_rule and r.moment is not None), None)
    if rule is not None:
        return rule.moment(ctx)
    return ctx.variance_below(ctx.inputs[0])[0] if ctx.inputs else None


def _bounds(ctx: RuleContext) -> list:
    return [a for a in list(ctx.node.args[1:3]) + [ctx.node.kwargs.get("min"), ctx.node.kwargs.get("max")]
            if isinstance(a, fx.Node)]


@register_rule(function=_CLAMP_FUNCTIONS, method=_CLAMP_METHODS, transparent=True, moment=_clamp_moment)
def clamp_rule(ctx: RuleContext) -> None:
    """``clamp(x, lo, hi)``: ``J = diag(1[lo < x < hi])`` — the identity where ``x`` is inside,
    0 where clipped. With number bounds it is an activation (``hardtanh`` is
    ``clamp(x, −1, 1)``): the identity under ``activations="paper"`` (the paper's ReLU, eq. 31,
    passes gradient where active and counts as the identity too), the mean-field share inside,
    ``m·P(lo < z < hi)``, under ``activations="meanfield"``
    (:func:`.activations.activation_rule`). Tensor bounds: ``x`` and the bounds get the shares
    where each is selected, measured on the batch."""
    x = ctx.arg(0, "input")
    bounds = [a for a in _bounds(ctx) if _is_input(ctx, a)]
    if bounds:
        _measure_all(ctx, [x] + bounds, "clamp with tensor bounds: the selected shares")
        return
    if _is_input(ctx, x) and ctx.inputs[0] is x:
        activation_rule(ctx)


# ------------------------------------------------------------------------------ vector norms
def _norm_order(ctx: RuleContext):
    """The norm's order: 2 (also ``'fro'`` and ``None``), 1, ``inf``, or what was given."""
    if ctx.node.target is torch.linalg.vector_norm:
        p = ctx.arg(1, "ord", 2)
    elif ctx.node.target is torch.linalg.norm:
        p = ctx.arg(1, "ord", None)
        dim = ctx.arg(2, "dim", None)
        if p is not None and not (isinstance(dim, int) or (dim is None and len(ctx.shape(ctx.inputs[0]) or ()) == 1)):
            return p if p == "fro" else ("matrix", p)  # a matrix norm: only Frobenius is elementwise
    else:
        p = ctx.arg(1, "p", "fro")
    if p in ("fro", None):
        return 2.0
    n = _number(p)
    return n if n is not None else p


def _norm_moment(ctx: RuleContext) -> Mono | None:
    """``E[‖x‖₂²] = K·E[x²]`` over the ``K`` entries reduced — a sum of squares, exact whatever
    their correlation."""
    if not ctx.inputs or _norm_order(ctx) not in (2.0, "fro"):
        return None
    x = ctx.inputs[0]
    e2, _ = ctx.variance_below(x)
    k = ctx.numel(x) / max(1, ctx.numel(ctx.node))
    return None if e2 is None else e2 * k


@register_rule(function=(torch.norm, torch.linalg.vector_norm, torch.linalg.norm), method="norm",
               moment=_norm_moment)
def vector_norm_rule(ctx: RuleContext) -> None:
    """``‖x‖_p`` over groups of ``K = numel(x)/numel(y)`` entries.

    * ``p = 2`` (``'fro'``): ``∂y/∂x_i = x_i/‖x‖``, each entry read by one output, so
      ``diag(JᵀJ)_i = x_i²/‖x‖²``, which sums to 1 over a group: ``mean diag(JᵀJ) = 1/K``
      exactly, whatever the data — ``m ← m/K``, every position carrying gradient;
    * ``p = 1``: ``∂y/∂x_i = sign(x_i)``: ``m`` unchanged;
    * ``p = ∞``: the largest entry of each group has slope 1, the others 0: ``m`` unchanged at
      ``1/K`` of the positions, as max pooling;
    * ``p = 0`` counts entries: ``J = 0``; any other ``p`` (and matrix norms): measured."""
    if not ctx.inputs:
        return
    x = ctx.inputs[0]
    k = ctx.numel(x) / max(1, ctx.numel(ctx.node))
    p = _norm_order(ctx)
    if p == 2.0 or p == "fro":
        ctx.pass_to(x, ctx.m_out / k)
    elif p == 1.0:
        ctx.pass_to(x, ctx.m_out)
    elif p in (math.inf, -math.inf):
        ctx.pass_to(x, ctx.m_out, ctx.frac_out / k)
    elif p == 0.0:
        ctx.note("0-norm: a count, no gradient flows through")
    else:
        _measure_all(ctx, (x,), f"norm of order {p!r}: the factor")

