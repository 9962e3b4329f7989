"""The FX graph as a networkx DiGraph, walked from the outputs to the inputs; which nodes
carry a gradient to a trainable parameter (:func:`live_nodes`)."""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

__all__ = ["build_digraph", "backward_order", "output_nodes", "select_outputs", "carries_tensor", "numel_of",
           "fetch_attr", "live_nodes", "is_floating"]


def carries_tensor(node: fx.Node) -> bool:
    """True if the node's value is a tensor or a (nested) tuple/list holding tensors."""
    return _count(node.meta.get("val"))[0] > 0


def numel_of(node: fx.Node) -> int:
    """Total number of elements in the node's tensor value(s)."""
    return _count(node.meta.get("val"))[1]


def _count(val) -> tuple[int, int]:
    if isinstance(val, torch.Tensor):
        return 1, val.numel()
    if isinstance(val, (tuple, list)):
        t = n = 0
        for v in val:
            a, b = _count(v)
            t, n = t + a, n + b
        return t, n
    return 0, 0


def build_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """One graph node per FX node (keyed by the FX node), one edge per data dependency."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


def output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The tensor-valued nodes the graph returns (tuples/dicts are flattened)."""
    outs: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n.op == "output":
            fx.node.map_arg(n.args, lambda a: outs.append(a))
    return [o for o in dict.fromkeys(outs) if carries_tensor(o)]


def select_outputs(gm: fx.GraphModule, spec=None) -> tuple[list[fx.Node], list[str]]:
    """The graph outputs that enter the loss, and a label for each.

    ``spec`` is ``None`` (every tensor output), or an index / key / attribute name, or a
    sequence of them, naming elements of what the model returns: ``0`` (the first element of
    a tuple), ``"logits"`` (a dict key or a namedtuple field), ``("out", "aux")``.
    """
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    if spec is None:
        outs = output_nodes(gm)
        return outs, [o.name for o in outs]
    keys = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    root = out_node.args[0]
    found: list[fx.Node] = []
    labels: list[str] = []
    for key in keys:
        node = _select(root, key)
        if node is None:
            raise ValueError(
                f"outputs={spec!r}: the model's output has no element {key!r} (it returns "
                f"{_describe_output(root)}).\n  What to do: name the loss outputs by tuple "
                f"index, dict key or field name, e.g. outputs=0 or outputs='logits'."
            )
        for n in _tensor_nodes(node):
            if n not in found:
                found.append(n)
                labels.append(f"{key}")
    if not found:
        raise ValueError(f"outputs={spec!r} selects no tensor the model returns")
    return found, labels


def _select(root, key):
    if isinstance(root, (tuple, list)) and isinstance(key, int) and -len(root) <= key < len(root):
        return root[key]
    if isinstance(root, dict) and key in root:
        return root[key]
    if isinstance(root, fx.Node) and root.op == "call_function" and isinstance(root.target, type):
        fields = getattr(root.target, "_fields", None)
        if isinstance(key, str) and key in root.kwargs:
            return root.kwargs[key]
        if fields and isinstance(key, str) and key in fields:
            idx = fields.index(key)
            return root.args[idx] if idx < len(root.args) else root.kwargs.get(key)
        if isinstance(key, int) and root.args and key < len(root.args):
            return root.args[key]
    if isinstance(root, fx.Node) and not isinstance(key, int):
        return None
    if isinstance(root, fx.Node) and key == 0 and carries_tensor(root):
        return root
    return None


def _tensor_nodes(x) -> list[fx.Node]:
    outs: list[fx.Node] = []
    fx.node.map_arg(x, lambda a: outs.append(a))
    return [o for o in outs if carries_tensor(o)]


def _describe_output(root) -> str:
    if isinstance(root, (tuple, list)):
        return f"a {type(root).__name__} of {len(root)}"
    if isinstance(root, dict):
        return f"a dict with keys {list(root)}"
    if isinstance(root, fx.Node) and isinstance(root.target, type):
        return f"a {root.target.__name__} with fields {list(getattr(root.target, '_fields', ())) or list(root.kwargs)}"
    return "one tensor"


def backward_order(g: nx.DiGraph) -> list[fx.Node]:
    """Nodes in reverse topological order (every consumer before its producers)."""
    return list(reversed(list(nx.lexicographical_topological_sort(g, key=lambda n: _pos(n)))))


def _pos(n: fx.Node) -> str:
    # FX nodes are already in topological order; sort ties by that order
    return f"{n.meta.get('fxbackmatch.index', 0):09d}"


def fetch_attr(gm: fx.GraphModule, target: str):
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def live_nodes(gm: fx.GraphModule, model: nn.Module) -> set[fx.Node]:
    """Nodes whose value depends on a trainable parameter, through floating-point values.

    Only they need a rule: masks and position tables built from the inputs and buffers
    (``arange``, ``cumsum``, comparisons, rotary ``cos``/``sin``) carry no gradient to any
    parameter, so their factors would scale nothing."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    live: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                obj = fetch_attr(gm, n.target)
            except AttributeError:
                continue
            if id(obj) in trainable:
                live.add(n)
        elif n.op == "call_module" and is_floating(n) and (
            any(a in live for a in n.all_input_nodes)
            or any(p.requires_grad for p in gm.get_submodule(n.target).parameters())
        ):
            live.add(n)
        elif n.op.startswith("call") and any(a in live for a in n.all_input_nodes) and is_floating(n):
            live.add(n)
        elif n.op == "output":
            live.add(n)
    return live


def is_floating(n: fx.Node) -> bool:
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.is_floating_point() or val.is_complex()
    if isinstance(val, (tuple, list)):
        return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in val) or not val
    return val is None  # unknown (hook capture): keep
