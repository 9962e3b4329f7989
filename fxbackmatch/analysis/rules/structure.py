"""Rules for the ops that route tensors without weighing them: addition (residual
connections), concatenation / split / stacking, containers, indexing and slicing, padding,
and constants (``zeros_like``, ``fill_``, ``masked_fill``). See :mod:`.ops` for the
factors' derivation conventions and ``docs/derivations.md``.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..context import RuleContext
from ..expr import Mono
from ..registry import register_rule

__all__ = ["add_rule", "concat_rule", "container_rule", "getitem_rule", "pad_rule", "constant_like_rule", "fill_rule",
           "masked_fill_rule", "broadcast_positions"]


@register_rule(
    function=(operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub),
    method=("add", "add_", "sub", "sub_"),
    sums=True,
)
def add_rule(ctx: RuleContext) -> None:
    """Addition (residual connections): every tensor input receives ``m`` (``J_i = I``); where
    a value feeds several ops the fork rule sums their factors. An operand broadcast over
    ``r`` copies (a bias tensor added to every sample) receives ``m·r``. Adding a parameter
    (``x + self.offset``) makes it a bias of this node: scale ``1/(m·s)`` with ``s`` the
    positions it is broadcast over."""
    for a in ctx.node.args[:2]:
        name = ctx.param_from_arg(a)
        if name is not None:
            s = ctx.frac_out * broadcast_positions(ctx, name)
            ctx.add_layer("add (parameter)", [(name, "bias", s)], weight=name, s=s, c=1.0,
                          input_node=ctx.inputs[0] if ctx.inputs else None)
    out_n = ctx.numel(ctx.node)
    for x in ctx.inputs:  # a broadcast operand is read r times: its copies' Jacobians stack
        r = out_n / max(1, ctx.numel(x))
        if r > 1.0 + 1e-9:
            ctx.pass_to(x, ctx.m_out * r, 1.0, 1.0)
        else:
            ctx.pass_to(x, ctx.m_out)


def broadcast_positions(ctx: RuleContext, name: str) -> float:
    out = ctx.out_shape or (1,)
    per_sample = math.prod(out[1:]) if len(out) > 1 else 1
    return max(1.0, per_sample / max(1, math.prod(ctx.param_shape(name))))


_SPLITS = (torch.chunk, torch.split, torch.unbind, "chunk", "split", "unbind")


@register_rule(function=(torch.cat, torch.concat, torch.stack, torch.chunk, torch.split, torch.unbind),
               method=("chunk", "split", "unbind"), layout=True)
def concat_rule(ctx: RuleContext) -> None:
    """Concatenation, stacking, split and chunk: each part keeps the flow (an equal split
    re-concatenated changes nothing)."""
    ctx.pass_all()


@register_rule(function=(tuple, list, dict), layout=True)
def container_rule(ctx: RuleContext) -> None:
    """Building a tuple / namedtuple / list / dict of tensors (model outputs such as
    GoogLeNet's): each element keeps the factor."""
    ctx.pass_all()


def _channel_dim(ctx: RuleContext, x: fx.Node, rank: int) -> int | None:
    ch = ctx.channel_dim_below(x)
    if ch is None:
        ch = 1 if rank >= 2 else None
    return None if ch is None else ch % rank


def _index_ratios(index, shape: tuple[int, ...]) -> list[float] | None:
    """Per input dimension, the share an index keeps; ``None`` for advanced indexing."""
    idx = index if isinstance(index, tuple) else (index,)
    rank = len(shape)
    ratios = [1.0] * rank
    d = 0
    for k, it in enumerate(idx):
        if it is Ellipsis:
            rest = sum(1 for x in idx[k + 1:] if x is not None and x is not Ellipsis)
            d = rank - rest
        elif it is None:
            continue
        elif isinstance(it, bool):
            return None
        elif isinstance(it, int):
            if d >= rank:
                return None
            ratios[d] = 1.0 / max(1, shape[d])
            d += 1
        elif isinstance(it, slice):
            if d >= rank or not all(v is None or isinstance(v, int) for v in (it.start, it.stop, it.step)):
                return None
            ratios[d] = len(range(*it.indices(shape[d]))) / max(1, shape[d])
            d += 1
        else:
            return None
    return ratios


def _getitem_moment(ctx: RuleContext) -> Mono | None:
    """A slice has the moment of what it slices (elements are alike)."""
    if not ctx.inputs:
        return None
    got, _ = ctx.variance_below(ctx.inputs[0])
    return got


@register_rule(function=operator.getitem, moment=_getitem_moment, layout=True)
def getitem_rule(ctx: RuleContext) -> None:
    """Indexing: a slice keeps ``m``. Selecting channels (the dimension the layer below
    mixes) shrinks ``chan``, selecting along any other dimension shrinks ``frac`` (a CLS
    token of ``T``: ``1/T`` of the positions); the batch dimension is not a position. For
    the parts of a split/chunk, the split's dimension decides."""
    name = ctx.param_from_arg(ctx.node.args[0]) if ctx.node.args else None
    if name is not None:  # a table indexed by constants (relative position bias): each entry
        # is read numel(out)/numel(table) times; it is a bias of the values it fills
        s = ctx.frac_out * max(1.0, ctx.numel(ctx.node) / max(1, ctx.numel_of_param(name)))
        ctx.add_layer("indexed parameter", [(name, "bias", s)], weight=name, s=s, c=1.0, input_node=None)
        return
    if not ctx.inputs:  # indexing a constant: nothing to hand back
        return
    x = ctx.inputs[0]
    ratio = ctx.numel(ctx.node) / max(1, ctx.numel(x))
    in_shape = ctx.shape(x)
    if in_shape is None:  # a tuple (split, chunk, a module's tuple output)
        dim = None
        if (x.op == "call_function" and x.target in _SPLITS) or (x.op == "call_method" and x.target in _SPLITS):
            src = x.all_input_nodes[0] if x.all_input_nodes else None
            dim = x.args[2] if len(x.args) > 2 else x.kwargs.get("dim", 0 if x.target not in (torch.unbind, "unbind") else 0)
            rank = len(ctx.shape(src) or ())
            is_chan = src is not None and rank and dim % rank == _channel_dim(ctx, src, rank)
        else:
            is_chan = False
        if is_chan:
            ctx.pass_to(x, ctx.m_out, ctx.frac_out, ctx.chan_out * ratio)
        else:
            ctx.pass_to(x, ctx.m_out, ctx.frac_out * ratio, ctx.chan_out)
        return
    ratios = _index_ratios(ctx.node.args[1], in_shape)
    if ratios is None:  # advanced indexing: count the share as positions
        if ratio > 1:  # a gather that reads entries repeatedly (a bias table from an MLP):
            # JᵀJ sums the reads — numel(out)/numel(x) per entry on average
            ctx.pass_to(x, ctx.m_out * ratio, 1.0, 1.0)
            ctx.note("gather: entries read numel(out)/numel(in) times on average")
            return
        ctx.pass_to(x, ctx.m_out, ctx.frac_out * ratio)
        ctx.note("advanced indexing: selected share counted as positions")
        return
    ch = _channel_dim(ctx, x, len(in_shape))
    chan = ratios[ch] if ch is not None and ch != 0 else 1.0
    pos = math.prod(r for d, r in enumerate(ratios) if d not in (0, ch))
    ctx.pass_to(x, ctx.m_out, ctx.frac_out * pos, ctx.chan_out * chan)


# ------------------------------------------------------------------- padding and constants
@register_rule(function=F.pad, transparent=True)
def pad_rule(ctx: RuleContext) -> None:
    """``F.pad``: constant padding copies every input element once (``J`` a selection):
    ``m`` unchanged; the padded entries lead nowhere. (``reflect``/``replicate`` read border
    elements twice: the same, noted.)"""
    if not ctx.inputs:
        return
    mode = ctx.arg(2, "mode", "constant")
    if mode != "constant":
        ctx.note(f"pad mode {mode!r}: border elements read twice, counted once")
    ctx.pass_to(ctx.inputs[0], ctx.m_out)


@register_rule(
    function=(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like),
    method=("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zero_"),
)
def constant_like_rule(ctx: RuleContext) -> None:
    """A tensor made from another's shape, or overwritten with zeros: ``J = 0`` — no
    gradient reaches the input (Swin's attention mask is built this way)."""


@register_rule(method=("fill_",), function=(torch.fill,))
def fill_rule(ctx: RuleContext) -> None:
    """``x.fill_(v)``: the output is ``v`` everywhere — ``J = 0`` for ``x``; a tensor ``v``
    gets the sum over the positions it fills."""
    x = ctx.node.args[0] if ctx.node.args else None
    for v in ctx.inputs:
        if v is not x:
            ctx.pass_to(v, ctx.m_out * max(1, ctx.numel(ctx.node)), 1.0, 1.0)


@register_rule(method=("masked_fill", "masked_fill_"), function=(torch.masked_fill,))
def masked_fill_rule(ctx: RuleContext) -> None:
    """``x.masked_fill(mask, v)``: ``x`` keeps ``m`` where the mask is false (an attention mask
    fills scores that softmax then drops: counted as carrying, noted); a tensor ``v`` is not
    followed."""
    x = ctx.node.args[0] if ctx.node.args else None
    if isinstance(x, fx.Node) and x in ctx.inputs:
        ctx.note("masked_fill: the masked share is counted as carrying gradient")
        ctx.pass_to(x, ctx.m_out)
