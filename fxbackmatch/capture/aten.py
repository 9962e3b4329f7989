"""One vocabulary for every front end: ATen graphs (``torch.export``) lowered to the
torch-level calls the rules are registered for.

``torch.export`` records ``torch.ops.aten.linear.default(x, w, b)`` where symbolic tracing
records ``F.linear(x, w, b)`` or a ``Linear`` module. Rather than registering every rule
twice, :func:`lower_aten` rewrites each ATen node into its torch-level equivalent — same
semantics, so the graph still runs (the measurement replays it) — and the registry serves
both front ends from one set of rules:

* an explicit table for ops whose torch-level form differs (argument order, ``slice`` and
  ``select`` as ``getitem``, ``batch_norm``'s argument order, ``embedding``'s operands);
* otherwise ``torch.nn.functional.<name>``, ``torch.<name>`` or the method ``.<name>()``,
  whichever has a registered rule;
* no-ops of export (``alias``, ``_assert_tensor_metadata``, ``detach``) are removed.

An ATen op with no torch-level rule stays as it is, and the walk reports it by its ATen
name, with the ``register_rule(function=torch.ops.aten.<op>.<overload>)`` to add.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

__all__ = ["lower_aten", "LOWERINGS"]

aten = torch.ops.aten

Lowered = tuple[str, Any, tuple, dict]  # (op, target, args, kwargs)
#: ATen packet name -> builder from the schema-normalized kwargs
LOWERINGS: dict[str, Callable[[dict], Lowered]] = {}


def _lowering(*names: str):
    def deco(fn):
        for n in names:
            LOWERINGS[n] = fn
        return fn

    return deco


def _fn(target, *args, **kwargs) -> Lowered:
    return ("call_function", target, args, kwargs)


@_lowering("linear")
def _linear(k):
    return _fn(F.linear, k["input"], k["weight"], k.get("bias"))


@_lowering("conv1d", "conv2d", "conv3d")
def _conv(k, _names=("input", "weight", "bias", "stride", "padding", "dilation", "groups")):
    dims = len(k["weight"].meta["val"].shape) - 2 if isinstance(k["weight"], fx.Node) else 2
    f = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}[dims]
    return _fn(f, *(k.get(n) for n in _names if n in k))


@_lowering("batch_norm")
def _batch_norm(k):
    return _fn(F.batch_norm, k["input"], k["running_mean"], k["running_var"], k["weight"], k["bias"],
               k["training"], k["momentum"], k["eps"])


@_lowering("layer_norm")
def _layer_norm(k):
    return _fn(F.layer_norm, k["input"], list(k["normalized_shape"]), k.get("weight"), k.get("bias"), k.get("eps", 1e-5))


@_lowering("group_norm")
def _group_norm(k):
    return _fn(F.group_norm, k["input"], k["num_groups"], k.get("weight"), k.get("bias"), k.get("eps", 1e-5))


@_lowering("rms_norm")
def _rms_norm(k):
    return _fn(F.rms_norm, k["input"], list(k["normalized_shape"]), k.get("weight"), k.get("eps"))


@_lowering("embedding")
def _embedding(k):
    pad = k.get("padding_idx", -1)
    return _fn(F.embedding, k["indices"], k["weight"], None if pad == -1 else pad, None, 2.0,
               k.get("scale_grad_by_freq", False), k.get("sparse", False))


@_lowering("scaled_dot_product_attention")
def _sdpa(k):
    kw = {n: k[n] for n in ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa") if n in k}
    return _fn(F.scaled_dot_product_attention, k["query"], k["key"], k["value"], **kw)


@_lowering("addmm")
def _addmm(k):
    return _fn(torch.addmm, k["input"], k["mat1"], k["mat2"], beta=k.get("beta", 1), alpha=k.get("alpha", 1))


@_lowering("slice")
def _slice(k):
    dim = k.get("dim", 0)
    sl = slice(k.get("start"), k.get("end"), k.get("step", 1))
    return _fn(operator.getitem, k["input"], _index(k["input"], dim, sl))


@_lowering("select")
def _select(k):
    return _fn(operator.getitem, k["input"], _index(k["input"], k["dim"], k["index"]))


def _index(x, dim: int, item) -> tuple:
    rank = len(x.meta["val"].shape) if isinstance(x, fx.Node) and "val" in x.meta else None
    if dim < 0 and rank is not None:
        dim += rank
    return (slice(None),) * dim + (item,)


@_lowering("index")
def _index_tensor(k):
    """``aten.index.Tensor(x, [i, None, j])``: ``x[i, :, j]`` (a gather: a position bias table)."""
    items = tuple(slice(None) if i is None else i for i in k["indices"])
    return _fn(operator.getitem, k["input"], items[0] if len(items) == 1 else items)


@_lowering("pad")
def _pad(k):
    return _fn(F.pad, k["input"], list(k["pad"]), k.get("mode", "constant"), k.get("value"))


@_lowering("_softmax")
def _softmax(k):
    return _fn(torch.softmax, k["input"], k["dim"])


@_lowering("softmax")
def _softmax_int(k):
    return _fn(torch.softmax, k["input"], k["dim"])


@_lowering("_log_softmax", "log_softmax")
def _log_softmax(k):
    return _fn(torch.log_softmax, k["input"], k["dim"])


def _additive(op, alpha_fn):
    """``add``/``sub``: the operator (its rule's key) unless an ``alpha`` scales ``other``."""

    def build(k):
        if k.get("alpha", 1) != 1:
            return _fn(alpha_fn, k["input"], k["other"], alpha=k["alpha"])
        return _fn(op, k["input"], k["other"])

    return build


LOWERINGS.update({"add": _additive(operator.add, torch.add), "add_": _additive(operator.add, torch.add),
                  "sub": _additive(operator.sub, torch.sub), "sub_": _additive(operator.sub, torch.sub)})


@_lowering("mul", "mul_")
def _mul(k):
    return _fn(operator.mul, k["input"], k["other"])


@_lowering("div", "div_")
def _div(k):
    if k.get("rounding_mode") is not None:
        return _fn(torch.div, k["input"], k["other"], rounding_mode=k["rounding_mode"])
    return _fn(operator.truediv, k["input"], k["other"])


@_lowering("t")
def _t(k):
    return ("call_method", "transpose", (k["input"], 0, 1), {})


@_lowering("dropout")
def _dropout(k):
    return _fn(F.dropout, k["input"], k["p"], k["train"])


@_lowering("gelu")
def _gelu(k):
    return _fn(F.gelu, k["input"], approximate=k.get("approximate", "none"))


@_lowering("to", "_to_copy", "type_as")
def _to(k):
    kw = {n: k[n] for n in ("dtype", "device") if k.get(n) is not None}
    return ("call_method", "to", (k["input"],), kw)


#: export's no-ops: uses are rewired to the input and the node dropped
_DROP = {"alias", "detach", "lift_fresh_copy", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


def _normalized(node: fx.Node) -> dict | None:
    try:
        got = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 — an overload torch cannot normalize: leave it alone
        return None
    return None if got is None else dict(got.kwargs)


def lower_aten(gm: fx.GraphModule, has_rule: Callable[[str, Any], bool]) -> list[str]:
    """Rewrite ``gm``'s ATen nodes into torch-level calls in place; return the ATen ops left.

    ``has_rule(kind, target)`` says whether the registry has a rule for a torch-level
    ``("function", callable)`` or ``("method", name)``."""
    left: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target._opname
        if name in _DROP:
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if src is not None and name not in ("_assert_tensor_metadata", "_assert_scalar"):
                node.replace_all_uses_with(src)
            if not node.users:
                gm.graph.erase_node(node)
            continue
        k = _normalized(node)
        new: Lowered | None = None
        if name in LOWERINGS and k is not None:
            new = LOWERINGS[name](k)
        elif k is not None:
            new = _generic(name, node, has_rule)
        if new is None:
            left.append(str(node.target))
            continue
        op, target, args, kwargs = new
        with gm.graph.inserting_before(node):
            repl = gm.graph.create_node(op, target, args, kwargs, name=node.name + "_t")
        repl.meta = dict(node.meta)
        repl.meta["fxbackmatch.aten"] = str(node.target)
        node.replace_all_uses_with(repl)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return sorted(set(left))


def _generic(name: str, node: fx.Node, has_rule) -> Lowered | None:
    """``F.<name>``, ``torch.<name>`` or ``.<name>()`` with the node's own arguments, when the
    registry has a rule for it (``torch.<name>`` shares ATen's positional order)."""
    base = name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name
    for owner in (F, torch):
        fn = getattr(owner, base, None)
        if fn is not None and has_rule("function", fn):
            return _fn(fn, *node.args, **node.kwargs)
    if has_rule("method", base) and hasattr(torch.Tensor, base):
        return ("call_method", base, tuple(node.args), dict(node.kwargs))
    return None
